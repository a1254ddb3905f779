"""Network calls in cache-sized slices on a CPU: the time per sample against the batch one call sees, and whole
sampling runs with the denoiser's slicing against one call per step, side by side in one process.

Part 1: each bundled UNet's forward pass (no grad) at growing batch sizes, median of ``--repeats`` calls after a
warm-up: milliseconds per sample. Part 2: ``sample()`` at the chapters' sizes (shapes-pixel DDIM-20 at 256,
digits-cond DDIM-10 with guidance 4 at 256, i.e. 512 per call), alternating "one call per step" (slicing off) and the
default slicing, ``--rounds`` times each; reported as the ratio of medians with the samples' largest difference.
Part 3: the shapes feature network over the 5000 training shapes, 512 per call (the former default) against slices.

    python benchmarks/network_batch.py --out benchmarks/results/network_batch.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _machine import machine  # noqa: E402
from companion import device, load, sample  # noqa: E402

BATCHES = {"shapes-pixel": (8, 16, 32, 64, 128, 256), "shapes-sr32": (8, 16, 32, 64, 256),
           "digits-cond": (32, 64, 128, 256, 512), "shapes-latent": (16, 64, 256)}
RUNS = {"shapes-pixel DDIM-20, 256 samples": dict(model="shapes-pixel", sampler="ddim", steps=20, batch=256),
        "digits-cond DDIM-10, guidance 4, 256 samples": dict(model="digits-cond", sampler="ddim", steps=10, batch=256,
                                                             guidance=4.0)}


def per_sample_ms(model, batch: int, repeats: int) -> float:
    x = torch.randn(batch, *model.sample_shape)
    t = torch.full((batch,), 500)
    kw = {"class_labels": torch.zeros(batch, dtype=torch.long)} if model.conditional else {}
    if model.cond_shape:
        kw["cond"] = torch.randn(batch, *model.cond_shape)
    times = []
    with torch.no_grad():
        model.predict_noise(x, t, **kw)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict_noise(x, t, **kw)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    info = machine()
    forward = {}
    for name, batches in BATCHES.items():
        m = load(name)
        forward[name] = {str(b): round(per_sample_ms(m, b, args.repeats), 4) for b in batches}
        print(name, forward[name], flush=True)
    runs = {}
    limit = device.CPU_CALL_ELEMENTS
    for label, cfg in RUNS.items():
        cfg = dict(cfg)
        m = load(cfg.pop("model"))
        labels = torch.arange(cfg["batch"]) % m.num_classes if m.conditional else None
        times = {"one call per step": [], "sliced": []}
        images = {}
        for _ in range(args.rounds):
            for mode in times:
                device.CPU_CALL_ELEMENTS = 10 ** 12 if mode == "one call per step" else limit
                res = sample(m, seed=0, class_labels=labels, **cfg)
                times[mode].append(res.record.wall_s)
                images[mode] = res.images
        device.CPU_CALL_ELEMENTS = limit
        whole, sliced = (statistics.median(v) for v in times.values())
        runs[label] = {"wall_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                       "speed_up_sliced": round(whole / sliced, 3),
                       "max_abs_image_difference": float((images["sliced"] - images["one call per step"]).abs().max())}
        print(label, runs[label], flush=True)
    from companion.data import shapes
    from companion.features import load_feature_net

    net, x = load_feature_net("features-shapes"), shapes("train")[0]
    feats = {"batch 512 per call": [], "sliced": []}
    for _ in range(args.rounds):
        for mode in feats:
            t0 = time.perf_counter()
            net.extract(x, batch_size=512 if mode == "batch 512 per call" else None)
            feats[mode].append(round(time.perf_counter() - t0, 3))
    features = {"wall_s": feats, "speed_up_sliced": round(statistics.median(feats["batch 512 per call"])
                                                          / statistics.median(feats["sliced"]), 3)}
    print("features-shapes over 5000 training shapes", features, flush=True)
    out = {"benchmark": __doc__.split("\n\n")[0], "machine": info, "cpu_call_elements": limit,
           "forward_ms_per_sample": forward, "sampling_runs": runs,
           "feature_extraction_5000_shapes": features}
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
