"""Model design: what a network's architecture costs per evaluation, and where that cost sits.

Chapter 04b compares variants of the digits UNet that differ in one design lever each (width, depth,
attention placement). :data:`DESIGN_VARIANTS` names the levers; :mod:`companion.recipes` turns each into a
recipe ``digits-design-*`` trained at the same budget. This module measures the architecture side of that
comparison; quality comes from :func:`companion.bench.sweep` as everywhere else.

* :func:`architecture_profile`: parameters, FLOPs of one evaluation for one sample (torch's
  ``FlopCounterMode``) split into convolutions, attention and the rest, and where the attention layers sit.
* :func:`network_latency`: median wall time of one network evaluation at a given batch size, measured here.

Why both: FLOPs are a property of the architecture and the same on every machine; wall time is what a reader
waits for. On a small CPU model they can disagree (attention and normalisation layers cost more time per FLOP
than convolutions), and the chapter shows by how much.
"""
from __future__ import annotations

import re
import statistics
import time

import torch

from .bench import example_inputs, flop_counter

# The variants of the digits-cond UNet, each differing in one design lever (given as keyword arguments of
# companion.recipes.unet_config). Their recipes train them with the same data, seed, batch, schedule and number
# of steps, so quality and cost differences come from the architecture. "base" is the digits-cond layout
# (32-64-64 channels, one ResNet layer per level, self-attention at 4x4 and in the middle block).
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
DESIGN_MODELS = tuple(f"digits-design-{k}" for k in DESIGN_VARIANTS)

# an attention layer of a diffusers UNet block (its q/k/v/out projections and the attention product itself)
_ATTENTION_MODULE = re.compile(r"\.attentions\.\d+$")


def attention_resolutions(model) -> list[int]:
    """Side lengths of the feature maps that self-attention runs on (one entry per attention block)."""
    unet = getattr(model, "unet", None)
    if unet is None:
        return []
    size = int(model.sample_shape[-1])
    sizes = []
    for block in unet.down_blocks:
        if getattr(block, "attentions", None):
            sizes += [size] * len(block.attentions)
        if getattr(block, "downsamplers", None):
            size //= 2
    mid = getattr(unet.mid_block, "attentions", None) or []
    sizes += [size] * sum(a is not None for a in mid)
    for block in unet.up_blocks:
        if getattr(block, "attentions", None):
            sizes += [size] * len(block.attentions)
        if getattr(block, "upsamplers", None):
            size *= 2
    return sizes


@torch.no_grad()
def architecture_profile(model) -> dict:
    """Parameters, FLOPs per evaluation (one sample) by part, and the attention layers' resolutions.

    ``flops_attention``: everything inside the self-attention layers (projections and the attention product);
    ``flops_convolution``: every convolution; ``flops_other``: the rest (time embedding, norms are not counted
    by torch's counter, linear layers outside attention).
    """
    net = getattr(model, "unet", None)
    if net is None:
        raise TypeError(f"{getattr(model, 'name', model)!r} has no network to profile (an exact-score oracle?)")
    x, t, kw = example_inputs(model, 1)
    counter = flop_counter()
    with counter:
        model.predict_noise(x, t, **kw)
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    attention = sum(int(n) for name, ops in counts.items() if _ATTENTION_MODULE.search(name) for n in ops.values())
    convolution = sum(int(n) for op, n in counts.get("Global", {}).items() if "convolution" in str(op))
    cfg = net.config
    return {
        "model": getattr(model, "name", ""),
        "params": sum(p.numel() for p in net.parameters()),
        "channels": "-".join(str(c) for c in cfg.block_out_channels),
        "layers_per_block": int(cfg.layers_per_block),
        "attention_at": attention_resolutions(model),
        "flops": total,
        "flops_convolution": convolution,
        "flops_attention": attention,
        "flops_other": total - convolution - attention,
    }


@torch.no_grad()
def network_latency(model, batch: int = 16, repeats: int = 15, warmup: int = 3) -> float:
    """Median seconds of one network evaluation (``predict_noise``) on ``batch`` samples, measured now."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got batch={batch}, repeats={repeats}, warmup={warmup}")
    x, t, kw = example_inputs(model, batch)
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        model.predict_noise(x, t, **kw)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
