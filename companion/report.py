"""Small, rounded tables of measured runs for the chapters.

Notebooks print these as text so a reader (and CI, with ``NBVAL_CHECK_OUTPUT``) sees exact, stable values;
wall times are measured on the reader's machine in that run and are never typed in.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

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
            "sampler": REGISTRY[rec.sampler].name if rec.sampler in REGISTRY else rec.sampler,
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


def rounded(df: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Round floats to ``digits`` significant-looking decimals for display."""
    return df.round(digits)


class ImageRow:
    """Labelled image grids side by side; renders as HTML (live notebooks, nbconvert, GitHub) with PNGs inlined."""

    def __init__(self, images: Mapping[str, "torch.Tensor"], nrow: int | None = None, scale: int = 4, title: str = ""):  # noqa: F821
        from .widgets import grid_png

        self.title = title
        self.pngs = {label: grid_png(x, nrow=nrow, scale=scale) for label, x in images.items()}

    def _repr_html_(self) -> str:
        import base64
        import html

        cells = "".join(
            f"<figure style='display:inline-block;margin:0 12px 6px 0;text-align:center'>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' style='image-rendering:pixelated'/>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, png in self.pngs.items())
        head = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return f"<div>{head}{cells}</div>"
