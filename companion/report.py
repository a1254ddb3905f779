"""Small, rounded tables of measured runs for the chapters (and the one-run record a panel shows).

Notebooks print these as text so a reader (and CI, with ``NBVAL_CHECK_OUTPUT``) sees exact, stable values;
wall times are measured on the reader's machine in that run and are never typed in. Pictures are drawn by
:mod:`companion.plots`; this module never imports the panels (:mod:`companion.widgets` imports it).
"""
from __future__ import annotations

import html
from typing import Mapping

import pandas as pd

from .bench import quality_columns
from .metrics import evaluate_images
from .plots import grid_png, img_tag
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


def timing_text(times) -> str:
    """A wall time in words: one run's ms, or the median of several with their range."""
    times = [t for t in (times or ()) if t is not None]
    if not times:
        return "n/a"
    ms = sorted(1000 * t for t in times)
    if len(ms) == 1:
        return f"{ms[0]:.0f} ms"
    mid = len(ms) // 2
    median = ms[mid] if len(ms) % 2 else (ms[mid - 1] + ms[mid]) / 2
    return f"{median:.0f} ms (median of {len(ms)}, {ms[0]:.0f}–{ms[-1]:.0f})"


LABEL_CELL = "padding:1px 1em 1px 0;white-space:nowrap;vertical-align:top;color:#444;line-height:1.35"
VALUE_CELL = "padding:1px 0;white-space:nowrap;vertical-align:top;line-height:1.35"


def record_table(rec, quality: float | None, quality_label: str, *, times=None, timing_note: str = "",
                 quality_note: str | None = None, compact: bool = False) -> str:
    """One run's record (sampler, steps/NFE, times, seed/batch, speed options, quality) as a small HTML table.

    ``times``: every timed run of this configuration (s; default the record's own wall time), shown as their
    median and range. ``timing_note``: a note after the wall time (e.g. that more runs are being timed).
    ``quality_note``: shown instead of the quality value (e.g. while it is being measured, or why it failed).
    Labels never wrap. ``compact``: shorter labels, and values may wrap (a narrow column, e.g. one side of a
    comparison); otherwise values stay on one line too."""
    if quality_note is not None:
        q = quality_note
    elif quality is None:
        q = "n/a (stochastic sampler: no ODE reference)"
    else:
        q = f"{quality:.4f}"
    wall = timing_text(times if times else [rec.wall_s]) + (f" {timing_note}" if timing_note else "")
    rows = [
        ("sampler", f"{sampler_label(rec.sampler)} ({'stochastic' if rec.stochastic else 'deterministic'})"),
        ("steps / NFE" if compact else "steps / NFE per sample", f"{rec.steps} / {rec.nfe}"),
        ("wall time", wall),
        ("network / solver" if compact else "network / solver overhead",
         f"{rec.network_s * 1000:.0f} ms / {rec.overhead_s * 1000:.1f} ms"),
        ("seed / batch", f"{rec.seed} / {rec.batch}"),
        ("speed" if compact else "speed options", str(getattr(rec, "speed", {}).get("label", "fp32"))),
        (quality_label, q),
    ]
    # a pipeline's text encoders and latent decoder run outside the denoising loop: shown apart, as the cost a
    # latent model adds at real scale (both are inside the network time above)
    outside = [(name, s) for name, s in (("text encode", getattr(rec, "encode_s", 0.0)), ("latent decode", getattr(rec, "decode_s", 0.0))) if s]
    if outside:
        rows.insert(4, (" / ".join(n for n, _ in outside), " / ".join(f"{1000 * s:.0f} ms" for _, s in outside)))
    if getattr(rec, "prompt", None):
        rows.insert(0, ("prompt", str(rec.prompt) if isinstance(rec.prompt, str) else str(rec.prompt[0])))
    value_cell = VALUE_CELL.replace("white-space:nowrap", "white-space:normal") if compact else VALUE_CELL
    cells = "".join(f"<tr><td style='{LABEL_CELL}'>{html.escape(k)}</td><td style='{value_cell}'><b>{html.escape(v)}</b></td></tr>"
                    for k, v in rows)
    return f"<table style='font-size:0.85em;line-height:1.35;border-collapse:collapse'>{cells}</table>"


# Sweep columns as a reader names them: a column only appears where it says something (see sweep_table).
SWEEP_COLUMNS = {"sampler": "sampler", "steps": "steps", "guidance": "guidance", "mode": "options", "seed": "seed",
                 "nfe": "NFE", "wall_s": "wall time (s)", "fd": "FD", "kid": "KID", "precision": "precision",
                 "recall": "recall", "density": "density", "coverage": "coverage", "class_accuracy": "class accuracy",
                 "ode_distance": "distance to ODE solution"}


def mode_label(mode) -> str:
    """A sweep mode (a dict of sample() options, or its text) in words: ``"spacing=karras"``, ``"default"``."""
    if isinstance(mode, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(mode.items())) or "default"
    text = str(mode)
    return "default" if text in ("", "{}", "None", "nan") else text


def sweep_table(df: pd.DataFrame) -> pd.DataFrame:
    """A :func:`companion.bench.sweep` table for reading: sampler names, human column names, guidance / options /
    seed only where they vary, each quality value with its 95 % interval beside it; sorted by sampler, steps."""
    if df.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"sampler": df["sampler"].map(sampler_label), "steps": df["steps"]})
    for col in ("guidance", "mode", "seed"):
        if col in df.columns and df[col].astype(str).nunique() > 1:
            out[SWEEP_COLUMNS[col]] = df[col].map(mode_label) if col == "mode" else df[col]
    out["NFE"] = df["nfe"]
    out["wall time (s)"] = df["wall_s"].round(3)
    for q in quality_columns(df):
        out[SWEEP_COLUMNS.get(q, q)] = df[q].map(lambda v: f"{v:.3g}")
        lo, hi = f"{q}_low", f"{q}_high"
        if lo in df.columns and hi in df.columns:
            out[f"{SWEEP_COLUMNS.get(q, q)} 95% interval"] = [f"[{a:.3g}, {b:.3g}]" if pd.notna(a) and pd.notna(b) else ""
                                                             for a, b in zip(df[lo], df[hi])]
    order = df.assign(_name=out["sampler"]).sort_values(["_name", "steps"], kind="stable").index
    return out.loc[order].reset_index(drop=True)


def table_html(df: pd.DataFrame, *, index: bool = False, wrap: tuple[str, ...] = (), max_wrap_em: float = 22) -> str:
    """A tidy HTML table: headers and cells on one line each, except the ``wrap`` columns, which wrap at
    ``max_wrap_em`` (long names, notes); the table never grows wider than its container."""
    table = df.to_html(index=index, border=0, na_rep="n/a", escape=True, float_format=lambda v: f"{v:.4g}")
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    nowrap = "white-space:nowrap;padding:2px 10px;text-align:left;vertical-align:top"
    styles = [f".companion-table td:nth-child({i + 1}),.companion-table th:nth-child({i + 1}){{"
              + (f"white-space:normal;min-width:8em;max-width:{max_wrap_em}em;overflow-wrap:anywhere" if c in wrap else "")
              + "}" for i, c in enumerate(cols)]
    style = ("<style>.companion-table{border-collapse:collapse;font-size:0.85em;max-width:100%}"
             f".companion-table td,.companion-table th{{{nowrap}}}"
             ".companion-table tr:nth-child(even){background:#f5f5f5}" + "".join(styles) + "</style>")
    return style + "<div style='max-width:100%;overflow-x:auto'>" + table.replace('class="dataframe"', 'class="dataframe companion-table"', 1) + "</div>"


class FitTable:
    """A table that fits the page: :func:`table_html` in a notebook, the plain text table elsewhere.

    ``FitTable(companion.glossary()[cols], wrap=("diffusers", "note"))``: long columns wrap instead of pushing
    the table past the right edge."""

    def __init__(self, df: pd.DataFrame, *, index: bool = False, wrap: tuple[str, ...] = (), max_wrap_em: float = 22):
        self.df, self.index, self.wrap, self.max_wrap_em = df, index, tuple(wrap), max_wrap_em

    def _repr_html_(self) -> str:
        return table_html(self.df, index=self.index, wrap=self.wrap, max_wrap_em=self.max_wrap_em)

    def __repr__(self) -> str:
        return self.df.to_string(index=self.index)


def rounded(df: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Round floats to ``digits`` significant-looking decimals for display."""
    return df.round(digits)


class ImageRow:
    """Labelled image grids side by side; renders as HTML (live notebooks, nbconvert, GitHub) with PNGs inlined,
    each at its own pixel size (integer ``scale``, no smoothing)."""

    def __init__(self, images: Mapping[str, "torch.Tensor"], nrow: int | None = None, scale: int = 4, title: str = ""):  # noqa: F821
        self.title = title
        self.pngs = {label: grid_png(x, nrow=nrow, scale=scale) for label, x in images.items()}

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<figure style='display:inline-block;margin:0 12px 6px 0;text-align:center;vertical-align:top'>"
            f"{img_tag(png)}<figcaption>{html.escape(label)}</figcaption></figure>" for label, png in self.pngs.items())
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
