"""Real text-to-image models side by side (companion.text_to_image.REAL_MODELS) on a GPU with the Hub reachable.

SD-1.5 with DDIM 50 and DPM-Solver++ 2M 20 (guidance 7.5), SD-1.5 + LCM-LoRA with LCM 4 and SD-Turbo with Euler
ancestral 1 (unguided): seconds per image, NFE, network time per step, text encoding and decode apart, peak memory
and the CLIP score (openai/clip-vit-base-patch16) of the images against their prompts, 95 % bootstrap intervals.
Same prompts and seeds for every setup; float16 weights (the fp16 variants).

    python benchmarks/real_models.py [--seeds 0,1,2,3] [--out benchmarks/results]

Writes real_models_<gpu>.json and .md, which the real-models chapter (notebooks/16_real_models.ipynb) shows.
Refuses to start without CUDA or the Hub (companion.text_to_image.hub_status says why); needs the hub extra.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (each runs every prompt)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    import torch

    from companion import text_to_image as t2i

    reason = t2i.hub_status()
    if reason:
        print(f"real_models: cannot run here: {reason}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    table = t2i.compare(t2i.REAL_MODELS, t2i.PROMPTS, seeds=seeds, device="cuda", torch_dtype=torch.float16)
    gpu = torch.cuda.get_device_name(0)
    info = dict(machine(), gpu=gpu)
    result = {"machine": info, "seconds": round(time.perf_counter() - t0, 1), "prompts": list(t2i.PROMPTS), "seeds": seeds,
              "dtype": "float16", "rows": json.loads(table.round(5).to_json(orient="records"))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "real_models_" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Real text-to-image models side by side ({gpu}, float16)", "",
          f"`{info['command']}`; {info['date_utc']}; {result['seconds']} s; {len(t2i.PROMPTS)} prompts x {len(seeds)} seeds.", "",
          "| setup | NFE | s / image | speed-up [95 %] | network ms / step | decode s | peak GiB | CLIP score [95 %] |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |",
          *[f"| {r['setup']} | {r['nfe']} | {r['s / image']:.3f} | {r['speedup']:.1f}x [{r['speedup_low']:.1f}, {r['speedup_high']:.1f}] | {r['network ms / step']:.1f} | "
            f"{r['decode s / image']:.3f} | {r['peak GiB']:.2f} | {r['clip_score']:.2f} [{r['clip_score_low']:.2f}, {r['clip_score_high']:.2f}] |"
            for r in result["rows"]], ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
