"""Reusing work across steps: DeepCache-style feature caching for a UNet denoiser.

Adjacent steps of a sampler call the network on nearly the same input, and a UNet's deep, low-resolution features
change slowly from one step to the next (Ma et al., DeepCache, arXiv 2312.00858). So on a *full* call the whole
UNet runs and the input of its last up block (the deep features, already upsampled back to full resolution) is
kept; on the next ``interval - 1`` calls only the *shallow branch* runs: the input convolution, the first down
block (whose outputs are the skip connections the last up block needs) and the last up block on the kept deep
features. Every other block is skipped: that is where the saving comes from, and the error it makes is the change
of the deep features between the full call and now.

:class:`DeepCache` plugs into the one network-call seam (``sample(..., wrap=DeepCache(model, interval))``), so every
sampler uses it unchanged. One instance serves one run (it counts calls and holds the kept features); ``interval
= 1`` is the uncached network, exactly.
"""
from __future__ import annotations

import diffusers
import torch

from .errors import CachingError
from .speed import AcceleratedModel, NetworkView


def _check_unet(model) -> torch.nn.Module:
    name = getattr(model, "name", type(model).__name__)
    if isinstance(model, AcceleratedModel):
        raise CachingError(f"model {name!r} runs with speed options ({model.options.label()}), whose network call bypasses "
                           "the cache; use the cache on the plain model")
    unet = getattr(model, "unet", None)
    if not isinstance(unet, diffusers.UNet2DModel):
        kind = type(unet).__name__ if unet is not None else "no network (an exact-score oracle)"
        raise CachingError(f"DeepCache needs a diffusers UNet2DModel with skip connections; model {name!r} has {kind}")
    if any(hasattr(b, "skip_conv") for b in (*unet.down_blocks, *unet.up_blocks)) or unet.config.time_embedding_type != "positional":
        raise CachingError(f"DeepCache supports UNets with positional time embeddings and no skip-sample blocks; model {name!r} "
                           f"has time embedding {unet.config.time_embedding_type!r} and blocks "
                           f"{[type(b).__name__ for b in unet.up_blocks]}")
    if len(unet.up_blocks) < 2:
        raise CachingError(f"model {name!r} has a single up block: there are no deep features to cache")
    return unet


class DeepCache:
    """Run the full UNet every ``interval``-th network call and only its shallow branch in between.

    ``calls``, ``full_calls``: counts for the run (a cached call costs the shallow branch only; see
    :func:`shallow_fraction` for its share of the FLOPs).
    """

    def __init__(self, model, interval: int):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise CachingError(f"interval must be an int >= 1 (1: no caching; N: a full call every N calls), got {interval!r}")
        self.model = model
        self.unet = _check_unet(model)
        self.interval = interval
        self.calls = 0
        self.full_calls = 0
        self._deep: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"DeepCache(interval={self.interval}, calls={self.calls}, full={self.full_calls})"

    def label(self) -> str:
        return "no cache" if self.interval == 1 else f"DeepCache N={self.interval}"

    # the wrap seam: ``wrap(network) -> network`` with predict_noise's signature, called once per run
    def __call__(self, network):
        self.calls, self.full_calls, self._deep = 0, 0, None  # a run starts with a full call
        view = NetworkView(self.model, self._unet_call)
        predict = type(self.model).predict_noise
        return lambda x, t, **kw: predict(view, x, t, **kw)

    def _unet_call(self, sample: torch.Tensor, timestep, class_labels=None):
        stale = self._deep is None or self._deep.shape[0] != sample.shape[0]
        full = stale or self.calls % self.interval == 0
        out = unet_forward(self.unet, sample, timestep, class_labels, deep=None if full else self._deep,
                           keep=self._keep if full else None)
        self.calls += 1
        self.full_calls += int(full)
        return out

    def _keep(self, deep: torch.Tensor) -> None:
        self._deep = deep


def _embedding(unet, sample: torch.Tensor, timestep, class_labels) -> torch.Tensor:
    """The time (+ class) embedding, as diffusers' ``UNet2DModel.forward`` computes it."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long, device=sample.device)
    if t.ndim == 0:
        t = t[None].to(sample.device)
    t = t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        if class_labels is None:
            raise CachingError("this UNet is class-conditional: class_labels are needed")
        if unet.config.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    return emb


def unet_forward(unet, sample: torch.Tensor, timestep, class_labels=None, *, deep: torch.Tensor | None = None,
                 keep=None) -> torch.Tensor:
    """diffusers' ``UNet2DModel.forward``, split at the input of the last up block.

    ``deep`` None: the full network; ``keep(deep)`` receives the last up block's input. ``deep`` given: the shallow
    branch only (input convolution, first down block, last up block on ``deep``).
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _embedding(unet, sample, timestep, class_labels)
    h = unet.conv_in(sample)
    skips = (h,)
    blocks = unet.down_blocks if deep is None else unet.down_blocks[:1]
    for block in blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips += res
    last = unet.up_blocks[-1]
    if deep is None:
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        for block in unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            h = block(h, res, emb)
        if keep is not None:
            keep(h)
    else:
        h = deep
    # the last up block takes the first len(resnets) skip connections: the input convolution's and the first
    # down block's outputs before its downsampler (which feeds the second-to-last up block)
    h = last(h, skips[:len(last.resnets)], emb)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h


def shallow_fraction(model) -> float:
    """FLOPs of the shallow branch as a fraction of a full call (one sample), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = _check_unet(model)
    p = next(unet.parameters())
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size) \
        if isinstance(unet.config.sample_size, int) else (1, unet.config.in_channels, *unet.config.sample_size)
    x = torch.zeros(shape, dtype=p.dtype, device=p.device)
    t = torch.tensor([500], device=p.device)
    labels = torch.zeros(1, dtype=torch.long, device=p.device) if unet.class_embedding is not None else None
    kept = []
    with torch.no_grad():
        with FlopCounterMode(display=False) as full:
            unet_forward(unet, x, t, labels, keep=kept.append)
        with FlopCounterMode(display=False) as shallow:
            unet_forward(unet, x, t, labels, deep=kept[0])
    return shallow.get_total_flops() / full.get_total_flops()
