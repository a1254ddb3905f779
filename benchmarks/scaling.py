"""How a sweep scales with processes: one fixed grid run by `companion bench` in 1 process and under
`accelerate launch` in N processes, side by side, interleaved, each against an empty cache.

    .venv/bin/python benchmarks/scaling.py            # CPU: 1 vs 2 processes, 1 torch thread each
    .venv/bin/python benchmarks/scaling.py --gpu      # every GPU: 1 process on one GPU vs one process per GPU

Efficiency = t1 / (N * tN) (1.0: N processes are N times faster). Two times per command: the whole command as a
user waits for it (launcher, imports and model loads included), and the sweep itself (first rank's start to last
rank's end, from the ranks' logs). The machine's 1-minute load average is recorded before and after every command:
on a shared machine other work takes cores from the processes being timed.
Writes benchmarks/results/scaling_cpu_<N>core.{json,md} or scaling_gpu_<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

RESULTS = HERE / "results"
MODELS = ("digits-cond", "digits-design-narrow")
SAMPLERS = ("ddim", "dpmpp_2m")
STEPS = (10, 20)
N_SAMPLES = 128
METRICS = ("fd", "class_accuracy")


def bench_args(out: Path, device: str) -> list[str]:
    return ["-m", "companion", "bench", "--model", ",".join(MODELS), "--samplers", ",".join(SAMPLERS),
            "--steps", ",".join(map(str, STEPS)), "--n-samples", str(N_SAMPLES), "--metrics", ",".join(METRICS),
            "--device", device, "--out", str(out), "--no-progress"]


def command(processes: int, out: Path, device: str) -> list[str]:
    if processes == 1:
        return [sys.executable, *bench_args(out, device)]
    # --multi_gpu starts N processes through torch.distributed's launcher; with --device cpu they talk over gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *bench_args(out, device)]


def sweep_seconds(out: Path) -> float:
    """First rank's start to last rank's end of the sweep, from the ranks' logs."""
    events = [json.loads(line) for f in (out / "log").glob("rank-*.jsonl") for line in f.read_text().splitlines()]
    starts = [e["time"] for e in events if e["event"] == "start"]
    ends = [e["time"] for e in events if e["event"] == "done"]
    return max(ends) - min(starts)


def timed(processes: int, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        out = Path(tmp) / "out"
        env = dict(os.environ, COMPANION_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(command(processes, out, device), cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        import pandas as pd

        df = pd.read_csv(out / "bench.csv")
        return {"processes": processes, "wall_s": round(wall, 3), "sweep_s": round(sweep_seconds(out), 3),
                "runs": len(df), "computed": int((~df["cached"]).sum()), "ranks_used": sorted(map(int, set(df["rank"]))),
                "sum_run_wall_s": round(float(df["wall_s"].sum()), 3), "device_name": str(df["device_name"].iloc[0]),
                "load_1m_before": round(load_before, 2), "load_1m_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="1 GPU vs every GPU of this machine (default: CPU processes)")
    p.add_argument("--processes", type=int, default=2, help="CPU processes to compare with one (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved pairs of runs (default 2)")
    args = p.parse_args(argv)
    import torch

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device on this machine; run without --gpu for CPU processes")
        n, device, threads = torch.cuda.device_count(), "cuda", 4
        name = "gpu_" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
    else:
        n, device, threads = args.processes, "cpu", 1
        name = f"cpu_{os.cpu_count()}core"
    if n < 2:
        raise SystemExit(f"only {n} device(s): scaling needs at least 2 processes")
    info = machine()
    runs = []
    for r in range(args.repeats):  # interleaved: 1, N, 1, N, ... so drifting load hits both alike
        for k in (1, n):
            runs.append(dict(timed(k, device, threads), repeat=r))
            print(json.dumps(runs[-1]), flush=True)
    best = {k: min((x for x in runs if x["processes"] == k), key=lambda x: x["wall_s"]) for k in (1, n)}
    result = {
        "what": f"companion bench, {len(MODELS)} models x {len(SAMPLERS)} samplers x {len(STEPS)} step counts "
                f"({len(MODELS) * len(SAMPLERS) * len(STEPS)} runs), {N_SAMPLES} samples per run, metrics {', '.join(METRICS)}, "
                f"empty cache each time; 1 process vs {n} under accelerate launch, {threads} torch thread(s) per process",
        "models": MODELS, "samplers": SAMPLERS, "steps": STEPS, "n_samples": N_SAMPLES, "metrics": METRICS,
        "device": device, "processes": n, "threads_per_process": threads, "machine": info, "runs": runs,
        "efficiency_wall": round(best[1]["wall_s"] / (n * best[n]["wall_s"]), 3),
        "efficiency_sweep": round(best[1]["sweep_s"] / (n * best[n]["sweep_s"]), 3),
        "speedup_wall": round(best[1]["wall_s"] / best[n]["wall_s"], 3),
        "speedup_sweep": round(best[1]["sweep_s"] / best[n]["sweep_s"], 3),
        "note": "efficiency = t1 / (N * tN) from the fastest run of each; wall includes the launcher, imports and model "
                "loads, sweep is first rank start to last rank end (ranks' logs)",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scaling_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {x['repeat']} | {x['processes']} | {x['wall_s']:.1f} | {x['sweep_s']:.1f} | {x['sum_run_wall_s']:.1f} | "
                     f"{x['ranks_used']} | {x['load_1m_before']} / {x['load_1m_after']} |" for x in runs)
    md = f"""# Sweep scaling: 1 process vs {n} ({device})

- date (UTC): {info['date_utc']}
- machine: {info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']}; {threads} torch thread(s) per process; the machine was shared (load averages below)
- command: `python benchmarks/scaling.py{' --gpu' if args.gpu else ''}`
- grid: {result['what']}

| repeat | processes | whole command (s) | sweep (s) | sum of run wall times (s) | ranks that ran | load 1 min before / after |
|---|---|---|---|---|---|---|
{rows}

Fastest of each: speed-up {result['speedup_wall']}x for the whole command (efficiency {result['efficiency_wall']}),
{result['speedup_sweep']}x for the sweep itself (efficiency {result['efficiency_sweep']}); efficiency = t1 / ({n} * t{n}).
"""
    (RESULTS / f"scaling_{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
