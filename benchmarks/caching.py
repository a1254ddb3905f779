"""Feature caching (DeepCache) on a bundled model: speed-up against quality, measured side by side.

For each cache interval N (1 = the uncached network) the same sampler runs from the same noise:

* speed: wall time of a batch, interleaved over the intervals and repeated, reported as the ratio of medians
  against N = 1 with a bootstrap interval (companion.verdicts.ratio_of_medians);
* FLOPs: the share of a full call the shallow branch costs (exact count) and the expected speed-up from it;
* quality: FD with its 95 % interval on ``--n`` samples (features-digits, images clamped), and the RMS distance of
  each sample from the uncached run's sample from the same noise (mean with a bootstrap interval);
* a verdict stated before the run: N keeps quality if its FD is at most 25 % worse than N = 1's (non-inferiority
  on the MOVER interval of the difference).

    python benchmarks/caching.py --intervals 1,2,3,5 --n 1000 --repeats 5 --out benchmarks/results/caching_digits-cond.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine  # noqa: E402

from companion import load, sample  # noqa: E402
from companion.caching import DeepCache, shallow_fraction  # noqa: E402
from companion.metrics import frechet_distance, mean_measurement  # noqa: E402
from companion.verdicts import Rule, judge, ratio_of_medians  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-cond")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--intervals", default="1,2,3,5")
    ap.add_argument("--n", type=int, default=1000, help="samples for FD and the distance to the uncached run")
    ap.add_argument("--batch", type=int, default=64, help="batch for the timed runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    intervals = [int(s) for s in args.intervals.split(",")]
    if intervals[0] != 1:
        raise SystemExit("--intervals must start with 1 (the uncached baseline)")
    model = load(args.model)
    labels = torch.arange(args.n) % model.num_classes if model.num_classes else None
    kw = dict(sampler=args.sampler, steps=args.steps)

    # speed: interleaved repeats, so a busy moment of the machine hits every interval alike
    tl = torch.arange(args.batch) % model.num_classes if model.num_classes else None
    sample(model, batch=args.batch, seed=99, class_labels=tl, **kw)  # warm-up, untimed
    times = {n: [] for n in intervals}
    for rep in range(args.repeats):
        for n in intervals:
            t0 = time.perf_counter()
            sample(model, batch=args.batch, seed=rep, class_labels=tl, wrap=DeepCache(model, n), **kw)
            times[n].append(time.perf_counter() - t0)

    frac = shallow_fraction(model)
    base = sample(model, batch=args.n, seed=0, class_labels=labels, **kw)
    base_fd = frechet_distance(base.images.clamp(-1, 1))
    rows = []
    for n in intervals:
        dc = DeepCache(model, n)
        run = base if n == 1 else sample(model, batch=args.n, seed=0, class_labels=labels, wrap=dc, **kw)
        full_share = 1.0 if n == 1 else dc.full_calls / dc.calls
        fd = base_fd if n == 1 else frechet_distance(run.images.clamp(-1, 1))
        dist = mean_measurement("rms_to_uncached", (run.samples - base.samples).flatten(1).pow(2).mean(1).sqrt())
        speed = ratio_of_medians(times[1], times[n], name="speed-up vs N=1")
        row = {"interval": n, "full_call_share": full_share,
               "flops_speedup_expected": 1.0 / (full_share + (1 - full_share) * frac),
               "wall_s_median": sorted(times[n])[len(times[n]) // 2], "speedup": speed.as_dict(),
               "fd": fd.as_dict(), "rms_to_uncached": dist.as_dict()}
        if n != 1:
            rule = Rule(f"DeepCache N={n} keeps quality", "FD (features-digits)", "non-inferiority", False, args.n, margin=0.25)
            v = judge(rule, fd, base_fd)
            row["verdict"] = {"rule": rule.describe(), "outcome": v.outcome, "interval": [v.statistic.low, v.statistic.high],
                              "power": v.power()}
        rows.append(row)
        print(f"N={n}: speed-up {speed.value:.2f} [{speed.low:.2f}, {speed.high:.2f}] (FLOPs predict {row['flops_speedup_expected']:.2f}), "
              f"FD {fd.value:.3f} [{fd.low:.3f}, {fd.high:.3f}], RMS to uncached {dist.value:.4f}"
              + (f", keeps quality: {row['verdict']['outcome']}" if n != 1 else ""), flush=True)
    doc = {"benchmark": "DeepCache feature caching: speed-up and quality against the uncached network",
           "machine": machine(), "model": args.model, "sampler": args.sampler, "steps": args.steps, "n": args.n,
           "batch_timed": args.batch, "repeats": args.repeats, "shallow_branch_flops_fraction": frac, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print("written", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
