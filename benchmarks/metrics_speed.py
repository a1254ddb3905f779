"""How long the image metrics take: FD + precision/recall (and density/coverage) on 2,000 samples.

Target: <= 10 s on a 2-core CPU, with the reference statistics of the real data already cached in memory
(they are computed once per feature network and process). The cold reference cost is reported separately.

    .venv/bin/python benchmarks/metrics_speed.py [--n 2000] [--repeats 3]

Writes benchmarks/results/metrics_speed.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

from companion import metrics as M  # noqa: E402
from companion.data import digits, shapes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 10.0


def sample_set(dataset: str, n: int) -> torch.Tensor:
    """``n`` held-out real images, drawn with replacement and lightly noised (stand-ins for generated samples)."""
    x = digits(16, "test")[0] if dataset == "digits" else shapes("test")[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(x), (n,), generator=g)
    return x[idx] + 0.05 * torch.randn((n, *x.shape[1:]), generator=g)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(dataset: str, n: int, repeats: int) -> dict:
    feature = f"features-{dataset}"
    images = sample_set(dataset, n)
    ref, ref_s = timed(lambda: M.reference(feature, "train"))
    times = []
    for _ in range(repeats):
        res, s = timed(lambda: M.evaluate_images(images, metrics=("fd", "prdc"), feature=feature))
        times.append(s)
    _, kid_s = timed(lambda: M.evaluate_images(images, metrics=("kid",), feature=feature))
    return {
        "dataset": dataset, "feature": feature, "n_samples": n, "n_reference": ref.n,
        "reference_cold_s": round(ref_s, 3),
        "fd_prdc_s": [round(t, 3) for t in times], "fd_prdc_median_s": round(sorted(times)[len(times) // 2], 3),
        "kid_s": round(kid_s, 3),
        "target_s": TARGET_S,
        "values": {k: repr(v) for k, v in res.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--datasets", default="digits,shapes")
    args = p.parse_args(argv)
    info = machine()
    rows = [run(d, args.n, args.repeats) for d in args.datasets.split(",")]
    out = {"machine": info, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metrics_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Metric speed: FD + precision/recall/density/coverage on generated-size sample sets",
        "",
        f"- date (UTC): {info['date_utc']}",
        f"- machine: {info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']} with {info['torch_threads']} threads; "
        f"1-minute load average at start {info['load_average_1m_at_start']:.1f} (the machine was shared)",
        f"- command: `{info['command']}`",
        "- timings: the whole call (feature extraction, FD with a 200-resample bootstrap, k-NN manifolds with "
        "k = 5 and their bootstrap), reference statistics already cached; the cold reference is listed apart.",
        "",
        "| feature space | samples | reference | FD+PRDC median (s) | all repeats (s) | KID (s) | cold reference (s) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "met" if r["fd_prdc_median_s"] <= TARGET_S else "MISSED"
        lines.append(f"| {r['feature']} | {r['n_samples']} | {r['n_reference']} | {r['fd_prdc_median_s']} | "
                     f"{', '.join(map(str, r['fd_prdc_s']))} | {r['kid_s']} | {r['reference_cold_s']} | <= {TARGET_S:g} s: {ok} |")
    lines += ["", "Values measured (held-out real images + N(0, 0.05^2) noise, drawn with replacement):", ""]
    for r in rows:
        lines += [f"- {r['feature']}: " + "; ".join(r["values"].values())]
    (RESULTS / "metrics_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["fd_prdc_median_s"] <= TARGET_S for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
