"""Before/after on one machine in one run: the sampler-overhead and panel-latency benchmarks of two revisions.

A restructuring of the sampling path must not make it slower. Absolute times drift with the machine's load, so
both revisions run here side by side, interleaved A B, B A, ... (``--rounds`` pairs), each benchmark in a fresh
process that imports its own revision's ``companion`` (a temporary git worktree of ``--before``; the working
tree for "after"). Reported: the ratio after/before of the medians over all runs of each revision, per sampler
(wall time of ``sample``) and for the panel's slider-to-update latency. A ratio <= 1 + its spread is "no slower".

    python benchmarks/ab_compare.py --before 93db88d --rounds 2 --out benchmarks/results/ab_refactor.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tree: Path, script: str, args: list[str], out: Path) -> dict:
    """One benchmark run in a fresh interpreter that imports ``tree``'s companion."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(tree / "benchmarks" / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


LOOP = r"""
import json, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from companion.oracle import toy_mixture
from companion.sampling import sample
m = toy_mixture((1, 2, 2))
out = {}
for key in ("ddim", "dpmpp_2m", "heun", "euler_a"):
    sample(m, key, 50, batch=1, spacing="trailing")
    times = []
    for r in range(7):
        t = time.perf_counter()
        sample(m, key, 500, batch=1, seed=r, spacing="trailing")
        times.append(time.perf_counter() - t)
    out[key] = statistics.median(times) / 500 * 1e6  # microseconds per step, network almost free
print(json.dumps(out))
"""


def loop_overhead(tree: Path) -> dict:
    """Microseconds per step of ``sample`` on a 4-number exact-score model: the loop's own cost, which is all a
    restructuring of the sampling path can change (the network time dominates real runs and is not touched)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", LOOP], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"loop benchmark failed in {tree}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="93db88d", help="git revision to compare against (default: before the core refactor)")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (A B, then B A, ...) per benchmark")
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--panel-repeats", type=int, default=20)
    p.add_argument("--loop-only", action="store_true", help="only the per-step loop overhead (a minute)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    work = Path(tempfile.mkdtemp(prefix="companion-ab-"))
    before = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), a.before], check=True,
                   capture_output=True)
    try:
        rev = subprocess.run(["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        trees = {"before": before, "after": ROOT}
        runs: dict[str, dict[str, list]] = {"before": {"overhead": [], "panel": []}, "after": {"overhead": [], "panel": []}}
        order = [who for r in range(a.rounds) for who in (("before", "after") if r % 2 == 0 else ("after", "before"))]
        if a.loop_only:
            loops = {"before": [], "after": []}
            for who in order:
                loops[who].append(loop_overhead(trees[who]))
            result = {
                "benchmark": "sample() loop overhead per step (us) on a 4-number exact-score model, 500 trailing steps, batch 1, 1 thread",
                "command": "python benchmarks/ab_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
                "before": rev, "after": f"{head} + working tree", "order": order,
                "us_per_step": {k: {"before": statistics.median(r[k] for r in loops["before"]),
                                    "after": statistics.median(r[k] for r in loops["after"])} for k in loops["after"][0]},
            }
            for v in result["us_per_step"].values():
                v["ratio"] = v["after"] / v["before"]
            print(json.dumps(result["us_per_step"], indent=1))
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
            return 0
        for i, who in enumerate(order):
            ov = run_benchmark(trees[who], "sampler_overhead.py", ["--repeats", str(a.overhead_repeats)], work / f"ov-{i}.json")
            runs[who]["overhead"].append({row["sampler"]: row["wall_s_median"] for row in ov["overhead"]})
            pl = run_benchmark(trees[who], "panel_latency.py", ["--repeats", str(a.panel_repeats)], work / f"pl-{i}.json")
            runs[who]["panel"].append(pl["latency_s"]["median"])
            print(f"run {i + 1}/{len(order)} ({who}): panel median {pl['latency_s']['median']:.3f} s, "
                  f"ddim wall {runs[who]['overhead'][-1]['ddim']:.3f} s", flush=True)
        samplers = sorted(runs["after"]["overhead"][0])
        per_sampler = {}
        for s in samplers:
            b = statistics.median(run[s] for run in runs["before"]["overhead"])
            f = statistics.median(run[s] for run in runs["after"]["overhead"])
            per_sampler[s] = {"before_s": b, "after_s": f, "ratio": f / b}
        ratios = [v["ratio"] for v in per_sampler.values()]
        panel_b, panel_a = statistics.median(runs["before"]["panel"]), statistics.median(runs["after"]["panel"])
        result = {
            "benchmark": "before/after: sample() wall time per sampler (sampler_overhead.py) and panel latency (panel_latency.py)",
            "command": "python benchmarks/ab_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()},
            "before": rev, "after": f"{head} + working tree", "order": order,
            "sample_wall_ratio_after_over_before": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "per_sampler": per_sampler,
            "panel_latency_median_s": {"before": panel_b, "after": panel_a, "ratio": panel_a / panel_b,
                                       "runs_before": runs["before"]["panel"], "runs_after": runs["after"]["panel"]},
        }
        print(json.dumps({k: result[k] for k in ("sample_wall_ratio_after_over_before", "panel_latency_median_s")}, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
