"""Where does a shapes model decide the shape? Real images noised to timestep t, denoised by the model, judged.

The shapes-latent model bundled until the third round (unscaled latents) made too few triangles
(benchmarks/results/shapes_latent_candidates.md). This probe asks at which noise level a model keeps or loses the
shape it is given: each real test image is noised to timestep t with the forward process and denoised by the model
(SDEdit-style, ``companion.partial.sample_from``, DDIM in 10 steps from t; the same forward noise for every model),
and the held-out judge (judge-shapes) names the result. Per class: the share still named as the class it started as
(its *retention*, 95 % bootstrap interval), and the shares of every class among the results. At small t every model
keeps the shape; at t near 1000 nothing of the start is left and the shares are the model's own. A model that loses
one class to another at some middle t has learnt that range worse for that class.

    .venv/bin/python benchmarks/class_retention_probe.py [--models shapes-latent shapes-pixel] [--n 400] [--threads 2]

``--models`` takes bundled names or ``LABEL=FOLDER`` (a candidate's ``runs/...`` output, shown as LABEL); ``--tag`` names the result
files: benchmarks/results/class_retention_probe[_TAG].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

RESULTS = HERE / "results"
TIMESTEPS = (300, 500, 700, 850, 950)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shapes-latent", "shapes-pixel"])
    p.add_argument("--n", type=int, default=400, help="real test images (the first n; classes are balanced in the split)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps from t down to 0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from companion import load, metrics
    from companion.data import SHAPES_CLASSES, shapes
    from companion.partial import sample_from

    x, y = shapes("test", 32)
    if not 0 < args.n <= len(x):
        raise SystemExit(f"--n must be in 1..{len(x)}, got {args.n}")
    x, y = x[: args.n], y[: args.n]
    per_class = {c: int((y == i).sum()) for i, c in enumerate(SHAPES_CLASSES)}
    out = {"machine": machine(), "n_images": args.n, "images_per_class": per_class, "sampler": f"DDIM, {args.steps} steps from t",
           "judge": "judge-shapes", "models": {}}
    for spec in args.models:
        name, _, path = spec.partition("=")  # LABEL=FOLDER names a candidate's folder in the tables
        model = load(path or name)
        rows = []
        for t in TIMESTEPS:
            with torch.no_grad():
                images = sample_from(model, x, t, "ddim", args.steps, seed=0).images.clamp(-1, 1)
            _, logits, _ = metrics.extract(images, "judge-shapes")
            kept = {}
            for i, c in enumerate(SHAPES_CLASSES):
                m = metrics.accuracy_from_logits(logits[y == i], y[y == i], "judge-shapes")
                kept[c] = [round(m.value, 3), round(m.low, 3), round(m.high, 3)]
            rows.append({"t": t, "retention": kept, "shares": dict(zip(SHAPES_CLASSES, metrics.class_shares(logits)))})
            print(name, t, kept, flush=True)
        out["models"][name] = {"fingerprint": model.card.get("files", {}).get("unet/diffusion_pytorch_model.safetensors", {}).get("sha256"),
                               "training_steps": model.card.get("training_steps"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = "class_retention_probe" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Class retention: real test images noised to t, denoised by the model, judged by judge-shapes", "",
             f"`{out['machine']['command']}`; {args.n} real test images ({', '.join(f'{k} {v}' for k, v in per_class.items())}), "
             f"DDIM {args.steps} steps from t, forward noise seed 0. Retention: share of a class's images still named as that "
             "class (95 % bootstrap interval); shares: of all results.", "",
             "| model | t | " + " | ".join(f"{c} kept" for c in SHAPES_CLASSES) + " | shares " + " / ".join(SHAPES_CLASSES) + " |",
             "|---" * (len(SHAPES_CLASSES) + 3) + "|"]
    for name, m in out["models"].items():
        for r in m["rows"]:
            kept = " | ".join(f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" for v in r["retention"].values())
            lines.append(f"| {name} | {r['t']} | {kept} | " + " / ".join(f"{s:.2f}" for s in r["shares"].values()) + " |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
