"""Latency of a sampler panel: from a slider change to updated images and curve.

Drives ``companion.widgets.SamplerPanel`` on the bundled ``digits-cond`` model exactly as a reader does
(set the steps slider, wait for the run) and measures the time from the value change until the image,
the record and the figure have been updated. Default: DDIM, 20 NFE per sample (10 steps with
classifier-free guidance), batch 16. Target: median <= 0.5 s on a 2-core CPU.

For comparison it first times the same work (sample + quality + image/record/curve update) called directly on
the main thread, before the panel's worker exists. The panel runs on a worker thread; on a 2-CPU machine torch's
OpenMP runtime (libgomp) stops spin-waiting as soon as two threads keep thread pools (the kernel's and the
worker's), and every parallel region of the network then pays a sleep/wake-up. The panel's runner therefore
releases the requesting thread's idle pool before a run and the worker's after it
(``companion.device.release_cpu_threads``); without that the median here was 0.81-0.86 s, with it 0.41-0.44 s
(A/B on the same machine, 20 repeats each, 2026-11-27).

"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--model", default="digits-cond")
    p.add_argument("--out", default="benchmarks/results/panel_latency.json")
    a = p.parse_args(argv)

    from companion import load
    from companion.widgets import SamplerPanel

    model = load(a.model)
    panel = SamplerPanel(model, controls=("sampler", "steps", "guidance", "seed"),
                         defaults={"sampler": "ddim", "steps": 10, "guidance": 2.0, "batch": 16})
    latencies, nfes = [], []
    steps_cycle = (10, 11)  # alternate so every change is a real change; ~20 NFE per sample with guidance
    # the floor first, before the panel's worker thread (and its OpenMP team) exists
    direct = []
    params = panel.params()
    for i in range(a.repeats):
        params["steps"] = steps_cycle[i % 2]
        t0 = time.perf_counter()
        panel._show(params, panel._compute(params))
        direct.append(time.perf_counter() - t0)
    panel.history.clear()
    for i in range(a.repeats):
        before = len(panel.history)
        t0 = time.perf_counter()
        panel.controls["steps"].value = steps_cycle[(i + 1) % 2]
        if not panel.wait(120):
            raise SystemExit("panel did not finish a run within 120 s")
        dt = time.perf_counter() - t0
        if len(panel.history) != before + 1 or panel.error.value:
            raise SystemExit(f"run {i} failed: {panel.error.value}")
        latencies.append(dt)
        nfes.append(panel.history[-1].result.record.nfe)

    def dist(xs):
        xs = sorted(xs)
        q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]
        return {"median": statistics.median(xs), "p10": q(0.1), "p90": q(0.9), "min": xs[0], "max": xs[-1]}

    result = {
        "benchmark": "panel latency (slider change -> updated images, record and curve)",
        "command": "python " + " ".join([Path(__file__).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "model": a.model, "sampler": "ddim", "batch": 16, "nfe_per_sample": sorted(set(nfes)),
        "repeats": a.repeats,
        "latency_s": dist(latencies),
        "same_work_on_main_thread_s": dist(direct),
        "target_median_s": 0.5,
        "target_met": statistics.median(latencies) <= 0.5,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
