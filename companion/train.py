"""Training recipes for the bundled models: ``companion train NAME``.

A recipe is a name, a description, a config (network, data, optimisation), a default number of steps and
a seed. :func:`run_recipe` trains it on the CPU (or the device picked by :func:`companion.device.pick_device`)
with a progress bar (loss, it/s, ETA), an exponential moving average (EMA) of the weights (the EMA weights
are what is saved), fixed seeds and resumable checkpoints, then writes the model in diffusers layout with
its card: recipe, config, seed, steps, training seconds, final loss and measured quality.

Every diffusion model is trained with the *linear* schedule :data:`companion.models.TRAIN_SCHEDULE`: the
cosine schedule makes eight diffusers samplers return pure noise. The digits and latent models predict the
noise (eps); the pixel-space shapes models predict v = alpha eps - sigma x0 (``prediction="v_prediction"``):
their images have little variance (std 0.36), and at t ~ 900-999 an eps-network's x0 estimate
(x - sigma eps)/alpha multiplies its error by up to 157, which sent eps-trained versions out of range
(52 % of pixels after 4800 steps) where a v-trained one stays in range after 1000.

Checkpoints live beside the output folder in ``<out>.checkpoint/``: network, EMA and optimizer tensors
in safetensors, the step counter, random-generator state and loss history in JSON/safetensors. Nothing is
pickled. ``resume=True`` continues from there (also to extend a finished run to more steps).
"""
from __future__ import annotations

import abc
import copy
import functools
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import assets, data
from .models import TRAIN_SCHEDULE, DiffusionModel, ModelError

CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINT_EVERY_S = 60.0
# On a CPU shared by several processes, one thread per trainer is several times faster than two
# (measured here: 0.5-1.1 s vs 11 s per step for the digits UNet while other jobs ran). On an idle
# machine use all cores: `companion train NAME --threads 2` (or $COMPANION_TRAIN_THREADS) was 1.8x faster
# per step than one thread for digits-cond on the 2-core CPU.
TRAIN_THREADS = int(os.environ.get("COMPANION_TRAIN_THREADS", "1"))


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    kind: str  # "pixel", "latent", "sr", "autoencoder", "noisy-classifier"
    config: dict
    steps: int
    seed: int = 0
    depends_on: tuple[str, ...] = field(default_factory=tuple)


def _unet(sample_size, in_ch, out_ch, channels, layers=1, attn=(False, False, True), num_classes=None, mid_attn=True):
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    cfg = dict(sample_size=sample_size, in_channels=in_ch, out_channels=out_ch, block_out_channels=list(channels),
               layers_per_block=layers, down_block_types=list(down), up_block_types=list(up), norm_num_groups=8)
    if not mid_attn:
        cfg["add_attention"] = False  # the middle block without its self-attention layer
    if num_classes is not None:
        cfg["num_class_embeds"] = num_classes + 1  # label num_classes = "no class"
    return cfg


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "digits-cond",
            "class-conditional pixel UNet on 16x16 digits, class dropout for classifier-free guidance",
            "pixel",
            dict(data="digits", size=16, num_classes=10, class_dropout=0.12, batch=64, lr=5e-4, ema=0.999, warmup=100,
                 unet=_unet(16, 1, 1, (32, 64, 64), num_classes=10)),
            steps=4500, seed=0,
        ),
        Recipe(
            "digits-noisy-clf",
            "noise-aware digits classifier clf(x_t, t) for classifier guidance (16x16, linear schedule)",
            "noisy-classifier",
            dict(data="digits", size=16, batch=128, lr=2e-3, ema=0.99, warmup=50,
                 net=dict(in_channels=1, image_size=16, num_classes=10, channels=[32, 64, 64], t_dim=64)),
            steps=600, seed=0,
        ),
        Recipe(
            "shapes-ae",
            "AutoencoderKL for 32x32 shapes, f=4: 3x32x32 -> 4x8x8 latents (12x fewer numbers)",
            "autoencoder",
            dict(data="shapes", size=32, batch=16, lr=1e-3, ema=0.99, warmup=50, kl_weight=1e-6,
                 vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64],
                          down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                          layers_per_block=1, norm_num_groups=16, sample_size=32)),
            steps=900, seed=0,
        ),
        Recipe(
            "shapes-latent",
            "latent UNet on standardised shapes-ae latents (4x8x8); decode gives 32x32 images",
            "latent",
            dict(data="shapes", size=32, autoencoder="shapes-ae", batch=64, lr=1e-3, ema=0.999, warmup=100, hflip=True,
                 high_t={"fraction": 0.5, "min": 400},
                 unet=_unet(8, 4, 4, (32, 64, 64), layers=1, attn=(False, False, True))),
            steps=800, seed=0, depends_on=("shapes-ae",),
        ),
        Recipe(
            "shapes-pixel",
            "pixel-space UNet on 32x32 shapes (v-prediction): the baseline shapes-latent is compared with",
            "pixel",
            dict(data="shapes", size=32, batch=16, lr=1e-3, ema=0.999, warmup=100, hflip=True,
                 prediction="v_prediction", high_t={"fraction": 0.5, "min": 400},
                 unet=_unet(32, 3, 3, (32, 64, 64), layers=1, attn=(False, False, True))),
            steps=3000, seed=0,
        ),
        Recipe(
            "shapes-base16",
            "low-resolution base UNet on 16x16 shapes (2x2 average-pooled 32x32 images, v-prediction): stage 1 of the cascade",
            "pixel",
            dict(data="shapes", size=16, batch=32, lr=1e-3, ema=0.999, warmup=100, hflip=True,
                 prediction="v_prediction", high_t={"fraction": 0.5, "min": 400},
                 unet=_unet(16, 3, 3, (32, 64, 64), layers=1, attn=(False, False, True))),
            steps=3000, seed=0,
        ),
        Recipe(
            "shapes-sr32",
            "super-resolution stage 16->32 on shapes: UNet on [x_t, bilinear-upsampled low-res] (6 channels, v-prediction)",
            "sr",
            dict(data="shapes", size=32, low_size=16, batch=16, lr=5e-4, ema=0.999, warmup=100, hflip=True, cond_noise=0.05, prediction="v_prediction",
                 unet=_unet(32, 6, 3, (32, 64, 64), layers=1, attn=(False, False, False))),
            steps=3000, seed=0,
        ),
    ]
}

# Model design (chapter 11): variants of the digits-cond UNet that differ in one design lever each, trained
# with the same data, seed, batch, schedule and number of steps, so quality and cost differences come from
# the architecture. "base" is the digits-cond layout (32-64-64 channels, one ResNet layer per level,
# self-attention at 4x4 and in the middle block). They predict v and see the noisiest timesteps more often (as
# the pixel shapes models do): trained for eps, the base layout still put 23 % of its DDIM-20 pixels out of
# range after 1200 steps (digits-cond needed 4500 steps for that).
DESIGN_STEPS = 1200
DESIGN_VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("the digits-cond layout: 32-64-64 channels, 1 layer per level, attention at 4x4 and in the middle",
             dict(channels=(32, 64, 64))),
    "narrow": ("half the width: 16-32-32 channels", dict(channels=(16, 32, 32))),
    "deep": ("twice the depth: 2 ResNet layers per level", dict(channels=(32, 64, 64), layers=2)),
    "noattn": ("no self-attention anywhere (convolutions only)",
               dict(channels=(32, 64, 64), attn=(False, False, False), mid_attn=False)),
    "attn8": ("attention moved up one level as well: at 8x8 and 4x4 and in the middle",
              dict(channels=(32, 64, 64), attn=(False, True, True))),
}
for _key, (_what, _arch) in DESIGN_VARIANTS.items():
    RECIPES[f"digits-design-{_key}"] = Recipe(
        f"digits-design-{_key}",
        f"model-design variant of digits-cond ({_what}); {DESIGN_STEPS} steps like every design variant",
        "pixel",
        dict(RECIPES["digits-cond"].config, unet=_unet(16, 1, 1, num_classes=10, **_arch), weights_dtype="float16",
             prediction="v_prediction", high_t={"fraction": 0.5, "min": 400}),
        steps=DESIGN_STEPS, seed=0,
    )
GROUPS_BUILTIN = {"digits-design": [f"digits-design-{k}" for k in DESIGN_VARIANTS]}


def all_recipes() -> dict[str, Recipe]:
    """Every recipe by name, the distillation students included."""
    _with_distillation()
    return dict(RECIPES)


def recipe(name: str) -> Recipe:
    _with_distillation()
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------------------
# data and networks per kind
# ---------------------------------------------------------------------------------------------------------
def _images(cfg: dict, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    if cfg["data"] == "digits":
        return data.digits(cfg["size"], split)
    if cfg["data"] == "shapes":
        x, y = data.shapes(split, 32)
        if cfg["size"] != 32:  # lower resolutions are average-pooled 32x32 images, so the cascade is consistent
            x = F.avg_pool2d(x, 32 // cfg["size"])
        return x, y
    raise ValueError(f"unknown data {cfg['data']!r}; valid: digits, shapes")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Task(abc.ABC):
    """What differs between kinds: the network, the loss on a batch, how the trained EMA network is saved."""

    def __init__(self, rec: Recipe, cfg: dict):
        self.rec, self.cfg = rec, cfg
        self.x, self.y = _images(cfg)
        if cfg.get("limit"):  # the first `limit` training images only (quick checks of a recipe's plumbing)
            self.x, self.y = self.x[: cfg["limit"]], self.y[: cfg["limit"]]
        self.net = self.build()

    @abc.abstractmethod
    def build(self) -> torch.nn.Module:
        """Defined by every kind of task."""

    def batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.x.shape[0], (self.cfg["batch"],), generator=g)
        x, y = self.x[idx], self.y[idx]
        if self.cfg.get("hflip"):
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    @abc.abstractmethod
    def loss(self, g: torch.Generator) -> torch.Tensor:
        """Defined by every kind of task."""

    @abc.abstractmethod
    def save(self, ema: torch.nn.Module, out: Path, card: dict) -> dict:
        """Defined by every kind of task."""

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """Modules besides the network and its EMA whose state a checkpoint must keep (e.g. a target network)."""
        return {}


class _DiffusionTask(_Task):
    def build(self):
        from diffusers import DDPMScheduler, UNet2DModel

        self.scheduler = DDPMScheduler.from_config(TRAIN_SCHEDULE)
        return UNet2DModel(**self.cfg["unet"])

    def inputs(self, g):
        """(x0 in diffusion space, class labels or None, conditioning image or None)."""
        x, y = self.batch(g)
        labels = None
        if self.cfg.get("num_classes"):
            drop = torch.rand(y.shape[0], generator=g) < self.cfg["class_dropout"]
            labels = torch.where(drop, torch.full_like(y, self.cfg["num_classes"]), y)
        return x, labels, None

    def loss(self, g):
        x0, labels, cond = self.inputs(g)
        noise = torch.randn(x0.shape, generator=g)
        t = self.timesteps(x0.shape[0], g)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if cond is not None:
            x_t = torch.cat([x_t, F.interpolate(cond, size=x_t.shape[-2:], mode="bilinear", align_corners=False)], 1)
        kwargs = {"class_labels": labels} if labels is not None else {}
        target = noise
        if self.cfg.get("prediction") == "v_prediction":
            abar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            target = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v = alpha eps - sigma x0
        return F.mse_loss(self.net(x_t, t, **kwargs).sample, target)

    def timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Uniform training timesteps, or (``high_t``) a share of them drawn from the noisiest range.

        Short runs on images with large uniform regions learn the high-noise range last, and samplers start
        there: errors at t > ~600 drive every sampler out of range. ``high_t = {"fraction": f, "min": m}``
        draws a fraction f of the timesteps from [m, T).
        """
        T = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (n,), generator=g)
        high = self.cfg.get("high_t")
        if high:
            pick = torch.rand(n, generator=g) < high["fraction"]
            t = torch.where(pick, torch.randint(high["min"], T, (n,), generator=g), t)
        return t

    def model(self, unet) -> DiffusionModel:
        c = self.cfg
        shape = (c["unet"]["out_channels"], c["size"], c["size"])
        return DiffusionModel(unet, TRAIN_SCHEDULE, name=self.rec.name, sample_shape=shape, num_classes=c.get("num_classes"),
                              prediction=c.get("prediction", "epsilon"))

    def save(self, ema, out, card):
        dtype = self.cfg.get("weights_dtype")
        return self.model(ema).save(out, card, weights_dtype=getattr(torch, dtype) if dtype else None)


class _SRTask(_DiffusionTask):
    def inputs(self, g):
        x, _ = self.batch(g)
        low = F.avg_pool2d(x, self.cfg["size"] // self.cfg["low_size"])
        # small random noise on the low-resolution input: the stage must tolerate a base model's imperfections
        sigma = torch.rand(x.shape[0], 1, 1, 1, generator=g) * self.cfg["cond_noise"]
        low = low + sigma * torch.randn(low.shape, generator=g)
        return x, None, low

    def model(self, unet):
        c = self.cfg
        low = (3, c["low_size"], c["low_size"])
        return DiffusionModel(unet, TRAIN_SCHEDULE, name=self.rec.name, sample_shape=(3, c["size"], c["size"]), cond_shape=low,
                              prediction=c.get("prediction", "epsilon"))


class _LatentTask(_DiffusionTask):
    def __init__(self, rec, cfg):
        from .models import load

        self.vae = load(cfg["autoencoder"], device="cpu")
        super().__init__(rec, cfg)
        with torch.no_grad():
            z = torch.cat([self._encode(self.x[i : i + 250]) for i in range(0, self.x.shape[0], 250)])
            zf = torch.cat([self._encode(self.x[i : i + 250].flip(-1)) for i in range(0, self.x.shape[0], 250)])
        self.mean = z.mean(dim=(0, 2, 3))
        self.std = z.std(dim=(0, 2, 3))
        self.z = (z - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        self.zf = (zf - self.mean[None, :, None, None]) / self.std[None, :, None, None]

    def _encode(self, x):
        return self.vae.encode(x).latent_dist.mean

    def inputs(self, g):
        # flips are applied in image space and encoded once up front (a flipped latent is not a flipped image)
        idx = torch.randint(0, self.z.shape[0], (self.cfg["batch"],), generator=g)
        flip = torch.rand(idx.shape[0], generator=g) < 0.5
        return torch.where(flip[:, None, None, None], self.zf[idx], self.z[idx]), None, None

    def model(self, unet):
        return DiffusionModel(unet, TRAIN_SCHEDULE, name=self.rec.name, sample_shape=tuple(self.z.shape[1:]),
                              image_shape=(3, self.cfg["size"], self.cfg["size"]), vae=self.vae,
                              latent_mean=self.mean, latent_std=self.std, prediction=self.cfg.get("prediction", "epsilon"))


AUTOENCODER_KIND = "autoencoder"


class _AutoencoderTask(_Task):
    def build(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL(**self.cfg["vae"])

    def loss(self, g):
        x, _ = self.batch(g)
        post = self.net.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = self.net.decode(z).sample
        return F.mse_loss(rec, x) + self.cfg["kl_weight"] * post.kl().mean()

    def save(self, ema, out, card):
        out.mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(out / "vae", safe_serialization=True)
        return assets.write_card(out, dict(card, kind=AUTOENCODER_KIND, name=self.rec.name, vae_class=type(ema).__name__,
                                           image_shape=[3, self.cfg["size"], self.cfg["size"]]))


class _NoisyClassifierTask(_Task):
    def build(self):
        from diffusers import DDPMScheduler

        from .nets import NoisyClassifier

        self.scheduler = DDPMScheduler.from_config(TRAIN_SCHEDULE)
        return NoisyClassifier(**self.cfg["net"])

    def loss(self, g):
        x, y = self.batch(g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), generator=g)
        x_t = self.scheduler.add_noise(x, torch.randn(x.shape, generator=g), t)
        return F.cross_entropy(self.net(x_t, t), y)

    def save(self, ema, out, card):
        ema.name = self.rec.name
        return ema.save(out, card)


_TASKS: dict[str, type[_Task]] = {"pixel": _DiffusionTask, "sr": _SRTask, "latent": _LatentTask,
                                   "autoencoder": _AutoencoderTask, "noisy-classifier": _NoisyClassifierTask}


# ---------------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, never pickle)
# ---------------------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, net, ema, opt, g: torch.Generator, state: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for name, module in (extra or {}).items():
        tensors.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
    tensors["rng"] = g.get_state()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors.tmp"))
    meta = dict(state, param_groups=opt_state["param_groups"])
    (folder / "state.json.tmp").write_text(json.dumps(meta))
    (folder / "state.safetensors.tmp").replace(folder / "state.safetensors")
    (folder / "state.json.tmp").replace(folder / "state.json")


def _load_checkpoint(folder: Path, net, ema, opt, g: torch.Generator, extra: dict | None = None) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for name, module in (extra or {}).items():
        prefix = f"extra.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_state: dict = {"state": {}, "param_groups": meta.pop("param_groups")}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[key] = v
    opt.load_state_dict(opt_state)
    g.set_state(tensors["rng"])
    return meta


# ---------------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------------
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    # warm-up: average over roughly the steps seen so far until the nominal horizon is reached
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pn in zip(ema.parameters(), net.parameters()):
            pe.lerp_(pn, 1 - d)
        for be, bn in zip(ema.buffers(), net.buffers()):
            be.copy_(bn)


def default_out(name: str) -> Path:
    return assets.models_dir() / name


def run_recipe(name: str, *, steps: int | None = None, out: str | Path | None = None, resume: bool = False,
               seed: int | None = None, progress: bool = True, config: dict | None = None,
               measure: bool = True, threads: int | None = None) -> Path:
    """Train recipe ``name`` and write the model (EMA weights + card) to ``out`` (default ``assets/models/<name>``).

    ``steps``/``seed`` override the recipe's defaults; ``config`` overrides top-level config entries (e.g. a
    tiny network for tests); ``resume`` continues from ``<out>.checkpoint/``. ``measure`` runs the recipe's
    quality measurement and records it in the card. ``threads`` is the number of CPU threads torch
    uses (default :data:`TRAIN_THREADS`). Returns the output folder.
    """
    rec = recipe(name)
    steps = rec.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    seed = rec.seed if seed is None else int(seed)
    cfg = dict(rec.config, **(config or {}))
    out = Path(out) if out is not None else default_out(name)
    ckpt = out.with_name(out.name + CHECKPOINT_SUFFIX)

    n_threads = TRAIN_THREADS if threads is None else int(threads)
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {n_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return _run(rec, name, steps, seed, cfg, out, ckpt, resume, progress, measure)
    finally:
        torch.set_num_threads(before)


def _run(rec, name, steps, seed, cfg, out, ckpt, resume, progress, measure) -> Path:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)  # network initialisation
    task = _TASKS[rec.kind](rec, cfg)
    net = task.net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    state = {"step": 0, "seconds": 0.0, "losses": [], "seed": seed}
    if resume:
        if not (ckpt / "state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {ckpt}; run without --resume first")
        state = _load_checkpoint(ckpt, net, ema, opt, g, task.checkpoint_modules())
        if state["seed"] != seed:
            raise ValueError(f"checkpoint {ckpt} was trained with seed {state['seed']}, not {seed}")
    losses: list[float] = state["losses"]
    bar = tqdm(total=steps, initial=min(state["step"], steps), desc=name, disable=not progress, dynamic_ncols=True)
    last_ckpt = time.perf_counter()
    t_start = time.perf_counter() - state["seconds"]
    while state["step"] < steps:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"])
        loss = task.loss(g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}; lower lr in the recipe")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        _ema_update(ema, net, cfg["ema"], step)
        losses.append(float(loss.detach()))
        state["step"] = step + 1
        state["seconds"] = time.perf_counter() - t_start
        bar.update(1)
        if state["step"] % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if time.perf_counter() - last_ckpt > CHECKPOINT_EVERY_S or state["step"] == steps:
            _save_checkpoint(ckpt, net, ema, opt, g, state, task.checkpoint_modules())
            last_ckpt = time.perf_counter()
    bar.close()

    card = {
        "recipe": rec.name,
        "description": rec.description,
        "config": cfg,
        "seed": seed,
        "training_steps": state["step"],
        "training_seconds": round(state["seconds"], 1),
        "final_loss": float(np.mean(losses[-100:])),
        "params": _params(ema),
        "trained_on": f"{platform.machine()} CPU x{torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "command": f"companion train {name}" + (f" --steps {steps}" if steps != rec.steps else "")
        + (f" --seed {seed}" if seed != rec.seed else ""),
    }
    task.save(ema, out, card)
    if measure and rec.name in QUALITY:
        measure_quality(out, rec.name, progress=progress, threads=torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------------------------------------
# measured quality, recorded in the cards
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(model: DiffusionModel, n: int, *, steps: int = 50, guidance: float | None = None,
                class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None, seed: int = 0,
                batch: int = 250) -> torch.Tensor:
    """Deterministic DDIM samples (decoded images) for the quality measurements of the cards."""
    from diffusers import DDIMScheduler

    from .device import generator

    sched = DDIMScheduler.from_config(model.scheduler_config, timestep_spacing="trailing", clip_sample=False)
    g = generator(seed)
    outs = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        x = torch.randn((m, *model.sample_shape), generator=g)
        labels = class_labels[i : i + m] if class_labels is not None else None
        c = cond[i : i + m] if cond is not None else None
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            if guidance is not None and labels is not None:
                both = model.predict_noise(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, model.null_class)]))
                e_c, e_u = both.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            else:
                eps = model.predict_noise(x, t, labels, cond=c)
            x = sched.step(eps, t, x).prev_sample
        outs.append(model.decode(x))
    return torch.cat(outs)


def digits_reference_classifier():
    """Logistic regression on 8x8 average-pooled 16x16 *train* digits: the held-out judge of class accuracy."""
    from sklearn.linear_model import LogisticRegression

    x, y = data.digits(16, "train")
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(F.avg_pool2d(x, 2).flatten(1).numpy(), y.numpy())
    xt, yt = data.digits(16, "test")
    acc = float((clf.predict(F.avg_pool2d(xt, 2).flatten(1).numpy()) == yt.numpy()).mean())
    return clf, acc


def _q_digits_cond(model, progress, guidances=(1.0, 2.0, 3.0)):
    from . import metrics

    clf, test_acc = digits_reference_classifier()
    labels = torch.arange(10).repeat_interleave(50)
    out = {"judge": "logistic regression on 8x8-pooled train digits", "judge_test_accuracy": round(test_acc, 4),
           "sampler": "DDIM, 50 steps, trailing spacing", "n_samples": len(labels)}
    for guidance in guidances:
        imgs = ddim_sample(model, len(labels), steps=50, guidance=guidance, class_labels=labels, seed=1)
        pred = clf.predict(F.avg_pool2d(imgs.clamp(-1, 1), 2).flatten(1).numpy())
        key = f"g{guidance:g}"
        out[f"cfg_accuracy_{key}"] = round(float((pred == labels.numpy()).mean()), 4)
        if _bundled("features-digits"):
            acc = metrics.class_accuracy(imgs.clamp(-1, 1), labels, feature="features-digits")
            fd = metrics.frechet_distance(imgs.clamp(-1, 1), "train", feature="features-digits")
            out[f"features_digits_accuracy_{key}"] = _m(acc)
            out[f"fd_features_digits_{key}"] = _m(fd)
    return out


def _bundled(name: str) -> bool:
    return (assets.models_dir() / name / assets.CARD).is_file()


def _m(measurement) -> dict:
    """A companion.metrics Measurement as a small JSON dict."""
    return {"value": round(measurement.value, 4), "low": round(measurement.low, 4), "high": round(measurement.high, 4),
            "n": measurement.n, "feature": measurement.feature}


def _q_noisy_clf(model, progress):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(TRAIN_SCHEDULE)
    x, y = data.digits(16, "test")
    g = torch.Generator().manual_seed(7)
    acc = {}
    with torch.no_grad():
        for t in (0, 100, 250, 500, 750, 999):
            x_t = sched.add_noise(x, torch.randn(x.shape, generator=g), torch.full((x.shape[0],), t))
            acc[str(t)] = round(float((model(x_t, t).argmax(1) == y).float().mean()), 4)
    return {"test_accuracy_by_t": acc, "n_test": int(x.shape[0])}


def _q_autoencoder(vae, progress):
    x, _ = data.shapes("test", 32)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i : i + 250]).latent_dist.mean).sample for i in range(0, len(x), 250)])
    mse = float(F.mse_loss(rec.clamp(-1, 1), x))
    return {"test_mse": round(mse, 6), "test_psnr_db": round(10 * math.log10(4.0 / mse), 2), "n_test": int(x.shape[0])}


def _q_sr(model, progress):
    from . import metrics

    x, _ = data.shapes("test", 32)
    x = x[:SHAPES_EVAL_SAMPLES]
    low = F.avg_pool2d(x, 2)
    sr = ddim_sample(model, len(x), steps=SHAPES_EVAL_STEPS, cond=low, seed=1).clamp(-1, 1)
    up = F.interpolate(low, size=32, mode="bilinear", align_corners=False).clamp(-1, 1)

    def psnr(a):
        return round(10 * math.log10(4.0 / float(F.mse_loss(a, x))), 2)

    out = {"sampler": f"DDIM, {SHAPES_EVAL_STEPS} steps, from 2x2-pooled real test images", "n_test": len(x),
           "psnr_db": psnr(sr), "bilinear_psnr_db": psnr(up),
           "lowres_consistency_mse": round(float(F.mse_loss(F.avg_pool2d(sr, 2), low)), 6)}
    if _bundled("features-shapes"):
        out["fd_features_shapes"] = _m(metrics.frechet_distance(sr, "train", feature="features-shapes"))
        out["fd_features_shapes_bilinear"] = _m(metrics.frechet_distance(up, "train", feature="features-shapes"))
    return out


SHAPES_EVAL_STEPS = 20
SHAPES_EVAL_SAMPLES = 300


def _q_shapes_samples(model, progress):
    """FD of 300 DDIM samples to the shapes train set in the features-shapes space (lower is better).

    16x16 models are compared after bilinear upsampling to 32x32, with a reference set that went through
    the same 2x2 pooling and upsampling, so only the model's errors count.
    """
    from . import metrics

    imgs = ddim_sample(model, SHAPES_EVAL_SAMPLES, steps=SHAPES_EVAL_STEPS, seed=1)
    out = {"sampler": f"DDIM, {SHAPES_EVAL_STEPS} steps", "n_samples": SHAPES_EVAL_SAMPLES,
           "out_of_range_fraction": round(float((imgs.abs() > 1.05).float().mean()), 5)}
    imgs = imgs.clamp(-1, 1)
    real, _ = data.shapes("train", 32)
    size = model.image_shape[-1]
    if size != 32:
        imgs = F.interpolate(imgs, size=32, mode="bilinear", align_corners=False)
        real = F.interpolate(F.avg_pool2d(real, 32 // size), size=32, mode="bilinear", align_corners=False)
    if _bundled("features-shapes"):
        ref = "train" if size == 32 else metrics.reference("features-shapes", images=real)
        out["fd_features_shapes"] = _m(metrics.frechet_distance(imgs, ref, feature="features-shapes"))
    else:  # colour statistics only (mean and std per channel, 6-d) until features-shapes is bundled
        def stats(a):
            return torch.cat([a.mean(dim=(2, 3)), a.std(dim=(2, 3))], 1).double().numpy()

        out["fd_colour_stats_6d"] = round(_frechet(stats(imgs), stats(real)), 5)
    return out


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


QUALITY: dict[str, Callable] = {
    "digits-cond": _q_digits_cond,
    "digits-noisy-clf": _q_noisy_clf,
    "shapes-ae": _q_autoencoder,
    "shapes-sr32": _q_sr,
    "shapes-latent": _q_shapes_samples,
    "shapes-pixel": _q_shapes_samples,
    "shapes-base16": _q_shapes_samples,
    # design variants: the panels' default guidance only (one third of the measuring time)
    **{name: functools.partial(_q_digits_cond, guidances=(2.0,)) for name in GROUPS_BUILTIN["digits-design"]},
}


def measure_quality(folder: str | Path, recipe_name: str | None = None, *, progress: bool = False,
                    threads: int | None = None) -> dict:
    """Measure a trained model's quality with its recipe's measurement and record it in its card."""
    from .models import load

    _with_distillation()
    folder = Path(folder)
    card = assets.verify(folder)
    name = recipe_name or card.get("recipe")
    if name not in QUALITY:
        raise KeyError(f"no quality measurement for {name!r}; valid: {', '.join(QUALITY)}")
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS if threads is None else int(threads))
    t0 = time.perf_counter()
    try:
        quality = QUALITY[name](load(folder, device="cpu"), progress)
    finally:
        torch.set_num_threads(before)
    quality["measure_seconds"] = round(time.perf_counter() - t0, 1)
    card = dict(card, quality=quality)
    card.pop("files", None)
    return assets.write_card(folder, card)


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
def add_cli(subparsers) -> "argparse.ArgumentParser":  # noqa: F821
    """Add ``companion train NAME [--steps N] [--out DIR] [--resume] [--seed S]`` and ``companion train --list``.

    The sub-command's handler is stored as ``func`` and returns an int exit code.
    """
    p = subparsers.add_parser("train", help="train a bundled model from its recipe", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help=f"recipe name: {', '.join(RECIPES)}")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--out", default=None, help="output folder (default: assets/models/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint/")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads for torch (default {TRAIN_THREADS}; $COMPANION_TRAIN_THREADS); use all cores on an idle machine")
    p.add_argument("--no-measure", action="store_true", help="skip the quality measurement")
    p.set_defaults(func=cli_train)
    return p


def cli_train(args) -> int:
    import sys

    _with_distillation()
    if args.list or not args.name:
        for r in RECIPES.values():
            print(f"{r.name:18s} {r.steps:6d} steps  {r.description}")
        for g, members in GROUPS.items():
            print(f"{g:18s} {'group':>6s}        runs {', '.join(members)} in order")
        return 0 if args.list else 2
    if args.name not in RECIPES and args.name not in GROUPS:
        print(f"unknown recipe {args.name!r}; valid recipes: {', '.join([*RECIPES, *GROUPS])}", file=sys.stderr)
        return 2
    try:
        if args.name in GROUPS:
            outs = run_group(args.name, steps=args.steps, out_dir=args.out, resume=args.resume, seed=args.seed,
                             measure=not args.no_measure, threads=args.threads)
        else:
            outs = [run_recipe(args.name, steps=args.steps, out=args.out, resume=args.resume, seed=args.seed,
                               measure=not args.no_measure, threads=args.threads)]
    except (FileNotFoundError, ValueError, ModelError, assets.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for out in outs:
        card = assets.read_card(out)
        print(json.dumps({k: card.get(k) for k in ("recipe", "training_steps", "training_seconds", "final_loss", "quality")}, indent=2))
        print(f"saved to {out}")
    return 0


def run_group(group: str, *, out_dir: str | Path | None = None, config: dict | None = None, **kwargs) -> list[Path]:
    """Run the recipes of ``group`` in order (e.g. ``digits-pd``: every progressive-distillation stage).

    With ``out_dir`` each member goes to ``out_dir/NAME`` and a member whose recipe names the previous
    member as its teacher learns from that output instead of the bundled one. Other keyword arguments go
    to :func:`run_recipe` for every member (``steps`` is per member). A finished member is trained again
    unless ``resume=True`` finds its checkpoint complete.
    """
    _with_distillation()
    if group not in GROUPS:
        raise KeyError(f"unknown recipe group {group!r}; valid: {', '.join(GROUPS)}")
    outs: list[Path] = []
    for name in GROUPS[group]:
        cfg = dict(config or {})
        out = None
        if out_dir is not None:
            out = Path(out_dir) / name
            teacher = RECIPES[name].config.get("teacher")
            if outs and teacher == outs[-1].name:
                cfg["teacher"] = str(outs[-1])
        outs.append(run_recipe(name, out=out, config=cfg, **kwargs))
    return outs



# Recipe groups: one command that runs several recipes in order (companion.distill adds "digits-pd").
GROUPS: dict[str, list[str]] = dict(GROUPS_BUILTIN)


def _with_distillation() -> None:
    """Register the distillation recipes, tasks and measurements of :mod:`companion.distill`.

    That module builds on the classes here, so it is imported when recipes are looked up, not at import time.
    """
    from . import distill  # noqa: F401  (registers itself into RECIPES, _TASKS, QUALITY, GROUPS)
