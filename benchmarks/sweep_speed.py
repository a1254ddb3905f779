"""How long the default speed/quality sweep takes: cold (nothing cached) and from the run cache.

The sweep used by the samplers chapter: ``digits-cond``, 6 samplers x 5 step counts, 256 samples per run,
the default metrics (FD, precision/recall/density/coverage, class accuracy). Targets on a 2-core CPU: <= 3 minutes cold, <= 2 s from the cache.

    .venv/bin/python benchmarks/sweep_speed.py [--model digits-cond] [--n-samples 256]

The cold run happens in this process with an empty cache folder; the cached rerun in a fresh process
(so no in-memory state helps it), timing the ``sweep`` call and the whole process. Writes
benchmarks/results/sweep_speed_<model>.{json,md,csv}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

RESULTS = HERE / "results"
SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "unipc", "euler_a")
STEPS = (5, 10, 15, 20, 30)
COLD_TARGET_S = 180.0
CACHED_TARGET_S = 2.0


def timed_sweep(model_name: str, n_samples: int, cache_dir: str, progress: bool) -> tuple[float, float, "pd.DataFrame"]:  # noqa: F821
    """(seconds for load + sweep, seconds for the sweep call alone, table)."""
    t0 = time.perf_counter()
    from companion import bench
    from companion.models import load

    model = load(model_name)
    t1 = time.perf_counter()
    df = bench.sweep(model, SAMPLERS, STEPS, n_samples=n_samples, cache_dir=cache_dir, progress=progress)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, df


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-cond")
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--cached-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cached_child:  # the from-cache rerun, in its own process
        t_proc = time.perf_counter()
        _, sweep_s, df = timed_sweep(args.model, args.n_samples, args.cached_child, progress=False)
        print(json.dumps({"sweep_s": sweep_s, "all_cached": bool(df["cached"].all()), "rows": len(df),
                          "in_process_s": time.perf_counter() - t_proc}))
        return 0
    info = machine()
    cache = tempfile.mkdtemp(prefix="sweep-speed-")  # kept if interrupted: finished runs stay there
    print(f"run cache: {cache}", flush=True)
    total_s, sweep_s, df = timed_sweep(args.model, args.n_samples, cache, progress=True)
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--model", args.model, "--n-samples", str(args.n_samples),
                            "--cached-child", cache] + (["--threads", str(args.threads)] if args.threads else []), capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - t0
    shutil.rmtree(cache)
    cached = json.loads(child.stdout.strip().splitlines()[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_speed_{Path(args.model).name}"
    df.to_csv(RESULTS / f"{stem}.csv", index=False)
    out = {
        "machine": info, "model": args.model, "samplers": SAMPLERS, "steps": STEPS, "n_samples": args.n_samples,
        "runs": len(df), "total_nfe_per_sample": int(df["nfe"].sum()),
        "cold_s": round(total_s, 2), "cold_sweep_call_s": round(sweep_s, 2),
        "network_s_sum": round(float(df["network_s"].sum()), 2),
        "cached_sweep_call_s": round(cached["sweep_s"], 3), "cached_all_rows_from_cache": cached["all_cached"],
        "cached_process_s": round(process_s, 2),
        "targets": {"cold_s": COLD_TARGET_S, "cached_s": CACHED_TARGET_S},
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    from companion.bench import summary_table

    table = summary_table(df).drop(columns=[c for c in ("guidance", "mode", "seed") if c in df.columns])
    lines = [
        f"# Sweep speed: {args.model}, {len(SAMPLERS)} samplers x {len(STEPS)} step counts, {args.n_samples} samples per run",
        "",
        f"- date (UTC): {info['date_utc']}",
        f"- machine: {info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']} with {info['torch_threads']} threads; "
        f"1-minute load average at start {info['load_average_1m_at_start']:.1f} (the machine was shared)",
        f"- command: `{info['command']}`",
        f"- samplers: {', '.join(SAMPLERS)}; steps: {', '.join(map(str, STEPS))}; metrics: FD, precision/recall/density/coverage, "
        "class accuracy (the sweep's defaults)",
        "",
        "| measurement | seconds | target |",
        "|---|---|---|",
        f"| cold: model load + sweep (empty cache) | {out['cold_s']} | <= {COLD_TARGET_S:g} s: {'met' if out['cold_s'] <= COLD_TARGET_S else 'MISSED'} |",
        f"| of which inside the network (sum of runs) | {out['network_s_sum']} | |",
        f"| from cache: the sweep call (fresh process) | {out['cached_sweep_call_s']} | <= {CACHED_TARGET_S:g} s: {'met' if out['cached_sweep_call_s'] <= CACHED_TARGET_S else 'MISSED'} |",
        f"| from cache: whole process incl. imports and model load | {out['cached_process_s']} | |",
        "",
        "## The sweep's results",
        "",
        table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else "```\n" + table.to_string(index=False) + "\n```",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["cold_s"] <= COLD_TARGET_S and out["cached_sweep_call_s"] <= CACHED_TARGET_S else 1


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
