"""Text-to-image pipelines from diffusers behind the companion's model interface.

:class:`PipelineModel` wraps a loaded ``DiffusionPipeline`` — Stable Diffusion 1.x/2.x (and SD-Turbo, LCM
checkpoints saved as such), SDXL (and SDXL-Turbo), the latent consistency pipeline, Stable Diffusion 3 (a
flow-matching transformer) — so that :func:`companion.sampling.sample` drives it like any other model:

* the prompt is encoded by the pipeline's own ``encode_prompt`` (:meth:`PipelineModel.text_conditioning`)
  into the fields of :class:`companion.denoiser.Conditioning` (``text``, ``null_text``, ``extra``,
  ``null_extra``); classifier-free guidance is the denoiser's one combination, never a copy here;
* the network call (:meth:`PipelineModel.predict_noise`) passes what the network needs
  (``encoder_hidden_states``, SDXL's ``added_cond_kwargs``, LCM's ``timestep_cond``, SD3's
  ``pooled_projections``) and returns eps for diffusion models (a v-prediction network is converted) or the
  flow velocity for flow-matching models (``prediction == "flow"``);
* the registry's samplers run on the pipeline's training schedule (``from_config``); on a flow-matching model
  only the samplers with a flow-matching form run (:func:`flow_scheduler`), the others are refused by name.

Loading (:func:`from_pretrained`) reads ``model_index.json`` first and fetches only the component folders the
companion uses, the chosen variant and safetensors weights (:func:`allow_patterns`); LoRA weights (LCM-LoRA)
go through diffusers' ``load_lora_weights`` and need ``peft`` (the ``hub`` extra).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import diffusers
import torch

from . import samplers as registry
from .assets import HUB_TIMEOUT_S, hub_unavailable
from .errors import ModelError, SamplerError, SamplingError
from .schedules import sigma_map

# ---------------------------------------------------------------------------------------------- what is supported


@dataclass(frozen=True)
class Family:
    """One pipeline class the companion drives: its network's attribute, how its prompt is encoded, its output."""

    key: str
    network: str  # the pipeline attribute of the denoising network
    flow: bool = False  # a flow-matching network (velocity output, shifted sigma grid)
    pooled: str | None = None  # keyword the pooled text embedding goes to (None: not used)


FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family("sd", "unet"),
    "LatentConsistencyModelPipeline": Family("lcm", "unet"),
    "StableDiffusionXLPipeline": Family("sdxl", "unet", pooled="text_embeds"),
    "StableDiffusion3Pipeline": Family("sd3", "transformer", flow=True, pooled="pooled_projections"),
}
# Pipelines of a single UNet2DModel (with a VQ autoencoder for LDM): loaded as a companion DiffusionModel.
UNET_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "LDMPipeline")
# Components no sampling path reads: never downloaded, passed as None.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies/merges, sentencepiece models
HUB_EXTRA = "pip install 'companion[hub]'"


def supported() -> list[str]:
    """Every pipeline class :func:`companion.models.load` accepts."""
    return [*FAMILIES, *UNET_PIPELINES]


def refuse_class(class_name, where) -> ModelError:
    return ModelError(f"{where} holds a {class_name!r}, which the companion does not sample from; supported pipeline "
                      f"classes: {', '.join(supported())}")


# ---------------------------------------------------------------------------------------------- what to download


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelError(f"{path} names no pipeline class (_class_name); it is not a diffusers model_index.json")
    return index


def components(index: dict) -> list[str]:
    """The component folders a pipeline needs: every named one except the unused and the empty ([null, null])."""
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and v[1] is not None and k not in UNUSED_COMPONENTS)


def _is_variant(name: str) -> bool:
    """``model.fp16.safetensors`` / ``model.fp16-00001-of-00002.safetensors`` (not ``model.safetensors``)."""
    return len(PurePosixPath(name).name.split(".")) > 2


def _weights(files: list[str], variant: str | None) -> list[str]:
    """The safetensors files of one folder for ``variant``; diffusers' fallback: the plain ones when the folder has
    no file of that variant."""
    weights = [f for f in files if f.endswith(".safetensors")]
    if variant is not None:
        chosen = [f for f in weights if f".{variant}." in PurePosixPath(f).name or f".{variant}-" in PurePosixPath(f).name]
        if chosen:
            return chosen
    return [f for f in weights if not _is_variant(f)]


def allow_patterns(index: dict | None, files: list[str], variant: str | None = None) -> list[str]:
    """The exact files to fetch from a repository holding ``files`` (paths relative to its root).

    ``index``: its ``model_index.json`` (``None``: a bare model folder at the root). Only the component folders
    the pipeline needs are fetched (:func:`components`), each with its configs and tokenizer files and the
    safetensors weights of ``variant`` (or the plain ones where that variant does not exist); a component with
    pickle weights only is refused (pickles are never loaded).
    """
    folders = components(index) if index is not None else [""]
    plan = ["model_index.json"] if index is not None else []
    for comp in folders:
        inside = [f for f in files if str(PurePosixPath(f).parent) == (comp or ".")]
        plan += [f for f in inside if f.endswith(CONFIG_SUFFIXES) and f != "model_index.json"]
        if index is not None and index[comp][0] not in ("diffusers", "transformers"):
            continue
        if comp == "scheduler" or "tokenizer" in comp:
            continue
        weights = _weights(inside, variant)
        if not weights:
            pickles = [f for f in inside if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
            what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
            raise ModelError(f"component {comp or '(root)'!r} has {what}; the companion loads safetensors only (pickles "
                             f"are never unpickled){'' if variant is None else f'; variant {variant!r} was asked for'}")
        plan += weights
    return sorted(set(plan))


# ---------------------------------------------------------------------------------------------- the Hub


def _hub_message(repo_id: str, revision: str | None, e: Exception) -> str:
    """What went wrong fetching ``repo_id`` and how to fix it, by the kind of Hub error."""
    from huggingface_hub import errors  # optional: only a Hub id needs it

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, errors.GatedRepoError):
        return (f"Hub repository {repo_id!r} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
                f"(`hf auth login` or HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"Hub repository {repo_id!r} does not exist or is private: check the name, or log in (`hf auth login` or "
                f"HF_TOKEN) if it is yours")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"Hub repository {repo_id!r} has no revision {revision!r}; use a branch, tag or commit it has"
    if isinstance(e, errors.EntryNotFoundError):
        return f"Hub repository {repo_id!r}{at} has no model_index.json: it is not a diffusers pipeline repository"
    return f"could not fetch {repo_id!r}{at} from the Hugging Face Hub: {type(e).__name__}: {e}"


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of ``repo_id`` when its model_index.json is in the Hugging Face cache."""
    from huggingface_hub import hf_hub_download  # optional: only a Hub id needs it

    for name in ("model_index.json", "config.json"):
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=True)).parent
        except Exception:  # not cached (every kind of miss means the same here)
            continue
    return None


def fetch(repo_id: str, *, revision: str | None = None, variant: str | None = None, local_files_only: bool = False,
          timeout: float = HUB_TIMEOUT_S) -> Path:
    """The local folder of Hub repository ``repo_id`` with only what :func:`allow_patterns` names.

    With ``local_files_only`` or without a reachable Hub the cached copy is used; otherwise the repository's file
    list and its model_index.json are read first, then only the planned files are fetched (those already cached are
    not downloaded again). Raises :class:`ModelError` naming the fix for an unknown, private or gated repository, a
    missing revision, or no network.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download  # optional: only a Hub id needs it

    cached = _cached_snapshot(repo_id, revision)
    if local_files_only:
        if cached is None:
            raise ModelError(f"Hub model {repo_id!r} is not in the local Hugging Face cache and local_files_only=True; "
                             f"download it once with network access, or load a folder saved with save_pretrained(dir)")
        return cached
    why = hub_unavailable(timeout)
    if why:
        if cached is not None:
            return cached
        raise ModelError(
            f"Hub model {repo_id!r} is not in the local Hugging Face cache and the Hub ({constants.ENDPOINT}) is not "
            f"reachable ({why}). Connect once (and unset HF_HUB_OFFLINE) to download it, or load a pipeline folder "
            f"saved with save_pretrained(dir) via load(dir)")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout * 4)))
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        index = None
        if "model_index.json" in files:
            index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision)).read_text())
        elif "config.json" not in files:
            raise ModelError(f"Hub repository {repo_id!r} has neither model_index.json nor config.json: "
                             f"it is not a diffusers repository")
        plan = allow_patterns(index, files, variant)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=plan))
    except ModelError:
        raise
    except Exception as e:  # huggingface_hub raises many kinds; each is translated into its fix
        raise ModelError(_hub_message(repo_id, revision, e)) from e


# ---------------------------------------------------------------------------------------------- dtypes


def resolve_dtype(torch_dtype) -> torch.dtype:
    """``torch_dtype`` as a torch dtype: float32, float16 or bfloat16 (or their names: fp16, bf16, ...)."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, str):
        key = torch_dtype.removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    elif torch_dtype in DTYPES.values():
        return torch_dtype
    raise ModelError(f"torch_dtype={torch_dtype!r} is not supported; valid: torch.float32, torch.float16, torch.bfloat16 "
                     f"(or {', '.join(DTYPES)})")


def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in: a convolution, a group norm and fused attention are tried."""
    try:
        x = torch.ones(1, 4, 4, 4, device=device, dtype=dtype)
        y = torch.nn.functional.conv2d(x, torch.ones(4, 4, 1, 1, device=device, dtype=dtype))
        torch.nn.functional.group_norm(y, 2)
        q = y.flatten(2)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise ModelError(f"torch_dtype={dtype} cannot run on {device} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"use torch_dtype=torch.float32{' or torch.bfloat16' if device.type == 'cpu' else ''}, "
                         f"or another device") from e


# ---------------------------------------------------------------------------------------------- identity


def _file_identity(path: Path) -> str:
    """A file's content identity: its Hugging Face cache blob name (the sha256 of large files) or its sha256."""
    if path.is_symlink() and path.resolve().parent.name == "blobs":
        return path.resolve().name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, index: dict) -> str:
    """One digest of the files a pipeline was loaded from (model_index.json and its used component folders)."""
    folder = Path(folder)
    h = hashlib.sha256()
    paths = [folder / "model_index.json"] + sorted(p for c in components(index) if (folder / c).is_dir()
                                                   for p in (folder / c).iterdir() if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(folder)).encode())
        h.update(_file_identity(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the model


def _call_default(pipe, name: str, fallback):
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


class PipelineModel(torch.nn.Module):
    """A diffusers text-to-image pipeline with the :class:`companion.models.DiffusionModel` interface.

    ``pipe``: the loaded pipeline (its components become this module's submodules, so ``.to``, ``state_dict`` and
    :func:`companion.provenance.model_fingerprint` see every weight). ``unet`` is the denoising network (a
    ``UNet2DConditionModel``, or the SD3 transformer: the attribute is named as on every companion model).
    ``sample_shape``: the latent (C, H, W) at the pipeline's default resolution; ``image_shape`` (3, H*f, W*f).
    ``prediction``: ``"epsilon"``, ``"v_prediction"`` (converted to eps by :meth:`predict_noise`) or ``"flow"``.
    ``text_conditional``: it takes a prompt; ``guidance_embedded``: its guidance scale is an input of the network
    (LCM's ``timestep_cond``), not classifier-free guidance. ``dataset``: ``None`` — its training data is not one
    the companion's feature spaces know (see :func:`companion.models.feature_space_for`).
    """

    kind = "pipeline"
    conditional = False  # no class labels
    num_classes = None
    cond_shape = None
    text_conditional = True
    dataset = None

    def __init__(self, pipe, *, name: str, source_digest: str | None = None, card: dict | None = None):
        super().__init__()
        class_name = type(pipe).__name__
        if class_name not in FAMILIES:
            raise refuse_class(class_name, f"pipeline {name!r}")
        self.family = FAMILIES[class_name]
        self.pipe = pipe
        self.name = name
        self.unet = getattr(pipe, self.family.network)
        self.vae = pipe.vae
        self.text_encoders = torch.nn.ModuleList(
            [e for e in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")) if e is not None])
        cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        self.scheduler_class = type(pipe.scheduler).__name__
        self.prediction = "flow" if self.family.flow else cfg.get("prediction_type", "epsilon")
        if not self.family.flow:
            cfg["prediction_type"] = "epsilon"  # predict_noise returns eps whatever the network predicts
        self.scheduler_config = cfg
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(self.unet.config.in_channels), int(h), int(w))
        self.image_shape = (int(self.vae.config.out_channels), int(h) * self.vae_scale, int(w) * self.vae_scale)
        self.guidance_embedded = getattr(self.unet.config, "time_cond_proj_dim", None) is not None
        self.default_guidance = float(_call_default(pipe, "guidance_scale", 1.0))
        self.card = dict(card or {}, kind=self.kind, name=name, pipeline=class_name)
        self._source_digest = source_digest
        self._sha256: str | None = None
        self._empty: dict = {}
        self.eval()

    # ------------------------------------------------------------------ the interface every model has
    @property
    def is_latent(self) -> bool:
        return True

    @property
    def null_class(self) -> int:
        raise ModelError(f"model {self.name!r} is text-conditioned: it has no null class (its unconditional input is the "
                         f"empty prompt)")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def sha256(self) -> str:
        """Identity of the weights: the files it was loaded from (with dtype and LoRA), else a digest of the tensors."""
        if self._sha256 is None:
            h = hashlib.sha256()
            if self._source_digest is not None:
                h.update(self._source_digest.encode())
                h.update(str(self.dtype).encode())
            else:
                for k, v in sorted(self.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def default_spacing(self, spec) -> str | None:
        """The pipeline's own timestep spacing (e.g. Turbo's ``trailing``) when ``spec``'s scheduler can do it."""
        if self.family.flow:
            return None
        if self.scheduler_config.get("use_karras_sigmas") and "karras" in spec.spacings:
            return "karras"
        spacing = self.scheduler_config.get("timestep_spacing")
        return spacing if spacing in spec.spacings else None

    # ------------------------------------------------------------------ the prompt
    @torch.no_grad()
    def text_conditioning(self, prompts: list[str], negative: list[str] | None, guidance: float | None) -> tuple[dict, float | None]:
        """(fields of :class:`companion.denoiser.Conditioning`, the classifier-free guidance scale) for ``prompts``.

        The embeddings come from the pipeline's ``encode_prompt``. With guidance the empty (or ``negative``) prompt's
        embeddings are ``null_text`` / ``null_extra``. For a network with an embedded guidance input (LCM), ``guidance``
        goes into ``timestep_cond`` and no classifier-free guidance is run (the returned scale is None).
        """
        cfg = guidance is not None and not self.guidance_embedded
        emb = self._encode(prompts, negative if cfg else None, cfg)
        fields = {"text": emb["text"], "extra": dict(emb["extra"])}
        if cfg:
            fields["null_text"] = emb["null_text"]
            fields["null_extra"] = emb["null_extra"]
        if self.guidance_embedded:
            scale = self.default_guidance if guidance is None else guidance
            fields["extra"]["timestep_cond"] = self._guidance_embedding(scale, len(prompts))
        return fields, (float(guidance) if cfg else None)

    def _encode(self, prompts: list[str], negative: list[str] | None, cfg: bool) -> dict:
        pipe, dev, key = self.pipe, self.device, self.family.key
        if key in ("sd", "lcm"):
            pe, ne = pipe.encode_prompt(prompts, dev, 1, cfg, negative_prompt=negative)
            return {"text": pe, "null_text": ne, "extra": {}, "null_extra": {}}
        kw = dict(prompt=prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=cfg, negative_prompt=negative)
        if key == "sd3":
            kw.update(prompt_2=None, prompt_3=None)
        pe, ne, pooled, npooled = pipe.encode_prompt(**kw)
        extra = {self.family.pooled: pooled}
        null_extra = {self.family.pooled: npooled} if cfg else {}
        if key == "sdxl":
            extra["time_ids"] = self._time_ids(pooled).expand(len(prompts), -1)
        return {"text": pe, "null_text": ne, "extra": extra, "null_extra": null_extra}

    def _time_ids(self, pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's micro-conditioning: original size, crop corner (0, 0) and target size, the image size here."""
        size = tuple(self.image_shape[1:])
        enc2 = getattr(self.pipe, "text_encoder_2", None)
        proj = int(pooled.shape[-1]) if enc2 is None else enc2.config.projection_dim
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=proj)
        return ids.to(self.device)

    def _guidance_embedding(self, guidance: float, n: int) -> torch.Tensor:
        w = torch.full((n,), float(guidance) - 1.0)  # the pipelines embed w - 1 (w = 1: no guidance)
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim)
        return emb.to(self.device)

    def unconditional(self, n: int) -> dict:
        """The empty prompt's conditioning for ``n`` samples (encoded once per device and dtype)."""
        key = (str(self.device), self.dtype)
        if key not in self._empty:
            fields, _ = self.text_conditioning([""], None, None)
            self._empty = {key: fields}
        fields = self._empty[key]
        grow = lambda v: v.expand(n, *v.shape[1:]) if torch.is_tensor(v) else v  # noqa: E731
        return {"encoder_hidden_states": grow(fields["text"]), **{k: grow(v) for k, v in fields["extra"].items()}}

    # ------------------------------------------------------------------ the network call
    def predict_noise(self, x: torch.Tensor, t, class_labels=None, cond=None, encoder_hidden_states=None, **extra) -> torch.Tensor:
        """The network's prediction at (x_t, t): eps (a v-prediction network's output converted), or the flow velocity
        for a flow-matching model; float32. Without ``encoder_hidden_states`` the empty prompt conditions the call."""
        if class_labels is not None or cond is not None:
            raise ModelError(f"model {self.name!r} is text-conditioned: it takes a prompt, not class labels or a cond image")
        if encoder_hidden_states is None:
            extra = dict(self.unconditional(x.shape[0]), **extra)
            encoder_hidden_states = extra.pop("encoder_hidden_states")
        dtype, dev = self.dtype, x.device
        t = torch.as_tensor(t, device=dev)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        kw = {k: v.to(dev, dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in extra.items()}
        out = self._network(x.to(dtype), t, encoder_hidden_states.to(dev, dtype), kw).float()
        if self.prediction == "v_prediction":
            out = self._eps_from_v(out, x, t)
        return out

    def _network(self, x, t, text, kw) -> torch.Tensor:
        if self.family.flow:
            return self.unet(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False, **kw)[0]
        timestep_cond = kw.pop("timestep_cond", None)
        added = kw or None  # SDXL: text_embeds and time_ids
        return self.unet(x, t, encoder_hidden_states=text, timestep_cond=timestep_cond, added_cond_kwargs=added,
                         return_dict=False)[0]

    def _eps_from_v(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = sigma_map(self).sigma_on(t, x.device)  # VE noise level at (fractional) t, as the scheduler placed it
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = (1.0 / torch.sqrt(1.0 + s**2)).to(x.dtype).view(shape)
        sigma = (s / torch.sqrt(1.0 + s**2)).to(x.dtype).view(shape)
        return sigma * x + alpha * v

    # ------------------------------------------------------------------ latent space
    def _latent_stats(self, like: torch.Tensor) -> tuple:
        cfg = self.vae.config
        sf = float(cfg.scaling_factor)
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # noqa: E731
            return view(mean), view(std) / sf
        return torch.tensor(shift, device=like.device, dtype=like.dtype), torch.tensor(1.0 / sf, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (not clamped), float32, as the pipeline decodes them."""
        vdtype = next(self.vae.parameters()).dtype
        z = x.to(self.vae.device, vdtype)
        mean, scale = self._latent_stats(z)
        return self.vae.decode(z * scale + mean, return_dict=False)[0].float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean, normalised as the pipeline's latents are)."""
        vdtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(images.to(self.vae.device, vdtype)).latent_dist.mean
        mean, scale = self._latent_stats(z)
        return ((z - mean) / scale).float()


# ---------------------------------------------------------------------------------------------- samplers on a pipeline


FLOW_EQUIVALENTS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}


def _flow_options(spec, shift: float) -> dict:
    return dict(spec.overrides, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


@functools.lru_cache(maxsize=None)
def _flow_form(key: str) -> bool:
    """Whether registry sampler ``key``'s scheduler has a working flow-matching form: it takes ``use_flow_sigmas`` and
    its grid then ends at sigma = 0 (DEIS's stops at the last grid level, so it would return a noisy state)."""
    spec = registry.get(key)
    if "use_flow_sigmas" not in inspect.signature(spec.scheduler.__init__).parameters:
        return False
    sched = spec.scheduler.from_config({"num_train_timesteps": 1000}, **_flow_options(spec, 3.0))
    sched.set_timesteps(4)
    return float(sched.sigmas[-1]) == 0.0


def flow_samplers() -> list[str]:
    """Registry samplers with a flow-matching form: diffusers' FlowMatch Euler/Heun for ``euler``/``heun``, and the
    solvers whose ``use_flow_sigmas`` grid reaches sigma = 0 (DPM-Solver, DPM-Solver++, UniPC)."""
    return [k for k in registry.REGISTRY if k in FLOW_EQUIVALENTS or _flow_form(k)]


def compatible_samplers(model) -> list[str]:
    """The registry samplers that can run on ``model``."""
    return flow_samplers() if getattr(model, "prediction", None) == "flow" else list(registry.REGISTRY)


def flow_shift(model) -> float:
    """The time shift of a flow-matching schedule at the model's resolution (dynamic shifting: exp(mu))."""
    cfg = model.scheduler_config
    if not cfg.get("use_dynamic_shifting"):
        return float(cfg.get("shift", 1.0))
    patch = int(getattr(model.unet.config, "patch_size", 1) or 1)
    seq = (model.sample_shape[1] // patch) * (model.sample_shape[2] // patch)
    lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    m = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (hi - lo)
    return math.exp(seq * m + cfg.get("base_shift", 0.5) - m * lo)


def check_flow_sampler(spec, model, spacing: str | None = None) -> None:
    """Refuse, with the reason and the samplers that fit, a sampler without a flow-matching form on flow-matching
    ``model`` (DDPM, DDIM, PNDM, LMS, the ancestral and k-diffusion samplers integrate the variance-preserving eps
    ODE/SDE), and any spacing (a flow model samples on its shifted sigma grid)."""
    if spec.key not in flow_samplers():
        raise SamplerError(f"sampler {spec.key!r} ({spec.diffusers_class}) integrates the variance-preserving diffusion "
                           f"ODE/SDE and has no flow-matching form that reaches sigma = 0; {model.name!r} is a "
                           f"flow-matching model. Samplers that fit: {', '.join(flow_samplers())}")
    if spacing is not None:
        raise SamplerError(f"spacing={spacing!r}: a flow-matching model samples on its shifted sigma grid "
                           f"(shift={flow_shift(model):.3g}); use spacing=None")


def flow_scheduler(spec, model, steps: int, device):
    """A ready scheduler (timesteps set) running registry sampler ``spec`` on flow-matching ``model``: diffusers'
    FlowMatch Euler/Heun for ``euler``/``heun``, the others with ``use_flow_sigmas`` at the model's time shift."""
    check_flow_sampler(spec, model)
    cfg = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    shift = flow_shift(model)
    if spec.key in FLOW_EQUIVALENTS:
        klass = getattr(diffusers, FLOW_EQUIVALENTS[spec.key])
        accepted = inspect.signature(klass.__init__).parameters
        cfg = {k: v for k, v in dict(cfg, shift=shift, use_dynamic_shifting=False).items() if k in accepted}
        sched = klass.from_config(cfg)
    else:
        base = {"num_train_timesteps": cfg.get("num_train_timesteps", 1000)}
        sched = spec.scheduler.from_config(base, **_flow_options(spec, shift))
    sched.set_timesteps(steps, device=device)
    return sched


# ---------------------------------------------------------------------------------------------- LoRA


def _lora_layers(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer  # optional: only a LoRA needs it

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def load_lora(pipe, lora: str | os.PathLike, *, scale: float = 1.0, name: str = "", local_files_only: bool = False) -> str:
    """Load LoRA weights (a Hub id, a folder, or a ``.safetensors`` file) into ``pipe`` with diffusers'
    ``load_lora_weights``, fuse them at ``scale`` and drop the adapter layers. Returns a digest of the LoRA file(s)."""
    if importlib.util.find_spec("peft") is None:
        raise ModelError(f"LoRA weights ({lora}) need the peft package: {HUB_EXTRA} (or pip install peft)")
    path = Path(lora)
    kw = {"use_safetensors": True, "local_files_only": local_files_only}
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"LoRA file {path} is not .safetensors; pickle checkpoints are never loaded")
        kw["weight_name"], lora = path.name, str(path.parent)
    try:
        pipe.load_lora_weights(str(lora), adapter_name="companion_lora", **kw)
    except Exception as e:  # size mismatches, missing files, Hub errors: one message naming the base model
        why = None if path.exists() else "local_files_only=True" if local_files_only else hub_unavailable()
        if why:
            raise ModelError(f"LoRA {str(lora)!r} is neither a local file or folder nor in the Hugging Face cache, and "
                             f"cannot be fetched ({why}); download it once with network access or pass a local "
                             f".safetensors file") from e
        first = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise ModelError(f"could not load LoRA {str(lora)!r} into {name!r} ({type(pipe).__name__}): {type(e).__name__}: "
                         f"{first} — is it a LoRA for this base model?") from e
    network = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    if _lora_layers(network) == 0:
        pipe.unload_lora_weights()
        raise ModelError(f"LoRA {str(lora)!r} has no layer that fits the network of {name!r} ({type(pipe).__name__}): "
                         f"it was made for another base model")
    pipe.fuse_lora(lora_scale=float(scale))
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers (and their per-call cost) go
    return _lora_digest(lora, kw.get("weight_name"))


def _lora_digest(lora, weight_name) -> str:
    folder = Path(lora)
    h = hashlib.sha256(str(lora).encode())
    if folder.is_dir():
        for p in sorted(folder.glob(weight_name or "*.safetensors")):
            h.update(_file_identity(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- loading


def _absent(klass, index: dict) -> dict:
    """Components passed as None: the unused ones, those saved empty ([null, null]) and optional ones the folder lacks
    (diffusers would otherwise refuse a saved SD3 pipeline without T5)."""
    optional = [*getattr(klass, "_optional_components", []), "text_encoder_3", "tokenizer_3"]
    names = inspect.signature(klass.__init__).parameters
    return {k: None for k in names if k in UNUSED_COMPONENTS or (k not in index and k in optional)
            or (isinstance(index.get(k), list) and index[k][1] is None)}


def from_pretrained(folder: str | Path, *, name: str | None = None, torch_dtype=None, variant: str | None = None,
                    device=None, lora=None, lora_scale: float = 1.0, local_files_only: bool = False) -> PipelineModel:
    """A :class:`PipelineModel` from a local pipeline folder (``save_pretrained`` layout, or a Hub snapshot).

    ``torch_dtype``: float32 (default), float16 or bfloat16, checked to run on ``device`` first. ``variant``: the
    weight files to read (``fp16`` reads ``*.fp16.safetensors``). Components the companion never uses (safety
    checker, feature extractor, image encoder) are not loaded. ``lora``: LoRA weights fused at ``lora_scale``
    (a Hub id is fetched unless ``local_files_only``; the folder itself is always read locally).
    """
    folder = Path(folder)
    index = read_model_index(folder)
    class_name = index["_class_name"]
    if class_name not in FAMILIES:
        raise refuse_class(class_name, str(folder))
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(f"{class_name} needs the transformers package for its text encoders: {HUB_EXTRA}")
    dtype = resolve_dtype(torch_dtype)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    check_dtype_runs(dtype, dev)
    klass = getattr(diffusers, class_name)
    from transformers.utils import logging as transformers_logging  # present: checked above

    diffusers.utils.logging.disable_progress_bar()  # a local folder loads in moments: no bars in a chapter's output
    transformers_logging.disable_progress_bar()
    try:
        pipe = klass.from_pretrained(folder, dtype=dtype, variant=variant, use_safetensors=True,  # diffusers 0.42's name
                                     local_files_only=True, **_absent(klass, index))
    except Exception as e:  # diffusers raises many kinds for missing or mismatched files
        raise ModelError(f"could not load {class_name} from {folder}"
                         f"{'' if variant is None else f' (variant {variant!r})'}: {type(e).__name__}: {e}") from e
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # this VAE overflows in float16: the pipeline itself upcasts it to decode
    digest = folder_digest(folder, index)
    if lora is not None:
        digest += load_lora(pipe, lora, scale=lora_scale, name=name or folder.name, local_files_only=local_files_only)
    card = {"source": str(folder), "variant": variant, "torch_dtype": str(dtype).replace("torch.", ""),
            "lora": None if lora is None else str(lora), "lora_scale": None if lora is None else float(lora_scale)}
    return PipelineModel(pipe, name=name or folder.name, source_digest=digest, card=card).to(dev)


def resolve_prompts(prompt, batch: int, what: str = "prompt") -> list[str] | None:
    """One prompt per sample: a string (repeated) or a list of ``batch`` strings."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != batch:
            raise SamplingError(f"{what} holds {len(prompt)} strings but batch={batch}; give one string or {batch}")
        return list(prompt)
    raise SamplingError(f"{what} must be a string or a list of {batch} strings, got {type(prompt).__name__}")


def letter_tokenizer(folder: str | Path, model_max_length: int = 77):
    """A CLIP BPE tokenizer over single letters, written to ``folder`` (no download, no merges: every word is spelled
    out letter by letter). Random-weight pipelines for tests and speed benchmarks use it where a real tokenizer would
    need the network; ids stay below 54, so any CLIP text config with ``vocab_size >= 54`` accepts them."""
    from transformers import CLIPTokenizer  # the hub/test extra: text encoders are optional

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)
