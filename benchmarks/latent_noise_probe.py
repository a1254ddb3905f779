"""Is the latent shapes model's decoder fragile? Noise in the latent against what the judge reads after decoding.

The shapes-latent model bundled until the third round of candidates (40,000 steps, unscaled latents) made too few
triangles and too many images the judge could only call a circle (benchmarks/results/shapes_latent_candidates.md).
Two suspects: the latent UNet makes latents of in-between shapes, or the decoder turns any small latent error into a
rounded blob. This probe tests the second: it encodes the 1000 real test images, adds white Gaussian noise of
standard deviation sigma to the *standardised* latents (the space the UNet samples in, per-channel std 1, or the
recipe's latent_scale; the result file states it), decodes, and asks the held-out judge (judge-shapes) what it sees:
its accuracy per class against the true labels, the shares it finds and how often it is sure (p >= 0.9). If
triangles survive noise far larger than a sampler's error, the decoder is not what rounds them off.

    .venv/bin/python benchmarks/latent_noise_probe.py [--threads 2]

Writes benchmarks/results/latent_noise_probe.{json,md}.
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
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from companion import load, metrics
    from companion.data import SHAPES_CLASSES, shapes

    model = load("shapes-latent")  # only its autoencoder (shapes-ae) and latent standardisation are used
    x, y = shapes("test", 32)
    rows = []
    with torch.no_grad():
        z = model.encode(x)
        g = torch.Generator().manual_seed(0)
        for sigma in SIGMAS:
            decoded = model.decode(z + sigma * torch.randn(z.shape, generator=g)).clamp(-1, 1)
            _, logits, _ = metrics.extract(decoded, "judge-shapes")
            sure = metrics.confident_share(logits, "judge-shapes")
            accuracy = {c: metrics.accuracy_from_logits(logits[y == i], y[y == i], "judge-shapes") for i, c in enumerate(SHAPES_CLASSES)}
            rows.append({"sigma": sigma,
                         "accuracy": {c: round(m.value, 3) for c, m in accuracy.items()},
                         "accuracy_interval": {c: [round(m.low, 3), round(m.high, 3)] for c, m in accuracy.items()},
                         "shares": dict(zip(SHAPES_CLASSES, metrics.class_shares(logits))),
                         "sure": round(sure.value, 3), "sure_interval": [round(sure.low, 3), round(sure.high, 3)]})
    result = {"machine": machine(), "model": "shapes-latent", "autoencoder_sha256": model.card["files"]["vae/diffusion_pytorch_model.safetensors"]["sha256"],
              "n_images": len(x), "latent_std": round(float(z.std()), 3), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent_noise_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    head = " | ".join(f"{c} correct" for c in SHAPES_CLASSES)
    lines = ["# Latent noise probe: what the judge reads after noise in shapes-latent's standardised latents", "",
             f"`.venv/bin/python benchmarks/latent_noise_probe.py --threads {args.threads}`; {len(x)} real test images, encoded, "
             f"white noise of std sigma added to the standardised latents (their std: {result['latent_std']}), decoded, "
             "judged by judge-shapes (per-class accuracy against the true labels; sure: p >= 0.9, 95 % bootstrap interval).", "",
             f"| sigma | {head} | judge sure [95 %] |", "|---" * (len(SHAPES_CLASSES) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['sigma']} | " + " | ".join(f"{r['accuracy'][c]:.3f}" for c in SHAPES_CLASSES) + f" | {r['sure']:.3f} [{r['sure_interval'][0]:.3f}, {r['sure_interval'][1]:.3f}] |")
    (RESULTS / "latent_noise_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
