"""Where does the 4-step progressive student's gap to its 50-step teacher come from? Two experiments.

The bundled chain (digits-pd-32 ... digits-pd-4, 300 optimiser steps per stage) reaches FD 0.65 at 4 steps
against the teacher's 0.06 at 50 (benchmarks/results/distillation.json), and most of that distance is there after
the FIRST stage already (digits-pd-32 at 32 steps). The first stage is also where the student switches from the
teacher's eps output to v. Hypothesis: stage 1 is too short. This script retrains the chain down to 4 steps with
a longer stage 1 (the later stages as bundled), and measures stage 1 and the 4-step student of both chains against
the teacher with 2,000 samples each (FD in features-digits space, 95 % intervals; the differences with MOVER
intervals, which treat the arms as independent although they share noise and labels).

The second experiment (``--experiment v-teacher``) tests the other suspect, the switch from the teacher's eps output
to the students' v: it trains a v-predicting teacher with digits-cond's recipe (data, network, optimiser, 4500 steps;
only the prediction differs), distils it down to 4 steps with the bundled stage lengths, and compares both chains,
each against its own teacher at 50 steps.

    .venv/bin/python benchmarks/pd_gap.py [--stage1-steps 1200] [--n-samples 2000] [--threads 2]
    .venv/bin/python benchmarks/pd_gap.py --experiment v-teacher [--n-samples 2000] [--threads 2]

Writes benchmarks/results/pd_gap.{json,md} (longer stage 1) or pd_gap_v_teacher.{json,md}. The trained models go to
runs/pd_gap/ (not bundled).
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


def train_chain(teacher: str, out: Path, *, stage1_steps: int | None, threads: int | None) -> dict[int, Path]:
    """Progressive distillation of ``teacher`` down to 4 steps; the first stage ``stage1_steps`` long (None: the
    bundled length), the others as bundled. Returns the stage folders by student steps."""
    from companion import distill, recipes

    trained = {}
    for n in CHAIN:
        name = distill.pd_name(n)
        steps = stage1_steps if n == CHAIN[0] and stage1_steps is not None else recipes.recipe(name).steps
        trained[n] = recipes.run_recipe(name, out=out / name, steps=steps, config={"teacher": teacher}, measure=False,
                                        threads=threads, keep=False)
        teacher = str(trained[n])
    return trained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", choices=("stage1", "v-teacher"), default="stage1",
                   help="stage1: a longer first stage; v-teacher: a v-predicting teacher distilled as bundled")
    p.add_argument("--stage1-steps", type=int, default=1200, help="optimiser steps of the first stage (bundled: 300)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: the recipes')")
    p.add_argument("--out", default=str(HERE.parent / "runs" / "pd_gap"), help="where the trained models go")
    p.add_argument("--cache-dir", default=None, help="sweep cache (default: the companion's)")
    args = p.parse_args(argv)

    import pandas as pd

    from companion import bench, distill, load, recipes
    from companion.metrics import Measurement
    from companion.verdicts import difference

    info = machine()
    t0 = time.perf_counter()
    out = Path(args.out)
    train_s = {}
    if args.experiment == "stage1":
        trained = train_chain("digits-cond", out, stage1_steps=args.stage1_steps, threads=args.threads)
        arms = (("teacher digits-cond", load("digits-cond"), 50),
                ("bundled stage 1 (300 steps)", load(distill.pd_name(32)), 32),
                (f"longer stage 1 ({args.stage1_steps} steps)", load(trained[32]), 32),
                ("bundled 4-step student", load(distill.pd_name(4)), 4),
                ("4-step student after the longer stage 1", load(trained[4]), 4))
        pairs = {"stage 1: longer minus bundled": (2, 1),
                 "4-step: longer-stage-1 chain minus bundled chain": (4, 3),
                 "4-step (longer stage 1) minus teacher at 50": (4, 0),
                 "4-step (bundled) minus teacher at 50": (3, 0)}
        title = "a longer first distillation stage"
        name = "pd_gap"
    else:
        v_teacher = recipes.run_recipe("digits-cond", out=out / "digits-cond-v", config={"prediction": "v_prediction"},
                                       measure=False, threads=args.threads, keep=False)
        train_s["digits-cond (v-prediction)"] = load(v_teacher).card["training_seconds"]
        trained = train_chain(str(v_teacher), out / "v-chain", stage1_steps=None, threads=args.threads)
        arms = (("teacher digits-cond (eps, bundled)", load("digits-cond"), 50),
                ("teacher of the same recipe predicting v", load(v_teacher), 50),
                ("bundled stage 1 (eps teacher)", load(distill.pd_name(32)), 32),
                ("stage 1 of the v teacher", load(trained[32]), 32),
                ("bundled 4-step student (eps teacher)", load(distill.pd_name(4)), 4),
                ("4-step student of the v teacher", load(trained[4]), 4))
        pairs = {"v teacher minus eps teacher, both at 50": (1, 0),
                 "stage 1: v chain minus bundled chain": (3, 2),
                 "4-step: v chain minus bundled chain": (5, 4),
                 "4-step (v chain) minus its teacher at 50": (5, 1),
                 "4-step (bundled) minus its teacher at 50": (4, 0)}
        title = "a v-predicting teacher"
        name = "pd_gap_v_teacher"
    for folder in trained.values():
        train_s[folder.name] = load(folder).card["training_seconds"]

    kw = dict(n_samples=args.n_samples, metrics=("fd", "class_accuracy"), cache_dir=args.cache_dir, progress=True,
              modes=({"spacing": "trailing"},))
    rows = []
    for label, model, steps in arms:
        r = bench.sweep(model, ["euler"], [steps], **kw).iloc[0]
        rows.append({"model": label, "steps": steps, "fd": r.fd, "fd_low": r.fd_low, "fd_high": r.fd_high,
                     "class_accuracy": r.class_accuracy})
    table = pd.DataFrame(rows)

    def m(i):
        r = table.iloc[i]
        return Measurement("fd", float(r.fd), float(r.fd_low), float(r.fd_high), args.n_samples, "features-digits")

    diffs = {k: difference(m(a), m(b)) for k, (a, b) in pairs.items()}
    result = {"machine": info, "seconds": round(time.perf_counter() - t0, 1), "n_samples": args.n_samples,
              "experiment": args.experiment, "bundled_stage1_steps": recipes.recipe(distill.pd_name(32)).steps,
              "training_seconds": train_s, "rows": json.loads(table.round(4).to_json(orient="records")),
              "differences": {k: [round(d.value, 4), round(d.low, 4), round(d.high, 4)] for k, d in diffs.items()}}
    if args.experiment == "stage1":
        result["stage1_steps"] = args.stage1_steps
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# The 4-step gap: {title} ({args.n_samples} samples, FD in features-digits space)", "",
          f"Machine: {info['cpu']}, {info['torch_threads']} torch thread(s), load {info['load_average_1m_at_start']:.2f} at start; "
          f"`{info['command']}`; {result['seconds']} s (training {round(sum(train_s.values()), 1)} s).", "",
          "| model | steps | FD | FD 95 % | class accuracy |", "| --- | --- | --- | --- | --- |",
          *[f"| {r.model} | {r.steps} | {r.fd:.3f} | [{r.fd_low:.3f}, {r.fd_high:.3f}] | {r.class_accuracy:.3f} |"
            for r in table.itertuples()], "",
          *[f"- {k}: {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for k, d in diffs.items()], ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
