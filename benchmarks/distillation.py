"""Few-step students vs their teachers on the companion's FD metric (2,000 samples, 95 % bootstrap intervals).

Targets: the 4-step progressive student's FD within 25 % of the teacher's at
50 NFE; the 1-step students far better than the teacher's own 1-step sampler. The few-step frontier: every
student (progressive, consistency, reflow) and both teachers (diffusion digits-cond, flow digits-flow) at 1, 2, 4
and 8 NFE where the model runs at that count (a progressive student runs at its own step count only). Every row is a
``companion.bench`` sweep run (class-balanced labels, same seed for all), so the rows land in the sweep cache
the distillation chapter reads.

    .venv/bin/python benchmarks/distillation.py [--n-samples 2000]

Writes benchmarks/results/distillation.{json,md,csv}.
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
TARGET_RATIO_4STEP = 1.25
FRONTIER_NFE = (1, 2, 4, 8)
GD_SCALE = 2.0  # guided runs: the guidance-distilled student and its teacher with classifier-free guidance


def _markdown(df) -> str:
    rows = [list(map(str, df.columns)), ["---"] * len(df.columns)] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r]
                                                                     for r in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--cache-dir", default=None, help="sweep cache (default: the companion's)")
    args = p.parse_args(argv)

    import pandas as pd

    from companion import assets, bench, distill, load
    from companion.metrics import Measurement
    from companion.verdicts import difference

    info = machine()
    t0 = time.perf_counter()
    metrics = ("fd", "class_accuracy")
    kw = dict(n_samples=args.n_samples, metrics=metrics, cache_dir=args.cache_dir, progress=True)
    trailing = ({"spacing": "trailing"},)
    frames = []
    teacher = load("digits-cond")
    frames.append(bench.sweep(teacher, ["euler"], [1, 2, 4, 8, 16, 50], modes=trailing, **kw).assign(model="digits-cond (teacher)"))
    frames.append(bench.sweep(teacher, ["dpmpp_2m"], [4, 8, 16], modes=trailing, **kw).assign(model="digits-cond (teacher)"))
    train_s = {}
    for n in distill.PD_STAGES:
        m = load(distill.pd_name(n))
        train_s[m.name] = m.card["training_seconds"]
        frames.append(bench.sweep(m, ["euler"], [n], modes=trailing, **kw).assign(model=m.name))
    cd = load("digits-cd")
    train_s[cd.name] = cd.card["training_seconds"]
    frames.append(bench.sweep(cd, ["lcm"], [1, 2, 4, 8], **kw).assign(model=cd.name))
    flow = load("digits-flow")
    frames.append(bench.sweep(flow, ["euler"], [1, 2, 4, 8, 50], **kw).assign(model="digits-flow (flow teacher)"))
    reflow = load("digits-reflow")
    train_s[reflow.name] = reflow.card["training_seconds"]
    frames.append(bench.sweep(reflow, ["euler"], [1, 2, 4, 8], **kw).assign(model=reflow.name))
    # guidance distillation: the student at w = 2 (one call per step) against the teacher with guidance (two calls)
    gd = load("digits-gd")
    train_s[gd.name] = gd.card["training_seconds"]
    frames.append(bench.sweep(teacher, ["ddim"], [1, 2, 4, 8], guidance=(GD_SCALE,), modes=trailing, **kw)
                  .assign(model=f"digits-cond + guidance {GD_SCALE:g} (teacher)"))
    frames.append(bench.sweep(gd, ["ddim"], [1, 2, 4, 8], guidance=(GD_SCALE,), modes=trailing, **kw)
                  .assign(model=f"digits-gd at guidance {GD_SCALE:g}"))
    df = pd.concat(frames, ignore_index=True)
    cols = ["model", "sampler", "steps", "nfe", "wall_s", "fd", "fd_low", "fd_high", "class_accuracy"]
    table = df[cols].copy()
    table["ms_per_sample"] = 1000 * table["wall_s"] / args.n_samples

    def fd(model, sampler, steps):
        row = table[(table.model == model) & (table.sampler == sampler) & (table.steps == steps)].iloc[0]
        return float(row.fd), float(row.fd_low), float(row.fd_high)

    def measurement(model, sampler, steps):
        v, lo, hi = fd(model, sampler, steps)
        return Measurement("fd", v, lo, hi, args.n_samples, "features-digits")

    frontier = {}
    unguided = table[~table.model.str.contains("guidance")]  # guided FD is not comparable with unguided FD
    for nfe in FRONTIER_NFE:
        at = unguided[unguided.nfe == nfe].sort_values("fd")
        frontier[str(nfe)] = [{"model": r.model, "sampler": r.sampler, "fd": r.fd, "fd_low": r.fd_low, "fd_high": r.fd_high}
                              for r in at.itertuples()]
    gap4 = difference(measurement(distill.pd_name(4), "euler", 4), measurement("digits-cond (teacher)", "euler", 50))
    flow1, reflow1 = fd("digits-flow (flow teacher)", "euler", 1), fd("digits-reflow", "euler", 1)
    flow50 = fd("digits-flow (flow teacher)", "euler", 50)
    guided = {f"{who} {k}": fd(f"{name}", "ddim", k) for k in (1, 2, 4, 8)
              for who, name in (("teacher", f"digits-cond + guidance {GD_SCALE:g} (teacher)"), ("student", f"digits-gd at guidance {GD_SCALE:g}"))}
    teacher50 = fd("digits-cond (teacher)", "euler", 50)
    pd4 = fd(distill.pd_name(4), "euler", 4)
    teacher1 = fd("digits-cond (teacher)", "euler", 1)
    pd1, cd1 = fd(distill.pd_name(1), "euler", 1), fd("digits-cd", "lcm", 1)
    result = {
        "machine": info, "seconds": round(time.perf_counter() - t0, 1), "n_samples": args.n_samples,
        "feature": "features-digits", "assets_sha256": {k: assets.folder_sha256(assets.models_dir() / k) for k in ["digits-cond", "digits-flow", *train_s]},
        "training_seconds": train_s, "pd_training_seconds_total": round(sum(v for k, v in train_s.items() if "pd" in k), 1),
        "teacher_fd_50nfe": teacher50, "pd4_fd": pd4, "pd4_over_teacher50": round(pd4[0] / teacher50[0], 3),
        "pd4_target_ratio": TARGET_RATIO_4STEP, "pd4_target_met": pd4[0] <= TARGET_RATIO_4STEP * teacher50[0],
        "pd4_minus_teacher50": [round(gap4.value, 4), round(gap4.low, 4), round(gap4.high, 4)],
        "teacher_fd_1step": teacher1, "pd1_fd": pd1, "cd1_fd": cd1,
        "flow_teacher_fd_1step": flow1, "flow_teacher_fd_50": flow50, "reflow1_fd": reflow1,
        "frontier_nfe": list(FRONTIER_NFE), "frontier": frontier,
        "guidance_scale": GD_SCALE, "guided_fd_by_steps": guided,
        "rows": json.loads(table.round(4).to_json(orient="records")),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distillation.json").write_text(json.dumps(result, indent=2) + "\n")
    table.round(4).to_csv(RESULTS / "distillation.csv", index=False)
    md = [f"# Distillation: students vs teacher ({args.n_samples} samples, FD in features-digits space)", "",
          f"Machine: {info['cpu']}, {info['torch_threads']} torch thread(s), load {info['load_average_1m_at_start']:.2f} at start; "
          f"`{info['command']}`; {result['seconds']} s.", "",
          f"- 4-step progressive student FD {pd4[0]:.2f} [{pd4[1]:.2f}, {pd4[2]:.2f}] vs teacher at 50 NFE "
          f"{teacher50[0]:.2f} [{teacher50[1]:.2f}, {teacher50[2]:.2f}]: ratio {result['pd4_over_teacher50']} "
          f"(target <= {TARGET_RATIO_4STEP}: {'met' if result['pd4_target_met'] else 'MISSED'})",
          f"- the same gap in FD units (4-step student minus teacher at 50 NFE): {gap4.value:.2f} [{gap4.low:.2f}, {gap4.high:.2f}]",
          f"- 1 step: teacher {teacher1[0]:.1f}, progressive student {pd1[0]:.2f}, consistency student {cd1[0]:.2f}",
          f"- flow teacher (digits-flow): 1 step {flow1[0]:.2f} [{flow1[1]:.2f}, {flow1[2]:.2f}], 50 steps {flow50[0]:.2f}; "
          f"its reflow student at 1 step {reflow1[0]:.2f} [{reflow1[1]:.2f}, {reflow1[2]:.2f}]",
          f"- training: progressive (all stages) {result['pd_training_seconds_total']} s, consistency {train_s['digits-cd']} s, "
          f"reflow {train_s['digits-reflow']} s (after its teacher's own training), guidance distillation "
          f"{train_s['digits-gd']} s", "",
          f"- guidance {GD_SCALE:g}, DDIM (trailing) at 1/2/4/8 steps: teacher with guidance (2 calls per step) FD "
          + ", ".join(f"{guided[f'teacher {k}'][0]:.2f}" for k in (1, 2, 4, 8)) + "; guidance-distilled student (1 call) "
          + ", ".join(f"{guided[f'student {k}'][0]:.2f}" for k in (1, 2, 4, 8)),
          "",
          "## The few-step frontier without guidance (FD [95 %], lowest first, at each NFE)", "",
          *[f"- **{nfe} NFE**: " + "; ".join(f"{r['model']} ({r['sampler']}) {r['fd']:.2f} [{r['fd_low']:.2f}, {r['fd_high']:.2f}]"
                                          for r in frontier[str(nfe)]) for nfe in FRONTIER_NFE], "",
          "## Every run", "", _markdown(table.round(3)), ""]
    (RESULTS / "distillation.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
