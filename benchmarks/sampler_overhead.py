"""Solver overhead of every sampler, and `sample` against diffusers' own pipelines.

Overhead = wall time of `companion.sampling.sample` minus the time inside the network (set-up, scheduler
steps, bookkeeping, noise), as a percentage of wall time, at batch 16 on a 16x16 1.1M-parameter UNet2DModel
(block_out_channels 32/64/64; random weights: the cost of a forward pass does not depend on their values).
Then `sample(..., "ddim")` vs `DDIMPipeline` and `sample(..., "ddpm")` vs `DDPMPipeline` on the same UNet, NFE
and batch, interleaved run by run so that load from other processes hits both alike; the ratio is of medians.

    python benchmarks/sampler_overhead.py --steps 20 --repeats 3 --out benchmarks/results/sampler_overhead.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion import samplers as S  # noqa: E402
from companion.models import TRAIN_SCHEDULE, DiffusionModel  # noqa: E402
from companion.sampling import sample  # noqa: E402


def bench_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1).eval()
    return unet


def overhead_table(model, steps, batch, repeats):
    rows = []
    for key in S.REGISTRY:
        sample(model, key, steps, batch=batch)  # warm-up (first-call allocations, lazy imports)
        recs = [sample(model, key, steps, batch=batch, seed=r).record for r in range(repeats)]
        fr = [r.overhead_s / r.wall_s for r in recs]
        best = min(range(repeats), key=lambda i: fr[i])
        rows.append({
            "sampler": key, "nfe": recs[0].nfe, "wall_s_median": statistics.median(r.wall_s for r in recs),
            "network_s_median": statistics.median(r.network_s for r in recs),
            "overhead_s_median": statistics.median(r.overhead_s for r in recs),
            "overhead_pct_median": 100 * statistics.median(fr), "overhead_pct_min": 100 * fr[best],
            "overhead_ms_per_step_median": 1e3 * statistics.median(r.overhead_s / r.nfe for r in recs),
        })
        print(f"{key:20s} NFE {rows[-1]['nfe']:3d}  wall {rows[-1]['wall_s_median']:.3f} s  overhead "
              f"{rows[-1]['overhead_pct_median']:.2f} % (min {rows[-1]['overhead_pct_min']:.2f} %)", flush=True)
    return rows


def pipeline_ratio(model, kind, steps, batch, repeats):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if kind == "ddim":
        pipe = DDIMPipeline(unet=model.unet, scheduler=DDIMScheduler.from_config(TRAIN_SCHEDULE))
        run_pipe = lambda r: pipe(batch_size=batch, generator=torch.Generator().manual_seed(r), eta=0.0,  # noqa: E731
                                  num_inference_steps=steps, output_type="np")
    else:
        pipe = DDPMPipeline(unet=model.unet, scheduler=DDPMScheduler.from_config(TRAIN_SCHEDULE))
        run_pipe = lambda r: pipe(batch_size=batch, generator=torch.Generator().manual_seed(r),  # noqa: E731
                                  num_inference_steps=steps, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    run_pipe(0)
    sample(model, kind, steps, batch=batch)
    ours, theirs = [], []
    for r in range(repeats):
        t = time.perf_counter()
        rec = sample(model, kind, steps, batch=batch, seed=r).record
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_pipe(r)
        theirs.append(time.perf_counter() - t)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"{kind}: sample {statistics.median(ours):.3f} s vs {type(pipe).__name__} {statistics.median(theirs):.3f} s "
          f"-> ratio {ratio:.3f} (NFE {rec.nfe} both, batch {batch})", flush=True)
    return {"sampler": kind, "pipeline": type(pipe).__name__, "nfe": rec.nfe, "batch": batch,
            "sample_s_median": statistics.median(ours), "pipeline_s_median": statistics.median(theirs),
            "ratio_sample_over_pipeline": ratio, "sample_s": ours, "pipeline_s": theirs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the 2 shared cores are busy)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    unet = bench_unet()
    model = DiffusionModel(unet, name="bench-unet-16px-1.1M")
    params = sum(p.numel() for p in unet.parameters())
    rows = overhead_table(model, a.steps, a.batch, a.repeats)
    pipes = [pipeline_ratio(model, k, a.steps, a.batch, a.repeats) for k in ("ddim", "ddpm")]
    result = {
        "command": "python benchmarks/sampler_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": a.threads, "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "model": {"kind": "UNet2DModel 1x16x16, block_out_channels (32, 64, 64), random weights", "parameters": params},
        "steps": a.steps, "batch": a.batch, "repeats": a.repeats, "target_overhead_pct": 5.0,
        "overhead": rows, "pipelines": pipes,
        "max_overhead_pct_median": max(r["overhead_pct_median"] for r in rows),
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
