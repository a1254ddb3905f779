"""Small, rounded tables of measured runs for the chapters (and the one-run record a panel shows).

Notebooks print these as text so a reader (and CI, with ``NBVAL_CHECK_OUTPUT``) sees exact, stable values;
wall times are measured on the reader's machine in that run and are never typed in. Pictures are drawn by
:mod:`companion.plots`; this module never imports the panels (:mod:`companion.widgets` imports it).
"""
from __future__ import annotations

import html
from typing import Mapping

import pandas as pd

from .metrics import evaluate_images
from .plots import grid_png
from .samplers import REGISTRY


def run_table(results: Mapping[str, object], baseline: str | None = None) -> pd.DataFrame:
    """One row per :func:`companion.sampling.sample` result: sampler, steps, NFE, wall/network/overhead time.

    With ``baseline`` (a key of ``results``), adds the measured wall-time speed-up over that run.
    """
    rows = []
    for label, res in results.items():
        rec = res.record
        rows.append({
            "run": label,
            "sampler": sampler_label(rec.sampler),
            "steps": rec.steps,
            "NFE": rec.nfe,
            "wall s": rec.wall_s,
            "network s": rec.network_s,
            "overhead %": 100 * rec.overhead_s / rec.wall_s if rec.wall_s else float("nan"),
            "ms / sample": 1000 * rec.wall_s / rec.batch,
        })
    df = pd.DataFrame(rows).set_index("run")
    if baseline is not None:
        if baseline not in results:
            raise ValueError(f"baseline {baseline!r} is not one of the runs: {list(results)}")
        df["speed-up"] = df.loc[baseline, "wall s"] / df["wall s"]
    return df


def sampler_label(name: str) -> str:
    """A sampler's display name (the registry key itself for names the registry does not know, e.g. students)."""
    return REGISTRY[name].name if name in REGISTRY else name


def record_table(rec, quality: float | None, quality_label: str) -> str:
    """One run's record (sampler, steps/NFE, times, seed/batch, speed options, quality) as a small HTML table."""
    q = "n/a (stochastic sampler: no ODE reference)" if quality is None else f"{quality:.4f}"
    rows = [
        ("sampler", f"{sampler_label(rec.sampler)} ({'stochastic' if rec.stochastic else 'deterministic'})"),
        ("steps / NFE per sample", f"{rec.steps} / {rec.nfe}"),
        ("wall time", f"{rec.wall_s * 1000:.0f} ms"),
        ("network / solver overhead", f"{rec.network_s * 1000:.0f} ms / {rec.overhead_s * 1000:.1f} ms"),
        ("seed / batch", f"{rec.seed} / {rec.batch}"),
        ("speed options", str(getattr(rec, "speed", {}).get("label", "fp32"))),
        (quality_label, q),
    ]
    cells = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in rows)
    return f"<table style='font-size:0.9em'>{cells}</table>"


def rounded(df: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Round floats to ``digits`` significant-looking decimals for display."""
    return df.round(digits)


class ImageRow:
    """Labelled image grids side by side; renders as HTML (live notebooks, nbconvert, GitHub) with PNGs inlined."""

    def __init__(self, images: Mapping[str, "torch.Tensor"], nrow: int | None = None, scale: int = 4, title: str = ""):  # noqa: F821
        self.title = title
        self.pngs = {label: grid_png(x, nrow=nrow, scale=scale) for label, x in images.items()}

    def _repr_html_(self) -> str:
        import base64

        cells = "".join(
            f"<figure style='display:inline-block;margin:0 12px 6px 0;text-align:center'>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' style='image-rendering:pixelated'/>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, png in self.pngs.items())
        head = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return f"<div>{head}{cells}</div>"


def quality_row(label: str, run, labels, *, start=None) -> dict:
    """One row of a chapter's quality table: cost (NFE, wall s) and image quality (FD with its interval,
    precision, recall, class accuracy) of a run, and how far its images moved from ``start`` (RMS).

    ``run``: a sampling result (its images clamped to [-1, 1], as any saved image would be), or a tensor of
    images measured as they are (a start image without diffusion: 0 NFE, 0 s). ``labels``: the classes the
    images were drawn for. ``start``: the images the run started from (``RMS from start`` is NaN without).
    """
    if hasattr(run, "record"):
        images, nfe, wall_s = run.images.clamp(-1, 1), run.record.nfe, run.record.wall_s
    else:
        images, nfe, wall_s = run, 0, 0.0
    m = evaluate_images(images, labels, metrics=("fd", "prdc", "class_accuracy"))
    return {"run": label, "NFE": nfe, "wall s": wall_s, "FD": m["fd"].value,
            "FD 95% CI": f"[{m['fd'].low:.1f}, {m['fd'].high:.1f}]", "FD high": m["fd"].high,
            "precision": m["precision"].value, "recall": m["recall"].value, "class acc": m["class_accuracy"].value,
            "RMS from start": float((images - start).pow(2).mean().sqrt()) if start is not None else float("nan")}


def finding_verdict(strong: bool, weak: bool = False) -> str:
    """A survey finding's verdict from the evidence: ``"supported"`` when the strong test passes, ``"partly
    supported"`` when only the weak one does, else ``"not supported"``. (The rules deciding ``strong`` and
    ``weak`` belong to each finding; this only names the outcome, the same way in every chapter.)"""
    return "supported" if strong else ("partly supported" if weak else "not supported")
