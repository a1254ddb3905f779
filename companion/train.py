"""The training loop of every bundled model: ``companion train NAME`` runs a recipe (:mod:`companion.recipes`) here.

A task (:class:`Task`) says what differs between kinds of model: the network, the loss on a batch and how the
trained network is saved. :func:`run` trains one on the CPU (or the device picked by
:func:`companion.device.pick_device`) with a progress bar (loss, it/s, ETA), an exponential moving average (EMA)
of the weights (the EMA weights are what is saved), fixed seeds and resumable checkpoints, then writes the model in
diffusers layout with its card: recipe, config, seed, steps, training seconds and final loss (the recipe's quality
measurement, :mod:`companion.quality`, is added by :func:`companion.recipes.run_recipe`).

Every diffusion model is trained with the *linear* schedule :data:`companion.schedules.TRAIN_SCHEDULE`: the
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
import contextlib
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import assets, data
from .device import signals_interrupt
from .errors import CheckpointError
from .models import AUTOENCODER_KIND, FLOW_SCHEDULE, DiffusionModel, FlowModel, load
from .nets import NoisyClassifier
from .schedules import TRAIN_SCHEDULE, training_target

CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINT_EVERY_S = 60.0
# On a CPU shared by several processes, one thread per trainer is several times faster than two
# (measured here: 0.5-1.1 s vs 11 s per step for the digits UNet while other jobs ran). On an idle
# machine use all cores: `companion train NAME --threads 2` (or $COMPANION_TRAIN_THREADS) was 1.8x faster
# per step than one thread for digits-cond on the 2-core CPU.
TRAIN_THREADS = int(os.environ.get("COMPANION_TRAIN_THREADS", "1"))


@contextlib.contextmanager
def threads(n: int | None = None):
    """Run the enclosed training or measurement with ``n`` torch CPU threads (default :data:`TRAIN_THREADS`)."""
    n = TRAIN_THREADS if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# tasks: what differs between kinds of model
# ---------------------------------------------------------------------------------------------------------
def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Task(abc.ABC):
    """What differs between kinds: the network, the loss on a batch, how the trained EMA network is saved.

    ``rec`` is the recipe (:class:`companion.recipes.Recipe`; the task reads its ``name``), ``cfg`` its config
    with any overrides: ``data`` and ``size`` name the training images (:func:`companion.data.images`).
    """

    def __init__(self, rec, cfg: dict):
        self.rec, self.cfg = rec, cfg
        self.step = 0  # the training step the loop is at (phased configs, e.g. high_t phases, read it)
        self.x, self.y = data.images(cfg["data"], cfg["size"])
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


def high_t_at(high_t, step: int) -> dict | None:
    """The ``high_t`` spec in force at ``step``: ``high_t`` itself, or the last ``[start_step, spec]`` phase begun."""
    if not isinstance(high_t, (list, tuple)):
        return high_t
    starts = [p[0] for p in high_t]
    if not high_t or starts[0] != 0 or starts != sorted(set(starts)):
        raise ValueError(f"high_t phases need increasing start steps beginning at 0, got {high_t!r}")
    return [spec for start, spec in high_t if start <= step][-1]


class DiffusionTask(Task):
    """A pixel-space UNet (class-conditional with class dropout when the config has ``num_classes``)."""

    def build(self):
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
        target = training_target(self.cfg.get("prediction", "epsilon"), x0, noise, self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1))
        return F.mse_loss(self.net(x_t, t, **kwargs).sample, target)

    def timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Uniform training timesteps, or (``high_t``) a share of them drawn from one range.

        Short runs on images with large uniform regions learn the high-noise range last, and samplers start
        there: errors at t > ~600 drive every sampler out of range. ``high_t = {"fraction": f, "min": m}``
        draws a fraction f of the timesteps from [m, T); an optional ``"max": M`` ends the range at M instead
        (a model whose classes are decided at middle noise levels can see those more often). ``high_t`` may
        also be a list of ``[start_step, spec]`` phases (``spec`` a dict as above, or None for uniform): from
        each start step on, its spec applies, so a run continued with another range is one recipe.
        """
        T = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (n,), generator=g)
        high = high_t_at(self.cfg.get("high_t"), self.step)
        if high:
            lo, hi = high["min"], high.get("max", T)
            if not 0 <= lo < hi <= T or not 0 < high["fraction"] <= 1:
                raise ValueError(f"high_t needs 0 <= min < max <= {T} and 0 < fraction <= 1, got {high!r}")
            pick = torch.rand(n, generator=g) < high["fraction"]
            t = torch.where(pick, torch.randint(lo, hi, (n,), generator=g), t)
        return t

    def model(self, unet) -> DiffusionModel:
        c = self.cfg
        shape = (c["unet"]["out_channels"], c["size"], c["size"])
        return DiffusionModel(unet, TRAIN_SCHEDULE, name=self.rec.name, sample_shape=shape, num_classes=c.get("num_classes"),
                              prediction=c.get("prediction", "epsilon"))

    def save(self, ema, out, card):
        dtype = self.cfg.get("weights_dtype")
        return self.model(ema).save(out, card, weights_dtype=getattr(torch, dtype) if dtype else None)


class FlowTask(Task):
    """A rectified-flow UNet (flow matching with the linear path): x_t = (1 - t) x0 + t noise with t ~ U(0, 1),
    regressed on the velocity noise - x0; the network sees timestep t * 1000 (diffusers' flow-matching convention).
    Not a :class:`DiffusionTask`: it has no noise schedule, and no diffusion sampler may run on what it saves."""

    inputs = DiffusionTask.inputs  # the same batches and class dropout as the diffusion models

    def build(self):
        return UNet2DModel(**self.cfg["unet"])

    def loss(self, g):
        x0, labels, _ = self.inputs(g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(x0.shape[0], generator=g)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        kwargs = {"class_labels": labels} if labels is not None else {}
        n_train = FLOW_SCHEDULE["num_train_timesteps"]
        return F.mse_loss(self.net(x_t, t * n_train, **kwargs).sample, noise - x0)

    def model(self, unet) -> FlowModel:
        c = self.cfg
        shape = (c["unet"]["out_channels"], c["size"], c["size"])
        return FlowModel(unet, FLOW_SCHEDULE, name=self.rec.name, sample_shape=shape, num_classes=c.get("num_classes"))

    save = DiffusionTask.save  # float32 weights, or the config's weights_dtype


class SRTask(DiffusionTask):
    """A super-resolution stage: the UNet sees [x_t, upsampled low-resolution image]."""

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


class LatentTask(DiffusionTask):
    """A UNet on standardised latents of a trained autoencoder (the config's ``autoencoder``).

    ``latent_scale`` (default 1) multiplies the standardised latents, so the data have that standard deviation per
    channel. At a given timestep the signal-to-noise ratio is ``latent_scale ** 2`` times that of unit-variance data:
    the schedule is shifted towards less noise, as a low-resolution space needs (an 8x8 latent has little
    redundancy, so the same noise erases its content at smaller t than it erases a 32x32 image's). The scale is
    folded into the saved ``latent_std``, so loading and decoding need nothing new.
    """

    def __init__(self, rec, cfg):
        scale = cfg.get("latent_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"latent_scale must be a finite number > 0, got {scale!r}")
        self.vae = load(cfg["autoencoder"], device="cpu")
        super().__init__(rec, cfg)
        with torch.no_grad():
            z = torch.cat([self._encode(self.x[i : i + 250]) for i in range(0, self.x.shape[0], 250)])
            zf = torch.cat([self._encode(self.x[i : i + 250].flip(-1)) for i in range(0, self.x.shape[0], 250)])
        self.mean = z.mean(dim=(0, 2, 3))
        self.std = z.std(dim=(0, 2, 3)) / float(scale)
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


class AutoencoderTask(Task):
    """An ``AutoencoderKL``: reconstruction loss plus a small KL term."""

    def build(self):
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


class NoisyClassifierTask(Task):
    """A noise-aware classifier clf(x_t, t) for classifier guidance."""

    def build(self):
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



# ---------------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, never pickle)
# ---------------------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, net, ema, opt, g: torch.Generator, state: dict, extra: dict | None = None) -> None:
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


def _load_checkpoint(folder: Path, net, ema, opt, g: torch.Generator, extra: dict | None = None,
                     recipe: str | None = None) -> dict:
    """Restore a checkpoint; every way it can be wrong (missing, damaged, another recipe's, another network's)
    raises :class:`CheckpointError` naming the file and what to do."""
    what = "train without --resume (an earlier checkpoint may be kept beside it as *.previous-<time>)"
    tensors_path, meta_path = folder / "state.safetensors", folder / "state.json"
    for p in (tensors_path, meta_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {p.name} is missing; {what}")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or not {"step", "seed", "param_groups"} <= set(meta):
            raise ValueError("it lacks step, seed or param_groups")
    except ValueError as e:  # JSONDecodeError included
        raise CheckpointError(f"checkpoint file {meta_path} is damaged ({e}); {what}") from None
    if recipe is not None and meta.get("recipe", recipe) != recipe:
        raise CheckpointError(f"checkpoint {folder} belongs to recipe {meta['recipe']!r}, not {recipe!r}; "
                              f"resume it with `companion train {meta['recipe']} --resume`, or {what}")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"checkpoint file {tensors_path} is damaged ({type(e).__name__}: {e}); {what}") from None
    try:
        _load_into(net, tensors, "net.")
        _load_into(ema, tensors, "ema.")
        for name, module in (extra or {}).items():
            _load_into(module, tensors, f"extra.{name}.")
        opt_state: dict = {"state": {}, "param_groups": meta.pop("param_groups")}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[key] = v
        opt.load_state_dict(opt_state)
        g.set_state(tensors["rng"])
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {folder} does not fit this network or optimiser ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); {what}") from None
    return meta


def _load_into(module: torch.nn.Module, tensors: dict, prefix: str) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(want[wrong[0]].shape)})" if wrong else ""]
        raise CheckpointError(f"the checkpoint's {prefix.rstrip('.')} weights do not fit this network: "
                              + ", ".join(x for x in parts if x))
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------------
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    # warm-up: average over roughly the steps seen so far until the nominal horizon is reached
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pn in zip(ema.parameters(), net.parameters()):
            pe.lerp_(pn, 1 - d)
        for be, bn in zip(ema.buffers(), net.buffers()):
            be.copy_(bn)


RUNS_ENV = "COMPANION_RUNS"


def runs_dir() -> Path:
    """Where ``companion train`` writes unless told otherwise: ``$COMPANION_RUNS`` or ``./runs``. Never the bundled
    models: replacing one of those takes ``--install``."""
    return Path(os.environ.get(RUNS_ENV, "runs"))


def default_out(name: str, *, install: bool = False) -> Path:
    """The output folder of recipe ``name``: ``runs/NAME``, or the bundled ``assets/models/NAME`` with ``install``."""
    return assets.models_dir() / name if install else runs_dir() / name


def check_out(out: Path, *, install: bool) -> None:
    """Refuse to write into a bundled model's folder unless ``install`` says so (it would silently replace it)."""
    bundled = assets.models_dir().resolve()
    try:
        inside = out.resolve().parent == bundled
    except OSError:
        inside = False
    if inside and not install:
        raise ValueError(f"{out} is a bundled model's folder: training there replaces the bundled model; pass --install "
                         f"(install=True) to do that on purpose, or choose another --out (default: {runs_dir() / out.name})")


def keep_previous(path: Path) -> Path | None:
    """Move an existing ``path`` aside to ``path.previous-<UTC time>`` (never overwritten); returns where it went."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.previous-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.previous-{stamp}-{n}")
        n += 1
    path.rename(dest)
    return dest


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM; the checkpoint was saved first (``checkpoint`` says where)."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


def run(rec, cfg: dict, *, steps: int, seed: int, out: Path, resume: bool = False, progress: bool = True,
        install: bool = False, keep: bool = True) -> Path:
    """Train ``rec.task`` (a :class:`Task` subclass) with config ``cfg`` for ``steps`` steps; write the EMA model to ``out``.

    ``rec`` is the recipe (:class:`companion.recipes.Recipe`: name, description, default steps and seed, task);
    ``resume`` continues from ``<out>.checkpoint/``. Without ``resume`` an existing checkpoint (and, outside the
    bundled models, an existing output) is moved aside to ``*.previous-<time>`` first unless ``keep=False``.
    ``install`` is required to write into a bundled model's folder. Ctrl-C or SIGTERM save a checkpoint at the
    current step and raise :class:`Interrupted`. Returns ``out``.
    """
    name = rec.name
    out = Path(out)
    check_out(out, install=install)
    ckpt = out.with_name(out.name + CHECKPOINT_SUFFIX)
    if not resume and keep:
        kept = keep_previous(ckpt)
        if kept is not None:
            print(f"{name}: an earlier checkpoint was kept in {kept} (resume it with --resume after moving it back)")

    torch.manual_seed(seed)  # network initialisation
    task = rec.task(rec, cfg)
    net = task.net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    state = {"step": 0, "seconds": 0.0, "losses": [], "seed": seed, "recipe": name}
    if resume:
        if not (ckpt / "state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {ckpt}; run without --resume first")
        try:
            state = _load_checkpoint(ckpt, net, ema, opt, g, task.checkpoint_modules(), recipe=name)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        state.setdefault("recipe", name)
        if state["seed"] != seed:
            raise CheckpointError(f"checkpoint {ckpt} was trained with seed {state['seed']}, not {seed}")
    losses: list[float] = state["losses"]
    bar = tqdm(total=steps, initial=min(state["step"], steps), desc=name, disable=not progress, dynamic_ncols=True)
    last_ckpt = time.perf_counter()
    t_start = time.perf_counter() - state["seconds"]
    with signals_interrupt():  # SIGTERM and SIGHUP save a checkpoint as Ctrl-C does
        try:
            _loop(task, net, ema, opt, g, state, cfg, steps, name, bar, losses, ckpt, last_ckpt, t_start)
        except KeyboardInterrupt as e:
            bar.close()
            _save_checkpoint(ckpt, net, ema, opt, g, state, task.checkpoint_modules())
            raise Interrupted(f"{name}: interrupted ({e or 'Ctrl-C'}) at step {state['step']} of {steps}; checkpoint saved "
                              f"to {ckpt}; continue with --resume", ckpt) from None
    bar.close()
    if not resume and keep and not install:
        kept = keep_previous(out)
        if kept is not None:
            print(f"{name}: the earlier model in {out} was kept in {kept}")
    return _finish(rec, task, ema, state, losses, cfg, seed, steps, out)


def learning_rate(step: int, *, lr: float, warmup: int, steps: int | None = None, cooldown: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based): a linear warm-up over ``warmup`` steps, then constant; with
    ``cooldown`` (a fraction of ``steps``, 0 < cooldown <= 1) the last ``round(cooldown * steps)`` steps fall
    linearly towards 0 (warm-up, stable, decay). The cool-down lets the weights settle where a constant rate keeps
    them moving; because it only touches the last steps, a finished constant-rate run can be extended by one
    (``--resume`` with more steps and a ``cooldown``)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup}")
    rate = lr * min(1.0, (step + 1) / warmup)
    if cooldown:
        if steps is None or steps < 1 or not 0 < cooldown <= 1:
            raise ValueError(f"cooldown must be a fraction of the run's steps in (0, 1] with steps >= 1; "
                             f"got cooldown={cooldown!r}, steps={steps!r}")
        span = max(1, round(cooldown * steps))
        rate *= min(1.0, (steps - step) / span)
    return rate


def optimise(net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, *,
             lr: float, warmup: int, ema_decay: float, where: str, steps: int | None = None, cooldown: float = 0.0) -> None:
    """One optimisation step as every training loop takes it: the learning rate of :func:`learning_rate`, a
    refusal of a non-finite loss (``where`` names the run), gradients clipped to norm 1, the AdamW step, the EMA."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(step, lr=lr, warmup=warmup, steps=steps, cooldown=cooldown)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss became {loss.item()} at step {step}; lower lr (now {lr:g})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema_update(ema, net, ema_decay, step)


def _loop(task, net, ema, opt, g, state, cfg, steps, name, bar, losses, ckpt, last_ckpt, t_start) -> None:
    while state["step"] < steps:
        step = state["step"]
        task.step = step
        loss = task.loss(g)
        optimise(net, ema, opt, loss, step, lr=cfg["lr"], warmup=cfg["warmup"], ema_decay=cfg["ema"], where=name,
                 steps=steps, cooldown=cfg.get("cooldown", 0.0))
        losses.append(float(loss.detach()))
        state["step"] = step + 1
        state["seconds"] = time.perf_counter() - t_start
        bar.update(1)
        if state["step"] % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if time.perf_counter() - last_ckpt > CHECKPOINT_EVERY_S or state["step"] == steps:
            _save_checkpoint(ckpt, net, ema, opt, g, state, task.checkpoint_modules())
            last_ckpt = time.perf_counter()


def _finish(rec, task, ema, state, losses, cfg, seed, steps, out) -> Path:
    name = rec.name
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
    return out

