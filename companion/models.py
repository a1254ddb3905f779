"""Models the companion samples from, and how they are loaded.

:class:`DiffusionModel` is the one interface every sampler, metric and panel talks to. It wraps a
noise-prediction network (a diffusers ``UNet2DModel``, or anything with the same call) together with the
noise schedule it was trained with, its optional class conditioning, optional latent autoencoder and
optional low-resolution conditioning (a super-resolution stage). The exact-score oracles in
:mod:`companion.oracle` implement the same interface, so a sampler cannot tell them apart.

Checkpoints are read from safetensors only (diffusers ``from_pretrained(..., use_safetensors=True)``);
nothing is ever unpickled. Text-to-image pipelines (Stable Diffusion, SDXL, LCM, SD3) load through the same
:func:`load` as a :class:`companion.pipelines.PipelineModel`. :func:`feature_space_for` says which feature space
a model's images may be scored in (the one trained on its data), and refuses models from outside the companion.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import diffusers
import torch
import torch.nn.functional as F

from . import assets, features, nets, pipelines
from .assets import HUB_TIMEOUT_S
from .device import pick_device
from .errors import ModelError  # noqa: F401  (raised here; defined with the others)
from .schedules import PREDICTIONS, TRAIN_SCHEDULE, eps_from_v, eps_from_x0, sigma_map  # noqa: F401  (TRAIN_SCHEDULE: read here by callers)



class DiffusionModel(torch.nn.Module):
    """A trained eps-prediction network plus everything needed to sample from it.

    Attributes
    ----------
    name: str
    unet: the network, called as ``unet(x, t, class_labels=...)`` returning ``.sample`` (diffusers style).
    scheduler_config: the training noise schedule (a ``DDPMScheduler`` config dict).
    sample_shape: (C, H, W) of the space diffusion runs in (the latent shape for latent models).
    image_shape: (C, H, W) of decoded images, values in [-1, 1].
    num_classes: number of classes for a class-conditional model, else ``None``. The label
        ``num_classes`` (one past the last class) is the "no class" label used by classifier-free guidance.
    vae: optional autoencoder (diffusers ``AutoencoderKL``/``VQModel``) for latent models.
    latent_mean, latent_std: per-channel latent standardisation (latent = (vae_latent - mean) / std).
    cond_shape: (C, H, W) of the low-resolution conditioning image of a super-resolution stage, else ``None``.
    prediction: what the network outputs: ``"epsilon"`` (the noise), ``"sample"`` (x0; converted to eps by dividing
        by sigma, so its errors grow without bound as sigma -> 0) or ``"v_prediction"`` (v = alpha eps -
        sigma_vp x0, used by distilled few-step students: eps-prediction is ill-conditioned for x0 at the
        noisiest step, where alpha ~ 0.006). :meth:`predict_noise` always returns eps, so samplers see one
        interface.
    card: the asset card (manifest entry) the model was loaded with.
    """

    kind = "diffusion"
    scheduler_class = "DDPMScheduler"  # the diffusers class its saved training schedule is read with

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: dict | None = None,
        *,
        name: str = "unnamed",
        sample_shape: tuple[int, int, int] | None = None,
        image_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        vae: torch.nn.Module | None = None,
        latent_mean: torch.Tensor | list | None = None,
        latent_std: torch.Tensor | list | None = None,
        cond_shape: tuple[int, int, int] | None = None,
        prediction: str = "epsilon",
        card: dict | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ModelError(f"unknown network prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.name = name
        self.unet = unet
        self.scheduler_config = dict(scheduler_config or TRAIN_SCHEDULE)
        if sample_shape is None:
            cfg = getattr(unet, "config", None)
            if cfg is None:
                raise ModelError("sample_shape is required for a network without a diffusers config")
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            c = cfg.out_channels
            sample_shape = (c, size, size)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.vae = vae
        self.image_shape = tuple(int(s) for s in (image_shape or self.sample_shape))
        self.num_classes = num_classes
        self.cond_shape = tuple(cond_shape) if cond_shape else None
        c = self.sample_shape[0]
        self.register_buffer("latent_mean", torch.as_tensor(latent_mean if latent_mean is not None else [0.0] * c, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("latent_std", torch.as_tensor(latent_std if latent_std is not None else [1.0] * c, dtype=torch.float32).view(1, -1, 1, 1))
        self.card = dict(card or {})
        self._sha256: str | None = None
        self.eval()

    # ------------------------------------------------------------------ properties
    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def null_class(self) -> int:
        if self.num_classes is None:
            raise ModelError(f"model {self.name!r} is unconditional: it has no null class")
        return self.num_classes

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def dataset(self) -> str | None:
        """The companion data set it was trained on (its card's ``dataset`` or recipe ``data``), else None."""
        return self.card.get("dataset") or (self.card.get("config") or {}).get("data")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def sha256(self) -> str:
        """Identity of the weights: the asset folder digest when loaded from disk, else a digest of the tensors."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            h.update(json.dumps(self.scheduler_config, sort_keys=True).encode())
            self._sha256 = h.hexdigest()
        return self._sha256

    # ------------------------------------------------------------------ network call
    def predict_noise(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps(x_t, t): the network's noise prediction for a batch of noisy samples.

        ``t`` is a training timestep (int or float, scalar or shape (B,)); ``class_labels`` (B,) ints,
        where ``num_classes`` means "no class"; ``cond`` the low-resolution image for a super-resolution stage.
        """
        x_t = x
        if self.cond_shape is not None:
            if cond is None:
                raise ModelError(f"model {self.name!r} is a super-resolution stage: pass cond=<low-resolution images {self.cond_shape}>")
            x = torch.cat([x, self.upsample_cond(cond)], dim=1)
        elif cond is not None:
            raise ModelError(f"model {self.name!r} takes no conditioning image (cond)")
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        kwargs = {}
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long)
            kwargs["class_labels"] = class_labels.to(x.device)
        elif class_labels is not None:
            raise ModelError(f"model {self.name!r} is unconditional; it takes no class labels")
        out = self.unet(x, t, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        if self.prediction == "v_prediction":
            alpha, sigma = self.alpha_sigma(t, x_t)
            out = eps_from_v(out, x_t, alpha, sigma)
        elif self.prediction == "sample":
            alpha, sigma = self.alpha_sigma(t, x_t)
            out = eps_from_x0(out, x_t, alpha, sigma)
        return out

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) at (fractional) timesteps ``t`` (B,), shaped to broadcast over ``like``.

        Fractional timesteps use diffusers' log-sigma interpolation (the inverse of ``_sigma_to_t``), so the
        value matches the noise level a Karras/Euler scheduler actually put into ``x_t``.
        """
        smap = sigma_map(self)
        dev = like.device
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:  # the range check reads the values on the host: not possible inside a CUDA graph capture
            smap.check(t)
        s = smap.sigma_on(t, dev)
        alpha = (1.0 / torch.sqrt(1.0 + s**2)).to(like.dtype)
        sig = (s / torch.sqrt(1.0 + s**2)).to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.view(shape), sig.view(shape)

    def upsample_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return F.interpolate(cond, size=self.sample_shape[-2:], mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ latent space
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space diffusion runs in (standardised latents, or the images themselves)."""
        if self.vae is None:
            return images
        enc = self.vae.encode(images)
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
        return (z - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The space diffusion runs in -> images (nominally in [-1, 1]; not clamped)."""
        if self.vae is None:
            return x
        z = x * self.latent_std + self.latent_mean
        return self.vae.decode(z).sample

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path, card: dict | None = None, *, weights_dtype: torch.dtype | None = None) -> dict:
        """Write the model in diffusers layout (safetensors) plus its card; returns the card.

        ``weights_dtype=torch.float16`` stores the network's weights in half precision (half the size on disk;
        they are loaded back as float32).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        unet = self.unet if weights_dtype is None else torch.nn.Module.to(copy.deepcopy(self.unet), weights_dtype)
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        sched = folder / "scheduler"
        sched.mkdir(exist_ok=True)
        (sched / "scheduler_config.json").write_text(json.dumps(dict(self.scheduler_config, _class_name=self.scheduler_class), indent=2, sort_keys=True) + "\n")
        base = {
            "kind": self.kind,
            "name": self.name,
            "sample_shape": list(self.sample_shape),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "cond_shape": list(self.cond_shape) if self.cond_shape else None,
            "latent_mean": self.latent_mean.flatten().tolist() if self.vae is not None else None,
            "latent_std": self.latent_std.flatten().tolist() if self.vae is not None else None,
            "unet_class": type(self.unet).__name__,
            "prediction": self.prediction,
            "weights_dtype": str(weights_dtype or torch.float32).replace("torch.", ""),
            "vae_class": type(self.vae).__name__ if self.vae is not None else None,
        }
        merged = dict(self.card, **(card or {}), **base)
        merged.pop("files", None)
        self.card = assets.write_card(folder, merged)
        self._sha256 = None
        return self.card

    @classmethod
    def from_folder(cls, folder: str | Path, *, verify: bool = True) -> "DiffusionModel":
        folder = Path(folder)
        card = assets.verify(folder) if verify else assets.read_card(folder)
        if card.get("kind") != cls.kind:
            raise ModelError(f"{folder} holds a {card.get('kind')!r} asset, not a {cls.kind} model")
        _check_card(card, folder)
        unet_cls = getattr(diffusers, card.get("unet_class", "UNet2DModel"), None)
        if unet_cls is None:
            raise ModelError(f"{folder / assets.CARD}: unet_class {card.get('unet_class')!r} is not a diffusers class")
        unet = _from_pretrained(unet_cls, folder / "unet")
        _check_card_against_network(card, unet, folder)
        vae = None
        if card.get("vae_class"):
            vae = _from_pretrained(getattr(diffusers, card["vae_class"]), folder / "vae")
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        sched = {k: v for k, v in sched.items() if not k.startswith("_")}
        model = cls(
            unet, sched, name=card.get("name", folder.name), sample_shape=card["sample_shape"], image_shape=card.get("image_shape"),
            num_classes=card.get("num_classes"), vae=vae, latent_mean=card.get("latent_mean"), latent_std=card.get("latent_std"),
            cond_shape=card.get("cond_shape"), prediction=card.get("prediction", "epsilon"), card=card,
        )
        model._sha256 = assets.folder_sha256(folder)
        return model


# The training schedule of a rectified-flow model: diffusers' flow-matching convention, sigma = t in [0, 1] and the
# network's timestep t * num_train_timesteps; shift 1 keeps the path linear (x_t = (1 - t) x0 + t noise).
FLOW_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}


class FlowModel(DiffusionModel):
    """A rectified-flow (flow-matching) network: it predicts the velocity v = noise - x0 of the linear path
    x_t = (1 - t) x0 + t noise (Liu et al. 2209.03003; Lipman et al. 2210.02747), at timestep t * 1000.

    It has the :class:`DiffusionModel` interface with ``prediction == "flow"``: :meth:`predict_noise` returns the
    velocity, which diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``, ...) integrate from
    sigma = 1 to 0; :func:`companion.sampling.sample` runs only the samplers with a flow-matching form on it and
    refuses the others by name. Guidance combines velocities as it combines eps (both are affine in the score).
    """

    kind = "flow"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict | None = None, *, prediction: str = "flow", **kwargs):
        if prediction != "flow":
            raise ModelError(f"a flow model predicts the velocity (prediction='flow'), got prediction={prediction!r}")
        super().__init__(unet, dict(scheduler_config or FLOW_SCHEDULE), prediction="epsilon", **kwargs)
        self.prediction = "flow"  # the velocity passes through predict_noise unconverted


class GuidanceDistilledModel(DiffusionModel):
    """A class-conditional network that does in ONE call what classifier-free guidance does in two (guidance
    distillation, Meng et al., arXiv 2210.03142): it takes the guidance scale w as an input and predicts the guided
    noise eps_u + w (eps_c - eps_u) of its teacher.

    The scale enters through the class embedding: the network has one embedding row per (class, scale) pair of
    ``guidance_grid`` (the scales it was trained on), row ``label + (num_classes + 1) * index(w)``, so it is an
    ordinary diffusers ``UNet2DModel``. A scale off the grid is refused, naming the grid: the network has never seen
    it. ``guidance_embedded`` tells the sampler to pass the scale in and run no second (unconditional) pass; a run
    without a scale uses ``default_guidance``.
    """

    kind = "guidance-distilled"
    guidance_embedded = True

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict | None = None, *, guidance_grid=None,
                 default_guidance: float | None = None, **kwargs):
        super().__init__(unet, scheduler_config, **kwargs)
        grid = guidance_grid if guidance_grid is not None else self.card.get("guidance_grid")
        if not grid or self.num_classes is None:
            raise ModelError(f"a guidance-distilled model needs num_classes and a guidance_grid (the scales it was "
                             f"trained on), got num_classes={self.num_classes!r}, guidance_grid={grid!r}")
        self.guidance_grid = tuple(float(w) for w in grid)
        default = default_guidance if default_guidance is not None else self.card.get("default_guidance", self.guidance_grid[0])
        self.default_guidance = self.check_guidance(default)

    def check_guidance(self, guidance) -> float:
        """``guidance`` as a float if it is one of the scales the network was trained on; ModelError naming them otherwise."""
        w = float(guidance)
        if not any(abs(w - g) < 1e-9 for g in self.guidance_grid):
            grid = ", ".join(f"{g:g}" for g in self.guidance_grid)
            raise ModelError(f"model {self.name!r} was distilled for guidance scales {grid} only (it takes the scale as an "
                             f"input and never saw {w:g}); choose one of them")
        return w

    def predict_noise(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                      guidance_scale: float | None = None) -> torch.Tensor:
        """The guided eps at scale ``guidance_scale`` (default :attr:`default_guidance`) in one network call."""
        w = self.default_guidance if guidance_scale is None else self.check_guidance(guidance_scale)
        index = min(range(len(self.guidance_grid)), key=lambda i: abs(self.guidance_grid[i] - w))
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long)
        return super().predict_noise(x, t, class_labels.to(x.device) + (self.num_classes + 1) * index, cond)

    def save(self, folder, card: dict | None = None, *, weights_dtype: torch.dtype | None = None) -> dict:
        return super().save(folder, dict(card or {}, guidance_grid=list(self.guidance_grid),
                                         default_guidance=self.default_guidance), weights_dtype=weights_dtype)


CARD_FIELDS = {"sample_shape": list, "image_shape": list, "num_classes": int, "cond_shape": list, "prediction": str,
               "latent_mean": list, "latent_std": list, "vae_class": str, "unet_class": str, "name": str}


def _check_card(card: dict, folder: Path) -> None:
    """A diffusion card's fields have the types the loader needs (a hand-edited card fails here, by name)."""
    path = folder / assets.CARD
    if "sample_shape" not in card:
        raise ModelError(f"{path} has no sample_shape (the (C, H, W) the network samples); restore the card or retrain")
    for key, kind in CARD_FIELDS.items():
        v = card.get(key)
        if v is not None and not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ModelError(f"{path}: field {key!r} must be {kind.__name__}, got {v!r}")
    for key in ("sample_shape", "image_shape", "cond_shape"):
        v = card.get(key)
        if v is not None and (len(v) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)):
            raise ModelError(f"{path}: {key} must be three positive ints (C, H, W), got {v!r}")


def _check_card_against_network(card: dict, unet, folder: Path) -> None:
    """The card says what the network is; a card that disagrees with the weights would sample garbage silently."""
    cfg = getattr(unet, "config", None)
    if cfg is None:
        return
    path = folder / assets.CARD
    c, h, _ = card["sample_shape"]
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    if cfg.out_channels != c or size != h:
        raise ModelError(f"{path}: sample_shape {card['sample_shape']} disagrees with the network "
                         f"({cfg.out_channels} channels, {size} px): the card or the weights were changed")
    embeds = getattr(cfg, "num_class_embeds", None)
    n = card.get("num_classes")
    per_class = len(card.get("guidance_grid") or [None])  # a guidance-distilled network: a row per (class, scale)
    if (embeds is None) != (n is None) or (n is not None and embeds != (n + 1) * per_class):
        raise ModelError(f"{path}: num_classes {n!r} disagrees with the network's {embeds!r} class embeddings "
                         f"(num_classes + 1: the last one is 'no class'; times the guidance scales of a guidance-distilled "
                         f"model)")


def _from_pretrained(klass, folder: Path):
    """diffusers from_pretrained restricted to safetensors, with a clear error when weights are missing."""
    if not folder.is_dir():
        raise ModelError(f"missing folder {folder}")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no .safetensors weights (pickle checkpoints are never loaded)")
    try:
        net = klass.from_pretrained(folder, use_safetensors=True).eval()
    except Exception as e:  # diffusers raises a variety of types for bad files
        raise ModelError(f"could not load {klass.__name__} from {folder}: {e}") from e
    if any(p.dtype != torch.float32 for p in net.parameters()):
        # float32 whatever the stored precision: samplers and metrics assume it (speed options convert later)
        net = net.float()
    return net


AUTOENCODER_KIND = "autoencoder"


def load_autoencoder(folder: str | Path, *, verify: bool = True) -> torch.nn.Module:
    """A bundled autoencoder (card kind ``"autoencoder"``): the diffusers ``AutoencoderKL``/``VQModel`` in ``vae/``."""
    folder = Path(folder)
    card = assets.verify(folder) if verify else assets.read_card(folder)
    if card.get("kind") != AUTOENCODER_KIND:
        raise ModelError(f"{folder} holds a {card.get('kind')!r} asset, not an autoencoder")
    vae = _from_pretrained(getattr(diffusers, card.get("vae_class", "AutoencoderKL")), folder / "vae")
    vae.card = card
    vae.name = card.get("name", folder.name)
    return vae


# Every kind of asset a card can name, and the function that loads a folder of that kind. One explicit table:
# a new kind is added here (its module is imported above), never registered by an import side effect.
KINDS: dict[str, Callable[[Path], object]] = {
    DiffusionModel.kind: DiffusionModel.from_folder,
    FlowModel.kind: FlowModel.from_folder,
    GuidanceDistilledModel.kind: GuidanceDistilledModel.from_folder,
    AUTOENCODER_KIND: load_autoencoder,
    nets.NOISY_CLASSIFIER_KIND: nets.NoisyClassifier.from_folder,
    features.KIND: features.load_feature_folder,
}


def bundled_names() -> list[str]:
    return sorted(assets.manifest())


def _kind_loader(folder: Path, kind) -> Callable:
    if kind not in KINDS:
        raise ModelError(f"{folder}: unknown asset kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file() or (folder / "config.json").is_file()


def _unet_class(cfg_path: Path) -> str | None:
    try:
        return json.loads(cfg_path.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e})") from e


def _load_vq(folder: Path):
    """An LDM pipeline's ``vqvae/`` and its latent scaling: (VQModel, latent std, decoded image shape factor)."""
    vq = _from_pretrained(diffusers.VQModel, folder / "vqvae")
    return vq, 1.0 / float(vq.config.scaling_factor), 2 ** (len(vq.config.block_out_channels) - 1)


def from_diffusers_folder(folder: str | Path, *, name: str | None = None) -> DiffusionModel:
    """A :class:`DiffusionModel` from a UNet2DModel folder saved by diffusers (e.g. ``DDPMPipeline.save_pretrained``).

    The folder holds ``unet/`` (a ``UNet2DModel`` in safetensors) and ``scheduler/scheduler_config.json``
    (the training schedule), or a bare UNet (``config.json`` + weights) with ``scheduler_config.json`` beside it.
    A latent-diffusion folder (``unet/`` + ``vqvae/``, the layout of ``LDMPipeline``) loads as a latent model that
    decodes through its VQ autoencoder, as the pipeline does (``latents / scaling_factor``, then ``vqvae.decode``).
    """
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    cfg_path = unet_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} is not a diffusers UNet folder: {cfg_path} is missing")
    cls_name = _unet_class(cfg_path)
    if cls_name != "UNet2DModel":
        raise ModelError(f"{unet_dir} holds a {cls_name!r}, not a UNet2DModel: the companion samples from "
                         f"unconditional or class-conditional UNet2DModel pipelines (e.g. DDPMPipeline/DDIMPipeline/LDMPipeline) "
                         f"and from the text-to-image pipelines {', '.join(pipelines.FAMILIES)} (with their model_index.json)")
    sched_path = next((p for p in (folder / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json") if p.is_file()), None)
    if sched_path is None:
        raise ModelError(f"{folder} has no scheduler/scheduler_config.json: the training noise schedule is unknown; "
                         f"save the whole pipeline (pipeline.save_pretrained(dir)), not only the UNet")
    sched = {k: v for k, v in json.loads(sched_path.read_text()).items() if not k.startswith("_")}
    unet = _from_pretrained(diffusers.UNet2DModel, unet_dir)
    if unet.config.num_class_embeds is not None:
        raise ModelError(f"{unet_dir}: class-conditional UNets from outside the companion are not supported "
                         f"(their 'no class' label is unknown); companion assets record it in companion.json")
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    if unet.config.in_channels != unet.config.out_channels:
        raise ModelError(f"{unet_dir}: in_channels={unet.config.in_channels} != out_channels={unet.config.out_channels}; "
                         f"conditioned UNets need a companion card that says what the extra channels are")
    c = unet.config.out_channels
    vae, std, image_shape = None, None, None
    if (folder / "vqvae").is_dir():
        vae, scale, factor = _load_vq(folder)
        std, image_shape = [scale] * c, (vae.config.out_channels, size * factor, size * factor)
    card = {"kind": "diffusion", "name": name or folder.name, "source": str(folder), "scheduler_config": sched,
            "origin": "diffusers", "dataset": None}
    return DiffusionModel(unet, sched, name=name or folder.name, sample_shape=(c, size, size), image_shape=image_shape,
                          vae=vae, latent_std=std, card=card)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text


PIPELINE_OPTIONS = ("torch_dtype", "variant", "lora", "lora_scale")


def _from_diffusers(folder: Path, name: str | None, device, options: dict):
    """A diffusers folder by its pipeline class: a text-to-image pipeline, or a UNet2DModel pipeline."""
    class_name = pipelines.read_model_index(folder)["_class_name"] if (folder / "model_index.json").is_file() else None
    if class_name in pipelines.FAMILIES:
        return pipelines.from_pretrained(folder, name=name, device=pick_device(device), **options)
    if class_name is not None and class_name not in pipelines.UNET_PIPELINES:
        raise pipelines.refuse_class(class_name, str(folder))
    given = [k for k in PIPELINE_OPTIONS if options.get(k) not in (None, 1.0, False) and k != "variant"]
    if given:
        raise ModelError(f"{', '.join(given)} apply to text-to-image pipelines ({', '.join(pipelines.FAMILIES)}); "
                         f"{folder} holds a UNet2DModel pipeline, which runs in float32 (reduced precision: sample(..., speed='bf16'))")
    return from_diffusers_folder(folder, name=name)


def from_hub(repo_id: str, *, timeout: float = HUB_TIMEOUT_S, revision: str | None = None, local_files_only: bool = False,
             device=None, **options):
    """A Hugging Face Hub diffusers repository (e.g. ``google/ddpm-cifar10-32``, ``stabilityai/sd-turbo``) as a model.

    Only what the pipeline needs is fetched (:func:`companion.pipelines.allow_patterns`: its component folders, the
    chosen ``variant``, safetensors weights; never pickles). A cached copy loads offline; an uncached id raises
    :class:`ModelError` within about ``timeout`` seconds when the Hub is unreachable or ``HF_HUB_OFFLINE`` is set.
    """
    path = pipelines.fetch(repo_id, revision=revision, variant=options.get("variant"), local_files_only=local_files_only,
                           timeout=timeout)
    if not _is_diffusers_folder(path):
        raise ModelError(f"Hub repository {repo_id!r} holds no diffusers pipeline (no model_index.json or config.json)")
    return _from_diffusers(path, repo_id, device, dict(options, local_files_only=local_files_only))


def load(name_or_path: str | Path, *, device: str | torch.device | None = None, torch_dtype=None, variant: str | None = None,
         revision: str | None = None, local_files_only: bool = False, lora=None, lora_scale: float = 1.0):
    """Load a model: a bundled name, a companion asset folder, a diffusers pipeline folder, or a Hub id.

    - bundled name (``assets/models/<name>``) or any folder with a ``companion.json`` card: loaded by the
      card's kind (diffusion models, autoencoders, classifiers, feature networks), sha256 checked;
    - a folder saved by diffusers: a UNet2DModel pipeline (``DDPMPipeline``, ``LDMPipeline`` with its VQ
      autoencoder, ...) as a :class:`DiffusionModel`; a text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL,
      Turbo, LCM, SD3) as a :class:`companion.pipelines.PipelineModel`;
    - ``owner/name`` Hub id (e.g. ``google/ddpm-cifar10-32``): downloaded once when online, then cached.

    Pipeline options: ``torch_dtype`` (float32, float16, bfloat16; checked to run on ``device``), ``variant``
    (``"fp16"``: the ``*.fp16.safetensors`` files), ``revision`` (a Hub branch, tag or commit),
    ``local_files_only`` (never ask the Hub), ``lora`` (LoRA weights, e.g. LCM-LoRA: a Hub id, folder or
    ``.safetensors`` file; needs the ``hub`` extra) fused at ``lora_scale``.

    Raises :class:`ModelError` (or :class:`companion.assets.AssetError` for a corrupted bundled file)
    naming the bad name/file and what to do.
    """
    text = str(name_or_path)
    options = {"torch_dtype": torch_dtype, "variant": variant, "lora": lora, "lora_scale": lora_scale}
    folder = assets.models_dir() / text
    if text and "/" not in text and folder.is_dir() and not (folder / assets.CARD).is_file():
        raise ModelError(f"bundled model folder {folder} has no {assets.CARD} (its card was deleted or never written): "
                         f"{assets.restore_hint(folder / assets.CARD, text)}")
    if not (folder / assets.CARD).is_file():
        folder = Path(text).expanduser()
    if (folder / assets.CARD).is_file():
        given = [k for k in ("torch_dtype", "variant", "lora") if options[k] is not None]
        if given or revision is not None:
            raise ModelError(f"{', '.join(given + (['revision'] if revision else []))} apply to diffusers pipelines and Hub "
                             f"models; {text!r} is a companion asset (float32; reduced precision: sample(..., speed='bf16'))")
        card = assets.read_card(folder)
        model = _kind_loader(folder, card.get("kind"))(folder)
    elif folder.is_dir() and _is_diffusers_folder(folder):
        model = _from_diffusers(folder, None, device, dict(options, local_files_only=local_files_only))
    elif not folder.exists() and _looks_like_hub_id(text):
        model = from_hub(text, revision=revision, local_files_only=local_files_only, device=device, **options)
    else:
        names = bundled_names()
        raise ModelError(
            f"unknown model {text!r}: not a bundled name, a companion asset folder, a diffusers pipeline folder "
            f"nor a Hub id (owner/name); bundled: {', '.join(names) or '(none)'}"
        )
    return model.to(pick_device(device))


# ---------------------------------------------------------------------------------------------- which feature space

FOREIGN = "outside the companion"  # model_dataset() of a Hub, diffusers-folder or pipeline model


def model_dataset(model) -> str | None:
    """The data set ``model`` was trained on as far as the companion knows: a bundled model's (``digits``,
    ``shapes``), :data:`FOREIGN` for a model from the Hub, a diffusers folder or a pipeline (its data is not one
    of the companion's), None when nothing says (a model built in code)."""
    card = getattr(model, "card", None) or {}
    if getattr(model, "kind", None) == pipelines.PipelineModel.kind or card.get("origin") == "diffusers":
        return FOREIGN
    return getattr(model, "dataset", None) or card.get("dataset") or (card.get("config") or {}).get("data")


def feature_spaces() -> dict[str, dict]:
    """The bundled feature networks the metrics measure in: name -> {dataset, in_channels, image_size} (from their
    cards). A held-out judge (card role ``"judge"``, e.g. ``judge-shapes``) is a classifier only, never a metric space."""
    return {name: {"dataset": c.get("dataset"), "in_channels": (c.get("config") or {}).get("in_channels"),
                   "image_size": (c.get("config") or {}).get("image_size")}
            for name, c in assets.manifest().items()
            if c.get("kind") == features.KIND and c.get("role", features.METRICS) == features.METRICS}


def _spaces_text() -> str:
    return "; ".join(f"{n} (trained on {s['dataset']}, {s['in_channels']}x{s['image_size']}x{s['image_size']} images)"
                     for n, s in feature_spaces().items()) or "(none bundled)"


def feature_space_for(model, feature: str | None = None) -> str:
    """The feature network ``model``'s images may be scored in without a reference set: the one trained on its data.

    Refuses (:class:`ModelError`) a model from outside the companion — its images would be scored against data it
    was never trained on (CIFAR samples against shapes) — and an explicit ``feature`` trained on other data. A model
    built in code (no data set on record) gets the bundled network for its channel count.
    """
    dataset = model_dataset(model)
    name = getattr(model, "name", "model")
    if dataset == FOREIGN:
        raise ModelError(
            f"model {name!r} comes from outside the companion (its training data is not one the companion knows), so "
            f"image metrics in a bundled feature space would score it against the wrong data. Feature spaces: "
            f"{_spaces_text()}. Pass real images of the model's own data as the reference set "
            f"(bench.sweep(..., reference_images=<tensor (N, {model.image_shape[0]}, H, W) in [-1, 1]>, feature=<a space above>)), "
            f"or measure speed only (metrics=())")
    spaces = feature_spaces()
    if feature is not None:
        trained_on = spaces.get(feature, {}).get("dataset")
        if dataset is not None and trained_on is not None and trained_on != dataset:
            raise ModelError(f"feature space {feature!r} was trained on {trained_on}, but model {name!r} on {dataset}; "
                             f"use {', '.join(n for n, s in spaces.items() if s['dataset'] == dataset) or 'a reference set'}")
        return feature
    if dataset is not None:
        match = [n for n, s in spaces.items() if s["dataset"] == dataset]
        if not match:
            raise ModelError(f"no bundled feature space was trained on {dataset!r} (model {name!r}); feature spaces: "
                             f"{_spaces_text()}; pass a reference set")
        return match[0]
    return features.default_feature_net_name(model.image_shape)
