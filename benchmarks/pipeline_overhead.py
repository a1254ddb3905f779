"""The companion's sampling loop against a diffusers pipeline's own ``__call__``, same scheduler, NFE and device.

For each pipeline and step count: seconds per image of ``companion.sampling.sample(model, ..., prompt=...)`` and of
``pipe(prompt, latents=..., output_type="pt")`` (each including prompt encoding, the loop and the VAE decode), their
ratio (the companion's overhead; goal <= 1.02 on a GPU), the NFE of both (counted on the network for the
pipeline), the network time per step, the decode and text-encoding costs reported apart, and peak memory. Runs
alternate companion / pipeline so that load from other processes hits both alike; the figures are medians.

Weights are random: pipelines are built from configs (no download; the config numbers are written below), since
the cost of a forward pass does not depend on the weights' values. A letter tokenizer is written locally.

    python benchmarks/pipeline_overhead.py --size tiny --out benchmarks/results/pipeline_overhead_cpu_tiny   # CPU
    python benchmarks/pipeline_overhead.py --size full --time-limit 420 --out benchmarks/results/pipeline_overhead_gpu

``--size tiny``: SD-shaped pipeline with a 2-level 32/64-channel UNet on 16x16 latents (32 px), float32 — on a CPU
this measures the loop's own overhead, not a realistic workload. ``--size full``: SD-1.5 UNet at 512 px, SDXL UNet at
1024 px and an SD3-medium transformer at 1024 px (T5-XXL omitted: ``text_encoder_3=None``, as diffusers allows;
its prompt is then 77 + 77 tokens instead of 77 + 256), bfloat16 (fp16 random weights overflow), on CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from companion.pipelines import PipelineModel  # noqa: E402
from companion.random_pipelines import FULL, TINY, build, tokenizer  # noqa: E402
from companion.sampling import sample  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
# The configurations (the key numbers of the published SD-1.5, SDXL and SD3-medium configs) are in
# companion/random_pipelines.py.
# --------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class CallCounter:
    """Network calls of the pipeline (a forward pre-hook); with guidance each call holds both halves (2 NFE)."""

    def __init__(self, net):
        self.calls = 0
        self.handle = net.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1


def companion_run(model, cfg, steps, x_T, device):
    peak_reset(device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sample(model, cfg["sampler"], steps, batch=1, prompt=PROMPT, guidance=cfg["guidance"], x_T=x_T, seed=0)
    sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0), res.record, peak(device)


def pipeline_run(model, cfg, steps, x_T, device, counter):
    pipe = model.pipe
    peak_reset(device)
    counter.calls = 0
    t0, c0 = time.perf_counter(), time.process_time()
    pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg["guidance"], latents=x_T.to(device, model.dtype), output_type="pt")
    sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0), counter.calls * 2, peak(device)


def measure(model, cfg, steps: int, repeats: int, device) -> dict:
    """Alternating runs of the companion and of the pipeline (after one warm-up each), medians of ``repeats``.

    Wall time is the figure on a GPU. On a shared CPU the process's CPU time is reported too: other processes
    stretch wall time, not the CPU time this process spends (with one torch thread, all of it is the work)."""
    x_T = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    _, rec, _ = companion_run(model, cfg, steps, x_T, device)  # warm-up; its scheduler is the one the pipeline gets
    model.pipe.scheduler = getattr(diffusers, rec.scheduler_class).from_config(rec.scheduler_config)
    counter = CallCounter(model.unet)
    pipeline_run(model, cfg, steps, x_T, device, counter)
    ours, theirs, ours_cpu, theirs_cpu, recs, nfe_pipe, peaks = [], [], [], [], [], None, [None, None]
    for _ in range(repeats):
        (t, c), rec, p = companion_run(model, cfg, steps, x_T, device)
        ours.append(t)
        ours_cpu.append(c)
        recs.append(rec)
        peaks[0] = p
        (t, c), nfe_pipe, p = pipeline_run(model, cfg, steps, x_T, device, counter)
        theirs.append(t)
        theirs_cpu.append(c)
        peaks[1] = p
    counter.handle.remove()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    row = {
        "steps": steps, "repeats": repeats, "sampler": rec.sampler, "scheduler": rec.scheduler_class,
        "guidance": cfg["guidance"], "nfe_companion": rec.nfe, "nfe_pipeline": nfe_pipe,
        "companion_s_per_image": med(ours), "pipeline_s_per_image": med(theirs),
        "overhead_ratio": med(ours) / med(theirs), "overhead_ratio_of_minima": min(ours) / min(theirs),
        "companion_cpu_s": med(ours_cpu), "pipeline_cpu_s": med(theirs_cpu), "cpu_time_ratio": min(ours_cpu) / min(theirs_cpu),
        "network_ms_per_step": 1e3 * med([statistics.mean(r.network_step_s) for r in recs]),
        "encode_s": med([r.encode_s for r in recs]), "decode_s": med([r.decode_s for r in recs]),
        "loop_network_s": med([sum(r.network_step_s) for r in recs]),
        "solver_overhead_s": med([r.overhead_s for r in recs]),
        "peak_mem_companion_bytes": peaks[0], "peak_mem_pipeline_bytes": peaks[1],
    }
    if rec.nfe != nfe_pipe:
        raise RuntimeError(f"NFE differs: companion {rec.nfe}, pipeline {nfe_pipe} ({row})")
    return row


def repeats_for(steps: int, size: str) -> int:
    return 11 if size == "tiny" else (3 if steps <= 4 else 2 if steps <= 20 else 1)


# --------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = [f"# Pipeline overhead: {result['title']}", "", result["note"], "",
             f"Machine: {result['device_name']}; torch {result['machine']['torch']}, diffusers {result['diffusers']}; "
             f"dtype {result['dtype']}; {result['machine']['cpu_count']} CPU cores, load average "
             f"{result['machine']['load_average_1m_at_start']:.1f} at start; command `{result['machine']['command']}`", "",
             "| pipeline | steps | NFE | companion s/img | pipeline s/img | ratio (medians) | ratio (minima) | CPU-time ratio (minima) | "
             "network ms/step | encode s | decode s | peak GiB (ours / pipe) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['pipeline']} | {r.get('steps', '')} | | | | | | | | | | skipped: {r['skipped']} |")
            continue
        gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
        lines.append(f"| {r['pipeline']} | {r['steps']} | {r['nfe_companion']} | {r['companion_s_per_image']:.4f} | "
                     f"{r['pipeline_s_per_image']:.4f} | {r['overhead_ratio']:.3f} | {r['overhead_ratio_of_minima']:.3f} | "
                     f"{r['cpu_time_ratio']:.3f} | "
                     f"{r['network_ms_per_step']:.2f} | "
                     f"{r['encode_s']:.4f} | {r['decode_s']:.4f} | "
                     f"{gib(r['peak_mem_companion_bytes'])} / {gib(r['peak_mem_pipeline_bytes'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--pipelines", default=None, help="comma-separated from sd15,sdxl,sd3 (default: sd15 for tiny, all for full)")
    ap.add_argument("--steps", default="1,4,20,50")
    ap.add_argument("--device", default=None, help="default: cuda for full, cpu for tiny")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (tiny)")
    ap.add_argument("--time-limit", type=float, default=float("inf"), help="seconds; configurations not started by then are skipped")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if args.size == "full" else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.size == "full" else torch.float32
    kinds = (args.pipelines or ("sd15" if args.size == "tiny" else "sd15,sdxl,sd3")).split(",")
    steps = [int(s) for s in args.steps.split(",")]
    tok = tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    rows = []
    out = Path(args.out)
    for kind in kinds:
        if time.perf_counter() - start > args.time_limit:
            rows.append({"pipeline": kind, "skipped": "time limit"})
            continue
        cfg = TINY if args.size == "tiny" else FULL[kind]
        t0 = time.perf_counter()
        try:
            model = PipelineModel(build(kind, args.size, device, dtype, tok), name=f"{kind}-{args.size}-random")
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"pipeline": kind, "skipped": f"out of memory while building ({e})"})
            continue
        print(f"{kind}: built in {time.perf_counter() - t0:.1f} s, latent {model.sample_shape}, image {model.image_shape}", flush=True)
        for n in steps:
            if time.perf_counter() - start > args.time_limit:
                rows.append({"pipeline": kind, "steps": n, "skipped": "time limit"})
                continue
            try:
                row = dict(pipeline=kind, **measure(model, cfg, n, repeats_for(n, args.size), device))
            except Exception as e:  # one failed configuration (memory, a diverged random network) does not end the check
                rows.append({"pipeline": kind, "steps": n, "skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"})
                print(f"  {n:3d} steps FAILED: {rows[-1]['skipped']}", flush=True)
                continue
            rows.append(row)
            print(f"  {n:3d} steps NFE {row['nfe_companion']:3d}: companion {row['companion_s_per_image']:.4f} s, pipeline "
                  f"{row['pipeline_s_per_image']:.4f} s, ratio {row['overhead_ratio']:.3f} (CPU time {row['cpu_time_ratio']:.3f})",
                  flush=True)
            write(out, args, device, dtype, rows, start)  # after every row: a run cut short keeps what it measured
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(write(out, args, device, dtype, rows, start)))
    return 0


def write(out: Path, args, device, dtype, rows: list, start: float) -> dict:
    """The result so far as ``out``.json and ``out``.md."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if args.size == "tiny":
        title = "CPU, tiny random pipeline"
        per_step = statistics.median([r["network_ms_per_step"] for r in rows if "network_ms_per_step" in r] or [float("nan")])
        note = ("**A CPU figure with tiny random weights** (SD-shaped pipeline: 32/64-channel UNet on 16x16 latents, "
                f"a 2-layer 32-wide CLIP text encoder, 32 px images; float32; {torch.get_num_threads()} thread(s) on a "
                f"shared machine). A guided network call costs ~{per_step:.0f} ms here, so the loop's own costs weigh far "
                "more than on a real model. The machine is shared (load average at start in `machine`): other processes "
                "stretch wall time by tens of percent either way, so the **CPU-time ratio of minima** (this process's CPU "
                "time, one torch thread; load only ever adds to it) is the figure to read here. Not a "
                "GPU figure: benchmarks/device_check.sh runs the full-size one. Same scheduler, same NFE (checked), "
                "alternating runs; medians.")
    else:
        title = f"{gpu}, full-size random pipelines"
        note = ("Full-size configurations with random weights (SD-1.5 UNet at 512 px, SDXL UNet at 1024 px, SD3-medium "
                "transformer at 1024 px without T5), bfloat16, batch 1, classifier-free guidance (2 NFE per step). "
                "Same scheduler, same NFE (checked), alternating runs; medians.")
    result = {"title": title, "note": note, "device": str(device), "device_name": gpu or machine()["cpu"],
              "dtype": str(dtype).replace("torch.", ""), "diffusers": diffusers.__version__, "machine": machine(),
              "prompt": PROMPT, "rows": rows, "total_s": time.perf_counter() - start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
