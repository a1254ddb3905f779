"""Token merging (ToMe for SD) on a full-size SD-1.5 pipeline with random weights: speed-up and image difference.

The SD-1.5 configuration (companion.random_pipelines; no download) sampled with DPM-Solver++ 2M, guidance 7.5, one
prompt, at merge ratios 0 (the network as it is), 0.3 and 0.5 of the first level's self-attention tokens
(``--max-downsample 1``, ToMe for SD's default). The ratios are interleaved within each repeat, their order
alternating, after one untimed warm-up each. Reported: seconds per image (median, range), the speed-up over ratio 0
as a ratio of medians with a bootstrap interval (companion.verdicts.ratio_of_medians), the tokens each merged
self-attention saw, and the RMS difference of the decoded images from ratio 0's from the same noise. Random weights
time like trained ones but say nothing about image quality: that needs the real SD-1.5 (and the hub extra's CLIP).

    python benchmarks/token_merging.py --device cpu --latent-size 32 --steps 10 --out benchmarks/results/token_merging_cpu
    python benchmarks/token_merging.py --device cuda --dtype float16 --steps 20 --out benchmarks/results/token_merging_gpu

On a CPU the SD-1.5 UNet at 256 px (``--latent-size 32``, 1024 tokens at the first level) takes seconds per call,
so the default there is 10 steps and 3 repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--latent-size", type=int, default=None, help="latent side (default: SD-1.5's 64, i.e. 512 px)")
    p.add_argument("--ratios", default="0,0.3,0.5")
    p.add_argument("--max-downsample", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from companion.pipelines import PipelineModel
    from companion.random_pipelines import build
    from companion.sampling import sample
    from companion.token_merging import TokenMerging
    from companion.verdicts import ratio_of_medians

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ratios = [float(r) for r in args.ratios.split(",")]
    if ratios[0] != 0:
        raise SystemExit("--ratios must start with 0 (the unmerged baseline)")
    t0 = time.perf_counter()
    model = PipelineModel(build("sd15", "full", device, dtype, latent_size=args.latent_size), name="sd15-full-random")
    x_T = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=PROMPT, guidance=7.5, batch=1, x_T=x_T)

    def run(ratio, steps=args.steps):
        wrap = TokenMerging(model, ratio, args.max_downsample) if ratio else None
        res = sample(model, "dpmpp_2m", steps, wrap=wrap, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return res, wrap

    images, tokens, times = {}, {}, {r: [] for r in ratios}
    for r in ratios:  # warm-up, and the images and token counts (deterministic: same noise)
        res, wrap = run(r)
        images[r] = res.images.float().cpu()
        tokens[r] = sorted(set(wrap.tokens)) if wrap is not None else []
    for rep in range(args.repeats):
        for r in (ratios if rep % 2 == 0 else ratios[::-1]):
            t = time.perf_counter()
            run(r)
            times[r].append(time.perf_counter() - t)
    rows = []
    for r in ratios:
        speed = ratio_of_medians(times[0.0], times[r]) if args.repeats >= 3 else None
        rows.append({"ratio": r, "s_per_image_median": statistics.median(times[r]), "s_min": min(times[r]), "s_max": max(times[r]),
                     "speedup": None if speed is None else [round(speed.value, 4), round(speed.low, 4), round(speed.high, 4)],
                     "tokens_in_attended": tokens[r],
                     "rms_image_diff_vs_unmerged": float((images[r].clamp(-1, 1) - images[0.0].clamp(-1, 1)).pow(2).mean().sqrt())})
    info = machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    result = {"machine": info, "seconds": round(time.perf_counter() - t0, 1), "device": str(device), "dtype": args.dtype,
              "latent": list(model.sample_shape), "steps": args.steps, "sampler": "dpmpp_2m", "guidance": 7.5,
              "max_downsample": args.max_downsample, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    where = info.get("gpu", info["cpu"])
    md = [f"# Token merging on SD-1.5 (random weights), {where}", "",
          f"`{info['command']}`; {info['date_utc']}; {args.dtype}; latent {tuple(model.sample_shape)}; DPM-Solver++ 2M "
          f"{args.steps} steps, guidance 7.5, batch 1; {args.repeats} timed repeats per ratio, interleaved; load "
          f"{info.get('load_average_1m_at_start', float('nan')):.2f} at start; {result['seconds']} s in all.", "",
          "| merge ratio | s / image (median) | range | speed-up [95 %] | tokens (in -> attended) | RMS image diff vs ratio 0 |",
          "| --- | --- | --- | --- | --- | --- |",
          *[f"| {r['ratio']} | {r['s_per_image_median']:.3f} | {r['s_min']:.3f}-{r['s_max']:.3f} | "
            f"{'-' if r['speedup'] is None else '{:.2f} [{:.2f}, {:.2f}]'.format(*r['speedup'])} | "
            f"{', '.join(f'{a} -> {b}' for a, b in r['tokens_in_attended']) or '-'} | {r['rms_image_diff_vs_unmerged']:.4f} |"
            for r in rows], ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
