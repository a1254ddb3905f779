#!/usr/bin/env python3
"""Sampling throughput and latency per sampler and per speed option, without downloaded weights.

Models: the bundled diffusion models (assets/models, when present) and randomly initialised UNet2DModels
with the published configurations of real Hub models (weights do not change the speed of a dense UNet):

- ``ddpm-cifar10-32-config``: google/ddpm-cifar10-32's UNet (35.7 M parameters, 3x32x32, attention at 16x16);
- ``ldm-celebahq-256-config``: CompVis/ldm-celebahq-256's latent UNet (274 M parameters, 3x64x64 latents;
  the VQ decoder is not included, so this times the diffusion loop only).

For each model: every sampler in eager fp32, then every speed option on one sampler, each against eager fp32
measured in the same run (speed-up, and how far the images move from the fp32 images of the same seed).
Reported per row: images/s, latency per batch, ms per network evaluation, the share of wall time inside the
network, and whether solver overhead stays within 5 % of wall time (the target at batch 64).

    python benchmarks/gpu_benchmark.py                 # full run on the default device (a GPU when present)
    python benchmarks/gpu_benchmark.py --quick         # tiny batches and few steps: runs on a CPU in minutes
    python benchmarks/gpu_benchmark.py --time-limit 180 --out benchmarks/results

Writes <out>/<device-name>[_quick].json (every row, the environment) and .md (tables).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from companion.device import pick_device  # noqa: E402
from companion.models import DiffusionModel, ModelError, load  # noqa: E402
from companion.sampling import SamplingError, sample  # noqa: E402
from companion.speed import SpeedOptionError, SpeedOptions, accelerate  # noqa: E402

OVERHEAD_TARGET = 0.05  # solver overhead at most 5 % of wall time at batch 64
TARGET_BATCH = 64

# Published UNet2DModel configurations (diffusers format). Parameter counts are checked at build time.
HUB_CONFIGS = {
    "ddpm-cifar10-32-config": {
        "source": "google/ddpm-cifar10-32 (unet/config.json)",
        "params_m": 35.7,
        "config": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu"),
    },
    "ldm-celebahq-256-config": {
        "source": "CompVis/ldm-celebahq-256 (unet/config.json; LDM model_channels=224, channel_mult=1,2,3,4, "
                  "attention at 32/16/8, 32 channels per head)",
        "params_m": 274.1,
        "config": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
                       downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32, act_fn="silu"),
    },
}


@dataclass
class Plan:
    """What to measure on one model: batch, steps, samplers (eager fp32) and option labels (on ``option_sampler``)."""

    batch: int
    steps: int
    samplers: list
    options: list
    option_sampler: str = "dpmpp_2m"
    repeats: int = 3
    notes: list = field(default_factory=list)


GPU_OPTIONS = ["tf32", "bf16", "fp16", "fp32+channels_last", "bf16+channels_last", "fp32+classic_attention",
               "fp32+cuda_graphs", "bf16+channels_last+cuda_graphs", "bf16+channels_last+compile",
               "bf16+channels_last+compile:reduce-overhead"]
GPU_SAMPLERS = ["ddim", "dpmpp_2m", "euler_a", "heun", "unipc", "lms", "dpmpp_2m_sde"]


def plans(device: torch.device, quick: bool) -> dict[str, Plan]:
    """Measurement plans per model kind ("small": bundled and CIFAR-sized, "large": LDM-sized)."""
    if quick:
        cpu_opts = ["bf16", "fp32+channels_last", "fp32+classic_attention", "fp16", "fp32+cuda_graphs"]
        return {
            "small": Plan(batch=2, steps=3, samplers=["ddim", "dpmpp_2m", "heun"], options=cpu_opts, repeats=1),
            "large": Plan(batch=1, steps=2, samplers=["ddim"], option_sampler="ddim", options=["bf16"], repeats=1),
        }
    return {
        "small": Plan(batch=TARGET_BATCH, steps=20, samplers=GPU_SAMPLERS, options=GPU_OPTIONS, repeats=3),
        "large": Plan(batch=32, steps=10, samplers=["ddim", "dpmpp_2m"], repeats=2,
                      options=["tf32", "bf16", "fp16", "bf16+channels_last", "fp32+classic_attention", "bf16+channels_last+compile"],
                      notes=["batch 32 and 10 steps: fp32 at 192 GFLOP per image and network call keeps the large model "
                             "inside the 5-minute device check"]),
    }


# ------------------------------------------------------------------------------------------ models


def hub_config_model(name: str) -> DiffusionModel:
    """A randomly initialised (seed 0) UNet2DModel with a published Hub configuration."""
    from diffusers import UNet2DModel

    spec = HUB_CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet2DModel(**spec["config"]).eval()
    params_m = sum(p.numel() for p in unet.parameters()) / 1e6
    if abs(params_m - spec["params_m"]) > 0.05 * spec["params_m"]:
        raise ModelError(f"{name}: {params_m:.1f} M parameters, expected about {spec['params_m']} M: the configuration is wrong")
    card = {"kind": "diffusion", "name": name, "source": spec["source"], "weights": "random (seed 0)"}
    return DiffusionModel(unet, name=name, card=card)


def bundled_models() -> list[str]:
    from companion import assets

    return [name for name, card in assets.manifest().items() if card.get("kind") == "diffusion"]


def default_models() -> list[str]:
    """One bundled model per family (the progressive students and the design variants share digits-cond's
    network size; digits-cd stands for the v-predicting students) and the published Hub configurations."""
    keep = [n for n in bundled_models() if not n.startswith(("digits-pd-", "digits-design-"))]
    first = [n for n in ("digits-cond", "digits-cd", "shapes-latent") if n in keep]
    # under a time limit the later models are skipped (and noted): the real-size configurations come early
    return [*first, *HUB_CONFIGS, *[n for n in keep if n not in first]]


def params_m(model) -> float:
    return sum(p.numel() for p in model.unet.parameters()) / 1e6


# ------------------------------------------------------------------------------------------ measuring


def measure(model, sampler: str, plan: Plan, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """One warm-up call (compilation, graph recording, cuDNN autotuning), then ``plan.repeats`` timed calls."""
    labels = None
    if getattr(model, "conditional", False):
        labels = torch.arange(plan.batch) % int(model.num_classes)
    kw = dict(sampler=sampler, steps=plan.steps, batch=plan.batch, seed=seed, class_labels=labels)
    t0 = time.perf_counter()
    first = sample(model, **kw)
    warmup_s = time.perf_counter() - t0
    records = [sample(model, **kw).record for _ in range(plan.repeats)]
    walls = [r.wall_s for r in records]
    best = records[walls.index(statistics.median_low(walls))]
    nfe = best.nfe
    row = {
        "sampler": sampler, "steps": plan.steps, "nfe": nfe, "batch": plan.batch, "repeats": plan.repeats,
        "wall_s": best.wall_s, "wall_s_all": walls, "warmup_s": warmup_s,
        "images_per_s": plan.batch / best.wall_s, "latency_s": best.wall_s,
        "ms_per_nfe": 1e3 * best.network_s / nfe if nfe else float("nan"),
        "network_share": best.network_s / best.wall_s, "overhead_share": best.overhead_s / best.wall_s,
        "overhead_s": best.overhead_s, "peak_mem_bytes": best.peak_mem_bytes, "peak_mem_kind": best.peak_mem_kind,
        "device": best.device,
    }
    row["meets_overhead_target"] = row["overhead_share"] <= OVERHEAD_TARGET if plan.batch == TARGET_BATCH else None
    return row, first.images


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def run_samplers(name: str, model, plan: Plan, device: torch.device, deadline: Deadline, log) -> tuple[list[dict], dict]:
    """Every sampler of the plan in eager fp32; returns the rows and the fp32 reference (row, images) per sampler."""
    rows, reference = [], {}
    base = {"model": name, "params_m": round(params_m(model), 2), "sample_shape": list(model.sample_shape)}
    model.to(device)
    for sampler in dict.fromkeys([plan.option_sampler, *plan.samplers]):
        if deadline.left() <= 0:
            rows.append(dict(base, sampler=sampler, options="fp32", status="skipped: time limit reached"))
            continue
        try:
            row, images = measure(model, sampler, plan)
        except (SamplingError, RuntimeError) as e:
            rows.append(dict(base, sampler=sampler, options="fp32", status=f"error: {type(e).__name__}: {e}"))
            log(rows[-1])
            continue
        reference[sampler] = (row, images)
        rows.append(dict(base, **row, options="fp32", speedup_vs_fp32=1.0, status="ok"))
        log(rows[-1])
    return rows, reference


def compile_seconds_needed(model) -> float:
    """Do not start compiling a UNet when less than this is left (compilation cannot be interrupted cleanly)."""
    return 60.0 if params_m(model) < 100 else 150.0


def run_options(name: str, model, plan: Plan, labels: list[str], reference: dict, device: torch.device,
                deadline: Deadline, log) -> list[dict]:
    """Each speed option on ``plan.option_sampler``, against the eager fp32 run of the same sampler and seed."""
    rows = []
    base = {"model": name, "params_m": round(params_m(model), 2), "sample_shape": list(model.sample_shape)}
    if plan.option_sampler not in reference:
        return [dict(base, sampler=plan.option_sampler, options=label, status="skipped: no eager fp32 reference run")
                for label in labels]
    ref_row, ref_images = reference[plan.option_sampler]
    for label in labels:
        opts = SpeedOptions.from_label(label)
        row = dict(base, sampler=plan.option_sampler, options=label, speed=opts.describe())
        needs = compile_seconds_needed(model) if opts.compile else 0.0
        if deadline.left() <= needs:
            why = f" ({max(deadline.left(), 0):.0f} s left, compiling needs ~{needs:.0f} s)" if needs else ""
            rows.append(dict(row, status=f"skipped: time limit reached{why}"))
            log(rows[-1])
            continue
        try:
            fast = accelerate(model, opts, device)
            measured, images = measure(fast, plan.option_sampler, plan)
        except SpeedOptionError as e:
            rows.append(dict(row, status=f"refused: {e}"))
            log(rows[-1])
            continue
        except (SamplingError, RuntimeError) as e:
            rows.append(dict(row, status=f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            log(rows[-1])
            continue
        diff = (images - ref_images).float()
        row.update(measured, applied=fast.applied, notes=fast.notes, status="ok",
                   speedup_vs_fp32=ref_row["wall_s"] / measured["wall_s"],
                   max_abs_diff_vs_fp32=diff.abs().max().item(),
                   rel_diff_vs_fp32=(diff.norm() / ref_images.float().norm()).item())
        rows.append(row)
        log(row)
        del fast
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ reporting


def environment(device: torch.device) -> dict:
    import diffusers

    env = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                   fp32_precision_default={"matmul": torch.backends.cuda.matmul.fp32_precision,
                                           "cudnn_conv": torch.backends.cudnn.conv.fp32_precision})
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return env


def result_name(device: torch.device, quick: bool) -> str:
    if device.type == "cuda":
        label = "gpu_" + torch.cuda.get_device_name(device)
    else:
        label = f"{device.type}_{os.cpu_count()}core"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower().replace("gpu-", "gpu_", 1).replace("cpu-", "cpu_", 1)
    return slug + ("_quick" if quick else "")


def fmt(v, spec=".3g"):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    lines = [f"# Sampling speed on {where}", "",
             f"Measured {env['date_utc']} with `{result['command']}`; torch {env['torch']}, diffusers {env['diffusers']}"
             + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "") + ".", ""]
    if result["quick"]:
        lines += ["**Quick run** (tiny batches, few steps): it checks that every path runs; its figures are not "
                  "representative of the full benchmark.", ""]
    if env["device"] == "cpu":
        lines += [f"**CPU figures, not GPU figures.** No GPU was used: GPU-only options are refused here by design (see the "
                  f"status column). torch threads: {env['torch_threads']}"
                  + (f" (OMP_NUM_THREADS={env['omp_num_threads']})" if env.get("omp_num_threads") else "") + ".", ""]
    lines += ["Weights are random (seed 0) in the published configurations; speed does not depend on them, image "
              "differences between options do (they show how far reduced precision moves a sample, not image quality).",
              f"Overhead target: solver overhead (wall time outside the network) <= {OVERHEAD_TARGET:.0%} of wall time at batch {TARGET_BATCH}.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        ok = [r for r in mrows if r.get("status") == "ok"]
        head = ok[0] if ok else mrows[0]
        lines += [f"## {model}", "", f"{fmt(head.get('params_m'))} M parameters, sample shape {head.get('sample_shape')}, "
                  f"batch {fmt(head.get('batch'))}, {fmt(head.get('steps'))} steps, median of {fmt(head.get('repeats'))} runs after a warm-up run.", ""]
        lines += ["### Samplers (eager fp32)", "",
                  "| sampler | NFE | images/s | latency (s) | ms / NFE | network share | overhead share | overhead <= 5 % | peak memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            if r.get("options") != "fp32":
                continue
            if r.get("status") != "ok":
                lines.append(f"| {r['sampler']} | {r['status']} |||||||| ")
                continue
            lines.append(f"| {r['sampler']} | {r['nfe']} | {fmt(r['images_per_s'])} | {fmt(r['latency_s'])} | {fmt(r['ms_per_nfe'])} "
                         f"| {r['network_share']:.1%} | {r['overhead_share']:.1%} | {fmt(r['meets_overhead_target'])} "
                         f"| {r['peak_mem_bytes'] / 2**20:.0f} ({'CUDA allocated' if r['peak_mem_kind'].startswith('cuda') else 'CPU RSS growth'}) |")
        opt_sampler = result["models"][model]["option_sampler"]
        lines += ["", f"### Speed options (sampler {opt_sampler}, each against eager fp32 in the same run)", "",
                  "| options | images/s | latency (s) | speed-up vs fp32 | warm-up (s) | overhead share | max abs image diff vs fp32 | rel. diff | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        ref = next((r for r in mrows if r.get("options") == "fp32" and r["sampler"] == opt_sampler and r.get("status") == "ok"), None)
        if ref:
            lines.append(f"| fp32 (eager) | {fmt(ref['images_per_s'])} | {fmt(ref['latency_s'])} | 1 | {fmt(ref['warmup_s'])} | {ref['overhead_share']:.1%} | 0 | 0 | ok |")
        for r in mrows:
            if r.get("options") == "fp32":
                continue
            if r.get("status") != "ok":
                lines.append(f"| {r['options']} | | | | | | | | {r['status'].replace('|', '/')} |")
                continue
            lines.append(f"| {r['options']} | {fmt(r['images_per_s'])} | {fmt(r['latency_s'])} | {fmt(r['speedup_vs_fp32'])} | {fmt(r['warmup_s'])} "
                         f"| {r['overhead_share']:.1%} | {fmt(r['max_abs_diff_vs_fp32'])} | {fmt(r['rel_diff_vs_fp32'])} | ok |")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: CUDA when present)")
    p.add_argument("--quick", action="store_true", help="tiny batches and few steps (a smoke run; fits a CPU)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated: bundled names and/or {', '.join(HUB_CONFIGS)} (default: one bundled model per family, then those)")
    p.add_argument("--time-limit", type=float, default=None, help="stop starting new measurements after this many seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the .json and .md results")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes in a sampling loop: let cuDNN pick its fastest kernels
    deadline = Deadline(args.time_limit)
    names = args.models.split(",") if args.models else default_models()
    unknown = [n for n in names if n not in HUB_CONFIGS and n not in bundled_models()]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join([*bundled_models(), *HUB_CONFIGS])}", file=sys.stderr)
        return 2
    all_plans = plans(device, args.quick)
    command = "python benchmarks/gpu_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "quick": args.quick, "environment": environment(device), "rows": [],
              "models": {}, "notes": []}

    def log(row):
        if row.get("status") == "ok":
            print(f"  {row['model']:<26} {row['sampler']:<12} {row['options']:<44} {row['images_per_s']:9.2f} img/s "
                  f"{row['latency_s']:8.3f} s  network {row['network_share']:6.1%}  x{row.get('speedup_vs_fp32', 1):.2f}", flush=True)
        else:
            print(f"  {row['model']:<26} {row['sampler']:<12} {row['options']:<44} {row['status'][:120]}", flush=True)

    # Phase 1 on every model: samplers and the options that need no compilation. Phase 2: compiled options,
    # which cost minutes of compilation each, with whatever time is left.
    loaded = {}
    for name in names:
        if deadline.left() <= 0:
            result["notes"].append(f"{name}: not measured (time limit reached)")
            continue
        plan = all_plans["large" if name.startswith("ldm") else "small"]
        model = hub_config_model(name) if name in HUB_CONFIGS else load(name, device="cpu")
        info = {"params_m": round(params_m(model), 2), "sample_shape": list(model.sample_shape), "batch": plan.batch,
                "steps": plan.steps, "repeats": plan.repeats, "option_sampler": plan.option_sampler,
                "source": model.card.get("source", "bundled"), "weights": model.card.get("weights", "trained (bundled)")}
        result["models"][name] = info
        result["notes"] += [f"{name}: {n}" for n in plan.notes]
        print(f"{name}: {info['params_m']} M parameters, sample shape {tuple(model.sample_shape)}, batch {plan.batch}, "
              f"{plan.steps} steps on {device}", flush=True)
        rows, reference = run_samplers(name, model, plan, device, deadline, log)
        eager_labels = [o for o in plan.options if not SpeedOptions.from_label(o).compile]
        rows += run_options(name, model, plan, eager_labels, reference, device, deadline, log)
        result["rows"] += rows
        loaded[name] = (model, plan, reference)
    for name, (model, plan, reference) in loaded.items():
        compiled = [o for o in plan.options if SpeedOptions.from_label(o).compile]
        if compiled:
            print(f"{name}: compiled options", flush=True)
            result["rows"] += run_options(name, model, plan, compiled, reference, device, deadline, log)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result_name(device, args.quick)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
