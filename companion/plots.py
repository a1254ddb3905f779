"""Rendering: image grids and their PNGs (no torchvision), HTML fragments, plotly speed/quality figures.

One home for turning measured things into pictures: the chapters (:class:`companion.report.ImageRow`), the
panels (:mod:`companion.widgets`) and the ``companion bench`` report all draw through here, so an image grid
has one implementation (:func:`image_grid`; :func:`grid_png` is its PNG). What is *measured* (Pareto fronts,
which metrics are higher-better, sweep tables) lives in :mod:`companion.bench`; this module imports it, never
the other way round.

Figures are built as ``plotly.graph_objects.Figure`` so callers can wrap them in ``go.FigureWidget``
for live updates (``go.FigureWidget(fig)``).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from .bench import HIGHER_IS_BETTER, pareto_front, pareto_mask  # noqa: F401  (public here too: figures use them)
from .bench import quality_columns, run_labels, summary_table
from .orders import NOMINAL, fit_order

# Axis titles short enough to show whole on a 360-pixel-high figure (about 34 characters).
AXIS_LABELS = {
    "wall_s": "wall time per run (s)",
    "network_s": "network time (s)",
    "nfe": "network evaluations per sample (NFE)",
    "flops_per_sample": "FLOPs per sample",
    "fd": "FD (lower is better)",
    "kid": "KID (lower is better)",
    "precision": "precision (higher is better)",
    "recall": "recall (higher is better)",
    "density": "density (higher is better)",
    "coverage": "coverage (higher is better)",
    "class_accuracy": "class accuracy (higher = better)",
    "ode_distance": "distance to ODE solution (RMS)",
}

# Distinct colours (Okabe-Ito, then Tableau), marker symbols and dash styles for figures with many series: a
# series differs from its neighbours in colour *and* marker, so lines stay apart in print and for colour-blind readers.
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F",
                 "#BCBD22", "#17BECF", "#9467BD")
SERIES_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down", "pentagon",
                  "hexagon", "circle-open", "square-open")
SERIES_DASHES = ("solid", "dot", "dash", "dashdot", "longdash", "longdashdot")


def series_style(i: int) -> dict:
    """Colour, marker symbol and line of the ``i``-th series of a figure (distinct for the first 12)."""
    return dict(color=SERIES_COLORS[i % len(SERIES_COLORS)], symbol=SERIES_SYMBOLS[i % len(SERIES_SYMBOLS)],
                dash=SERIES_DASHES[(i // len(SERIES_COLORS)) % len(SERIES_DASHES)])


def data_range(values, *, log: bool = False, pad: float = 0.08, floor_zero: bool = True) -> list[float] | None:
    """An axis range that fits ``values`` (finite ones): from 0 (``floor_zero``) or a little below the smallest,
    to a little above the largest; on a log axis, the log10 range with the same padding. None without values."""
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(x)], dtype=float)
    if log:
        v = v[v > 0]
    if not len(v):
        return None
    if log:
        lo, hi = np.log10(v.min()), np.log10(v.max())
        span = max(hi - lo, 0.3)
        return [float(lo - pad * span), float(hi + pad * span)]
    lo, hi = float(v.min()), float(v.max())
    if floor_zero and lo >= 0:
        top = hi * (1 + 2 * pad) if hi > 0 else 1.0
        return [0.0, float(top)]
    span = max(hi - lo, abs(hi) * 0.1, 1e-12)
    return [float(lo - pad * span), float(hi + pad * span)]


def image_grid(images, nrow: int = 8, padding: int = 1, pad_value: float = 1.0, as_pil: bool = False):
    """Tile images (N, C, H, W) with values in [-1, 1] into one uint8 array (rows*H, nrow*W[, 3]).

    Values outside [-1, 1] are clipped for display. One-channel images give a 2-D (grey) array;
    ``as_pil=True`` returns a ``PIL.Image``.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C 1 or 3, got {tuple(x.shape)}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    fill = (float(np.clip(pad_value, -1, 1)) + 1) / 2
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), fill)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = (x[i].clamp(-1, 1) + 1) / 2
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if c == 1:
        arr = arr[..., 0]
    if as_pil:
        from PIL import Image

        return Image.fromarray(arr)
    return arr


def grid_png(images, nrow: int | None = None, scale: int = 4) -> bytes:
    """PNG bytes of :func:`image_grid` (``nrow`` images a row; default: a square-ish grid), each pixel scaled up
    ``scale`` times (nearest neighbour, so a pixel stays a crisp square)."""
    from PIL import Image

    n = len(images)
    img = image_grid(images, nrow=nrow or max(1, math.ceil(math.sqrt(n))), as_pil=True)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def difference_png(diff: torch.Tensor, scale: float | None = None, *, nrow: int | None = None,
                   pixel_scale: int = 4) -> tuple[bytes, str]:
    """A grid of a difference batch (N, C, H, W) and the sentence stating its scale.

    Each pixel shows the largest |a - b| over its colour channels: black 0, white ``scale`` or more
    (``None``: the largest difference in the batch, so any difference is visible). ``nrow`` and ``pixel_scale``:
    as for :func:`grid_png` (give the values of the grids shown beside it, so all have the same size).
    """
    per_pixel = diff.amax(dim=1, keepdim=True)
    largest = float(per_pixel.max()) if per_pixel.numel() else 0.0
    white = scale if scale is not None else largest
    shown = per_pixel / white if white > 0 else torch.zeros_like(per_pixel)
    png = grid_png(shown.clamp(0, 1) * 2 - 1, nrow=nrow, scale=pixel_scale)
    mean = float(diff.mean()) if diff.numel() else 0.0
    if largest == 0:
        caption = "identical images: |A − B| = 0 at every pixel"
    else:
        basis = "the largest difference in this batch" if scale is None else "fixed scale"
        caption = (f"|A − B| per pixel (largest over colour channels; images span [−1, 1]): black 0, "
                   f"white {white:.3g} or more ({basis}). Largest {largest:.3g}, mean {mean:.3g}")
    return png, caption


# ------------------------------------------------------------------------------------------ HTML fragments


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of PNG bytes (read from the header)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not PNG bytes")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def fit_scale(images, nrow: int | None = None, max_width: int = 320, max_scale: int = 8) -> int:
    """The largest integer scale (1 .. ``max_scale``) at which the grid of ``images`` is at most ``max_width``
    pixels wide: an integer factor keeps every image pixel a crisp square of the same size."""
    n, w = len(images), int(images.shape[-1])
    cols = min(nrow or max(1, math.ceil(math.sqrt(n))), n)
    width = cols * (w + 1) + 1  # image_grid's 1-pixel padding
    return int(max(1, min(max_scale, max_width // width)))


PIXELATED = "image-rendering:pixelated"


def img_tag(png: bytes) -> str:
    """An ``<img>`` of PNG bytes at its own pixel size (no browser scaling, no smoothing)."""
    width, height = png_size(png)
    return (f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' width='{width}' height='{height}' "
            f"style='{PIXELATED};width:{width}px;height:{height}px;max-width:none'/>")


def png_html(png: bytes, title: str = "") -> str:
    """An inline ``<img>`` (with an optional heading) for a static representation, at its own pixel size."""
    head = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return f"<div style='display:inline-block;vertical-align:top;margin-right:1em'>{head}{img_tag(png)}</div>"


def error_html(exc: BaseException, what: str = "This run failed") -> str:
    """An error in plain words, as a red box (inside a panel)."""
    return (f"<div style='color:#a00;border:1px solid #a00;padding:4px'><b>{html.escape(what)}</b> "
            f"({html.escape(type(exc).__name__)}): {html.escape(str(exc))}</div>")


_PLOTLYJS_EMBEDDED = False


def figure_html(fig) -> str:
    """Static HTML of a figure; plotly.js is embedded once per kernel (offline readers have no CDN)."""
    import plotly.graph_objects as go

    global _PLOTLYJS_EMBEDDED
    include = not _PLOTLYJS_EMBEDDED
    _PLOTLYJS_EMBEDDED = True
    return go.Figure(fig).to_html(include_plotlyjs=include, full_html=False)


# ------------------------------------------------------------------------------------------ figures


def speed_quality_figure(df, x: str = "wall_s", y: str = "fd", color: str = "sampler", *, pareto: bool = True,
                         log_x: bool = True, title: str | None = None):
    """Quality (``y``) against cost (``x``) with one trace per ``color`` group, error bars from
    ``<y>_low``/``<y>_high`` and the Pareto front over all points as a dashed line."""
    import plotly.graph_objects as go

    for col in (x, y, color):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the table; columns: {', '.join(map(str, df.columns))}")
    fig = go.Figure()
    has_ci = f"{y}_low" in df.columns and f"{y}_high" in df.columns
    label_cols = [c for c in ("sampler", "steps", "guidance", "mode", "seed", "nfe") if c in df.columns]
    for i, (key, g) in enumerate(df.groupby(color, sort=True, dropna=False)):
        g = g.sort_values(x)
        style = series_style(i)
        error_y = None
        if has_ci:
            error_y = dict(type="data", symmetric=False, array=(g[f"{y}_high"] - g[y]).to_numpy(),
                           arrayminus=(g[y] - g[f"{y}_low"]).to_numpy(), thickness=1, width=3, color=style["color"])
        text = ["<br>".join(f"{c}={r[c]}" for c in label_cols) for _, r in g.iterrows()]
        fig.add_trace(go.Scatter(x=g[x].to_numpy(), y=g[y].to_numpy(), mode="lines+markers", name=str(key),
                                 marker=dict(color=style["color"], symbol=style["symbol"], size=8),
                                 line=dict(color=style["color"], dash=style["dash"]), opacity=0.9,
                                 error_y=error_y, text=text, hovertemplate=f"%{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra></extra>"))
    if pareto and len(df):
        front = pareto_front(df, x, y)
        fig.add_trace(go.Scatter(x=front[x].to_numpy(), y=front[y].to_numpy(), mode="lines", name="Pareto front",
                                 line=dict(dash="dash", color="black", width=1), hoverinfo="skip"))
    fig.update_layout(title=title or f"{y} vs {x}", xaxis_title=AXIS_LABELS.get(x, x), yaxis_title=AXIS_LABELS.get(y, y),
                      template="plotly_white", legend_title_text=color)
    if log_x:
        fig.update_xaxes(type="log")
    # axes fitted to the data: no negative cost or distance around a single point (plotly's own range would pad it)
    x_range = data_range(df[x], log=log_x)
    y_range = data_range(_column_values(df, [y, f"{y}_low", f"{y}_high"]))
    if x_range is not None:
        fig.update_xaxes(range=x_range)
    if y_range is not None:
        fig.update_yaxes(range=y_range)
    return fig


def _column_values(df, cols) -> np.ndarray:
    """The values of the ``cols`` of ``df`` that exist, as one float array."""
    return np.concatenate([df[c].to_numpy(dtype=float) for c in cols if c in df.columns] or [np.zeros(0)])


def order_figure(errors, title: str = "Error vs network evaluations on the exact score (log-log)"):
    """Measured convergence: error against NFE per sampler (:func:`companion.orders.measure_orders`'s table), on
    log-log axes, each sampler in its own colour and marker; a thin dotted line of the same colour runs through
    its cheapest run with the slope of its nominal order. Where the markers fall away from their dotted line,
    the sampler converges more slowly than designed. The legend sits beside the plot (it never scrolls)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups = list(errors.groupby("sampler", sort=False))
    for i, (key, g) in enumerate(groups):
        g = g.sort_values("nfe")
        style = series_style(i)
        p = NOMINAL[key][0]
        measured = fit_order(g["steps"], g["error"])
        name = f"{g['name'].iloc[0]}: order {measured:.1f} (nominal {p})"
        fig.add_trace(go.Scatter(x=g["nfe"], y=g["error"], mode="lines+markers", name=name, legendgroup=key,
                                 line=dict(color=style["color"], width=2),
                                 marker=dict(color=style["color"], symbol=style["symbol"], size=9),
                                 hovertemplate="NFE %{x}<br>error %{y:.3g}<extra>" + key + "</extra>"))
        x0, y0 = float(g["nfe"].iloc[0]), float(g["error"].iloc[0])
        xs = np.array([x0, float(g["nfe"].iloc[-1])])
        fig.add_trace(go.Scatter(x=xs, y=y0 * (xs / x0) ** (-p), mode="lines", name=f"slope -{p} (nominal)",
                                 legendgroup=key, showlegend=False,
                                 line=dict(color=style["color"], dash="dot", width=1), opacity=0.7,
                                 hovertemplate=f"nominal order {p}<extra>{key}</extra>"))
    fig.update_xaxes(type="log", title="network evaluations per sample (NFE)")
    fig.update_yaxes(type="log", exponentformat="power", title="error vs exact solution (RMS)")
    fig.update_layout(title=dict(text=title, x=0, xanchor="left"), template="plotly_white",
                      height=max(480, 90 + 26 * len(groups)), margin=dict(l=80, r=20, t=50, b=60),
                      legend=dict(title_text="sampler (dotted: nominal slope)", x=1.02, xanchor="left", y=1,
                                  yanchor="top", font=dict(size=12)))
    return fig


def html_report(df, path: str | Path, title: str = "companion bench") -> Path:
    """A self-contained interactive HTML page of a :func:`companion.bench.sweep` table (plotly.js inlined: works
    offline): one speed/quality figure per quality column and cost axis, then every run."""
    path = Path(path)
    parts = []
    first = True
    df = df.assign(run=run_labels(df))
    color = "run"
    for y in quality_columns(df):
        for x in ("wall_s", "nfe"):
            fig = speed_quality_figure(df, x=x, y=y, color=color)
            parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
            first = False
    table = summary_table(df).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:2px 8px;text-align:right}</style></head><body>"
            f"<h1>{title}</h1><p>{len(df)} runs. Quality is measured in the bundled feature network's space "
            "(not Inception); error bars are 95 % bootstrap intervals; dashed: Pareto front.</p>"
            + "".join(parts) + "<h2>All runs</h2>" + table + "</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
