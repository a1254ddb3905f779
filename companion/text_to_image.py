"""Real text-to-image models side by side: the survey's levers on the models people use.

One comparison, as the real-models chapter (``notebooks/16_real_models.ipynb``) and ``benchmarks/real_models.py``
run it: Stable Diffusion 1.5 with 50 DDIM steps (the survey-era default), with 20 DPM-Solver++ 2M steps (a fast
solver, chapter 06), with LCM-LoRA at 4 steps (consistency distillation as an adapter, chapter 09) and SD-Turbo at
1 step (adversarial diffusion distillation). Each setup: seconds per image, NFE, network time per step, the text
encoders and the latent decoder apart, peak memory, and the CLIP score of its images against their prompts with a
bootstrap interval. The same prompts and seeds go to every setup.

The Hub models need a network (or the Hugging Face cache) and, in practice, a GPU: :func:`hub_status` says why a
machine cannot run them, and the comparison itself runs on any folder :func:`companion.models.load` accepts, so the
tests drive it with tiny random pipelines.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch

from . import assets
from . import metrics as M
from .models import load
from .samplers import get as get_sampler
from .sampling import sample
from .verdicts import ratio_of_medians

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Setup:
    """One row of the comparison: a model (Hub id or folder, with an optional LoRA) and how it is sampled."""

    label: str
    model: str
    sampler: str
    steps: int
    guidance: float | None  # classifier-free guidance scale; None: one network call per step
    lora: str | None = None
    lever: str = ""  # the efficiency lever the row stands for


REAL_MODELS = (
    Setup("SD-1.5, DDIM 50", SD15, "ddim", 50, 7.5, lever="baseline: the survey-era sampler and step count"),
    Setup("SD-1.5, DPM-Solver++ 2M 20", SD15, "dpmpp_2m", 20, 7.5, lever="a faster ODE solver (chapter 06)"),
    Setup("SD-1.5 + LCM-LoRA, LCM 4", SD15, "lcm", 4, None, lora="latent-consistency/lcm-lora-sdv1-5",
          lever="consistency distillation as a LoRA adapter (chapter 09)"),
    Setup("SD-Turbo, Euler ancestral 1", "stabilityai/sd-turbo", "euler_a", 1, None,
          lever="adversarial diffusion distillation: one step"),
)

# Short everyday prompts (the CLIP score compares each image with its own prompt).
PROMPTS = (
    "a red car parked on a quiet street", "a bowl of fruit on a wooden table", "a lighthouse on a rocky coast at sunset",
    "a cat sleeping on a windowsill", "a mountain lake surrounded by pine trees", "a cup of coffee next to a laptop",
    "an old stone bridge over a river", "a bicycle leaning against a brick wall",
)


def hub_status(device: str | torch.device | None = None) -> str | None:
    """Why this machine cannot run the Hub comparison (no CUDA device, no network), or None when it can.

    A CPU could run it, but SD-1.5 at 50 guided steps takes minutes per image there; the chapter keeps to a GPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return f"no CUDA device ({dev.type} here): SD-1.5 at 50 guided steps takes minutes per image on a CPU"
    reason = assets.hub_unavailable()
    if reason:
        return f"the Hugging Face Hub is not reachable ({reason})"
    return None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def compare(setups: Sequence[Setup] = REAL_MODELS, prompts: Sequence[str] = PROMPTS, *, seeds: Sequence[int] = (0,),
            clip=M.CLIP_DEFAULT, device=None, torch_dtype=None, loader: Callable = load,
            on_row: Callable[[dict, torch.Tensor], None] | None = None) -> pd.DataFrame:
    """Run every setup on every prompt and seed; one table row per setup.

    Each setup is loaded once (setups that share a model and LoRA share it), warmed up with one untimed one-step run,
    then sampled once per seed with all ``prompts`` as one batch. ``s / image``: the median over seeds of the run's
    wall time (text encoding, loop and decode) divided by the batch; ``network ms / step`` and the encode/decode
    seconds per image from the same runs' records; with three or more seeds, ``speedup`` (and ``_low``, ``_high``,
    ``_n``) is the first setup's median time over this one's with a bootstrap interval over the runs (``network ms / step``: the median network call of the loop). ``clip_score`` over every image with its prompt
    (:func:`companion.metrics.clip_score`, bootstrap interval). ``on_row(row, images)`` sees each finished setup.
    """
    if not setups:
        raise ValueError("compare needs at least one setup")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"compare needs non-empty prompts (strings), got {prompts!r}")
    if len(prompts) * len(seeds) < M.MIN_SAMPLES["clip_score"]:
        raise ValueError(f"the CLIP score needs at least {M.MIN_SAMPLES['clip_score']} images: {len(prompts)} prompts x "
                         f"{len(seeds)} seeds give {len(prompts) * len(seeds)}")
    pair = M.clip_pair(clip)
    loaded: dict[tuple, object] = {}
    rows, times = [], []
    for s in setups:
        key = (s.model, s.lora)
        if key not in loaded:
            kw = {k: v for k, v in (("device", device), ("torch_dtype", torch_dtype), ("lora", s.lora)) if v is not None}
            loaded[key] = loader(s.model, **kw)
        model = loaded[key]
        sample(model, s.sampler, 1, guidance=s.guidance, prompt=prompts[0], batch=1, seed=0)  # warm-up, untimed
        runs = [sample(model, s.sampler, s.steps, guidance=s.guidance, prompt=prompts, batch=len(prompts), seed=seed)
                for seed in seeds]
        images = torch.cat([r.images for r in runs])
        recs = [r.record for r in runs]
        n = len(prompts)
        score = M.clip_score(images.clamp(-1, 1), prompts * len(seeds), clip=pair)
        step_ms = [1000 * _median(r.network_step_s) for r in recs if r.network_step_s]
        row = {"setup": s.label, "lever": s.lever, "model": s.model, "lora": s.lora or "", "sampler": s.sampler,
               "steps": s.steps, "guidance": s.guidance, "nfe": int(recs[0].nfe), "images": len(images),
               "s / image": _median([r.wall_s / n for r in recs]),
               "network ms / step": _median(step_ms) if step_ms else None,
               "encode s / image": _median([r.encode_s / n for r in recs]),
               "decode s / image": _median([r.decode_s / n for r in recs]),
               # CUDA's allocator peak; a CPU's resident-set growth is not a per-run peak, so it is left out
               "peak GiB": max(r.peak_mem_bytes for r in recs) / 2**30 if recs[0].peak_mem_kind.startswith("cuda") else None,
               **M.as_columns({"clip_score": score}),
               "device": str(getattr(model, "device", "cpu")), "dtype": str(getattr(model, "dtype", ""))}
        rows.append(row)
        times.append([r.wall_s / n for r in recs])
        if on_row is not None:
            on_row(row, images)
    table = pd.DataFrame(rows)
    table["speed-up vs first"] = table["s / image"].iloc[0] / table["s / image"]
    if len(seeds) >= 3:  # the speed-up's interval: a bootstrap over the timed runs of both setups
        speed = [ratio_of_medians(times[0], t, name="speedup") for t in times]
        for suffix, attr in (("", "value"), ("_low", "low"), ("_high", "high"), ("_n", "n")):
            table[f"speedup{suffix}"] = [getattr(m, attr) for m in speed]
    return table


def nfe_of(setup: Setup) -> int:
    """Network evaluations per image of ``setup`` for a one-call-per-step sampler (DDIM, DPM-Solver++, LCM, Euler):
    one per step, two with classifier-free guidance (its conditional and unconditional halves)."""
    if get_sampler(setup.sampler).nfe_per_step != 1:
        raise ValueError(f"nfe_of counts one-call-per-step samplers; {setup.sampler!r} calls the network "
                         f"{get_sampler(setup.sampler).nfe_per_step} times per step")
    return int(setup.steps * (2 if setup.guidance is not None else 1))


def anatomy(model, steps: Sequence[int] = (1, 4, 20), *, prompt: str = PROMPTS[0], sampler: str = "dpmpp_2m",
            guidance: float | None = 7.5, batch: int = 4, repeats: int = 3) -> pd.DataFrame:
    """Where the time of a text-to-image call goes, at each step count: the text encoders, the denoising loop's
    network calls, the latent decoder, and the rest (noise, the solver's arithmetic, copies). Medians of ``repeats``
    timed runs after one untimed warm-up per step count; seconds per call of ``batch`` images."""
    rows = []
    for n in steps:
        sample(model, sampler, n, guidance=guidance, prompt=prompt, batch=batch, seed=0)  # warm-up, untimed
        recs = [sample(model, sampler, n, guidance=guidance, prompt=prompt, batch=batch, seed=1 + i).record
                for i in range(repeats)]
        wall = _median([r.wall_s for r in recs])
        enc, dec = _median([r.encode_s for r in recs]), _median([r.decode_s for r in recs])
        loop = _median([r.network_s - r.encode_s - r.decode_s for r in recs])
        rows.append({"steps": n, "NFE": int(recs[0].nfe), "text encoders s": enc, "loop network s": loop,
                     "latent decoder s": dec, "rest s": _median([r.overhead_s for r in recs]), "wall s": wall,
                     "decoder share": dec / wall, "loop share": loop / wall})
    return pd.DataFrame(rows)
