"""Where does the 4-step progressive student's gap to its 50-step teacher come from? The longer-first-stage experiment.

The bundled chain (digits-pd-32 ... digits-pd-4, 300 optimiser steps per stage) reaches FD 0.65 at 4 steps
against the teacher's 0.06 at 50 (benchmarks/results/distillation.json), and most of that distance is there after
the FIRST stage already (digits-pd-32 at 32 steps). The first stage is also where the student switches from the
teacher's eps output to v. Hypothesis: stage 1 is too short. This script retrains the chain down to 4 steps with
a longer stage 1 (the later stages as bundled), and measures stage 1 and the 4-step student of both chains against
the teacher with 2,000 samples each (FD in features-digits space, 95 % intervals; the differences with MOVER
intervals, which treat the arms as independent although they share noise and labels).

    .venv/bin/python benchmarks/pd_gap.py [--stage1-steps 1200] [--n-samples 2000] [--threads 2]

Writes benchmarks/results/pd_gap.{json,md}. The trained chain goes to runs/pd_gap/ (not bundled).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

RESULTS = HERE / "results"
CHAIN = (32, 16, 8, 4)  # the stages down to the 4-step student


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1-steps", type=int, default=1200, help="optimiser steps of the first stage (bundled: 300)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: the recipes')")
    p.add_argument("--out", default=str(HERE.parent / "runs" / "pd_gap"), help="where the retrained chain goes")
    p.add_argument("--cache-dir", default=None, help="sweep cache (default: the companion's)")
    args = p.parse_args(argv)

    import pandas as pd

    from companion import bench, distill, load, recipes
    from companion.metrics import Measurement
    from companion.verdicts import difference

    info = machine()
    t0 = time.perf_counter()
    out = Path(args.out)
    teacher, trained, train_s = "digits-cond", {}, {}
    for n in CHAIN:
        name = distill.pd_name(n)
        steps = args.stage1_steps if n == CHAIN[0] else recipes.recipe(name).steps
        folder = recipes.run_recipe(name, out=out / name, steps=steps, config={"teacher": teacher}, measure=False,
                                    threads=args.threads, keep=False)
        trained[n], teacher = folder, str(folder)
        train_s[name] = load(folder).card["training_seconds"]

    kw = dict(n_samples=args.n_samples, metrics=("fd", "class_accuracy"), cache_dir=args.cache_dir, progress=True,
              modes=({"spacing": "trailing"},))
    rows = []
    for label, model, steps in (("teacher digits-cond", load("digits-cond"), 50),
                                ("bundled stage 1 (300 steps)", load(distill.pd_name(32)), 32),
                                (f"longer stage 1 ({args.stage1_steps} steps)", load(trained[32]), 32),
                                ("bundled 4-step student", load(distill.pd_name(4)), 4),
                                ("4-step student after the longer stage 1", load(trained[4]), 4)):
        r = bench.sweep(model, ["euler"], [steps], **kw).iloc[0]
        rows.append({"model": label, "steps": steps, "fd": r.fd, "fd_low": r.fd_low, "fd_high": r.fd_high,
                     "class_accuracy": r.class_accuracy})
    table = pd.DataFrame(rows)

    def m(i):
        r = table.iloc[i]
        return Measurement("fd", float(r.fd), float(r.fd_low), float(r.fd_high), args.n_samples, "features-digits")

    diffs = {"stage 1: longer minus bundled": difference(m(2), m(1)),
             "4-step: longer-stage-1 chain minus bundled chain": difference(m(4), m(3)),
             "4-step (longer stage 1) minus teacher at 50": difference(m(4), m(0)),
             "4-step (bundled) minus teacher at 50": difference(m(3), m(0))}
    result = {"machine": info, "seconds": round(time.perf_counter() - t0, 1), "n_samples": args.n_samples,
              "stage1_steps": args.stage1_steps, "bundled_stage1_steps": recipes.recipe(distill.pd_name(32)).steps,
              "training_seconds": train_s, "rows": json.loads(table.round(4).to_json(orient="records")),
              "differences": {k: [round(d.value, 4), round(d.low, 4), round(d.high, 4)] for k, d in diffs.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pd_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# The 4-step gap: a longer first distillation stage ({args.n_samples} samples, FD in features-digits space)", "",
          f"Machine: {info['cpu']}, {info['torch_threads']} torch thread(s), load {info['load_average_1m_at_start']:.2f} at start; "
          f"`{info['command']}`; {result['seconds']} s (training {round(sum(train_s.values()), 1)} s).", "",
          "| model | steps | FD | FD 95 % | class accuracy |", "| --- | --- | --- | --- | --- |",
          *[f"| {r.model} | {r.steps} | {r.fd:.3f} | [{r.fd_low:.3f}, {r.fd_high:.3f}] | {r.class_accuracy:.3f} |"
            for r in table.itertuples()], "",
          *[f"- {k}: {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for k, d in diffs.items()], ""]
    (RESULTS / "pd_gap.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
