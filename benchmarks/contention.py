"""Sampling beside a busy neighbour: the companion's thread policy against torch's defaults.

A reader's laptop always has a browser and JupyterLab beside the kernel. The workload is the tour's first
demonstration shortened to DDPM-200 (``digits-cond``, batch 8; the tour runs DDPM-1000, five times the work),
timed in a fresh process four ways: alone and beside a neighbour process that keeps two torch threads busy with
matrix products, each with torch's defaults (torch imported first: all cores, OpenMP's default waiting) and with
the companion's policy (threads sized to the cores that are free at import by ``companion.device.fit_threads``). Reported: the slowdown busy/alone of each; fair sharing of the cores between
two processes would be about 2x.

    python benchmarks/contention.py --repeats 2 --out benchmarks/results/contention.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import sys, time, json
if sys.argv[1] == "defaults":
    import companion
    import torch
    torch.set_num_threads(__import__("os").cpu_count())  # torch's default: every core
else:
    import companion
    import torch
from companion import load, sample
m = load("digits-cond")
sample(m, "ddpm", 10, batch=8, seed=0)  # warm-up
times = []
for r in range(int(sys.argv[2])):
    t = time.perf_counter()
    sample(m, "ddpm", 200, batch=8, seed=r)
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "threads": torch.get_num_threads(),
                  "omp_wait_policy": __import__("os").environ.get("OMP_WAIT_POLICY")}))
"""

NEIGHBOUR = r"""
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


def run_workload(mode: str, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "COMPANION_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode, str(repeats)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_neighbour(fn):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env, start_new_session=True)
    try:
        time.sleep(2.0)  # let it reach full speed
        return fn()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # stop it and any child by its own process group
        proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    results = {}
    for mode in ("defaults", "companion"):
        alone = run_workload(mode, a.repeats)
        busy = with_neighbour(lambda: run_workload(mode, a.repeats))
        med_alone, med_busy = statistics.median(alone["times"]), statistics.median(busy["times"])
        results[mode] = {"alone_s": alone["times"], "busy_s": busy["times"], "threads_alone": alone["threads"],
                         "threads_busy": busy["threads"], "omp_wait_policy": busy["omp_wait_policy"],
                         "slowdown_busy_over_alone": med_busy / med_alone}
        print(f"{mode:9s}: alone {med_alone:.2f} s ({alone['threads']} threads), beside a busy neighbour "
              f"{med_busy:.2f} s ({busy['threads']} threads) -> {med_busy / med_alone:.2f}x", flush=True)
    result = {
        "benchmark": "DDPM-200, digits-cond, batch 8: alone and beside a busy 2-thread torch process",
        "command": "python benchmarks/contention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "fair_share_slowdown": 2.0,
        "results": results,
        "companion_over_defaults_beside_neighbour": statistics.median(results["companion"]["busy_s"])
        / statistics.median(results["defaults"]["busy_s"]),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
