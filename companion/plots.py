"""Figures: image grids (no torchvision) and plotly speed/quality figures.

Figures are built as ``plotly.graph_objects.Figure`` so callers can wrap them in ``go.FigureWidget``
for live updates (``go.FigureWidget(fig)``).
"""
from __future__ import annotations

import numpy as np
import torch

# Metrics where a larger value is better; every other metric (fd, kid, ode_distance, ...) is lower-better.
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage", "class_accuracy", "log_likelihood"})

AXIS_LABELS = {
    "wall_s": "wall time per run (s)",
    "network_s": "network time (s)",
    "nfe": "network evaluations per sample (NFE)",
    "flops_per_sample": "FLOPs per sample",
    "fd": "Frechet distance (lower is better)",
    "kid": "KID (lower is better)",
    "precision": "precision (higher is better)",
    "recall": "recall (higher is better)",
    "density": "density (higher is better)",
    "coverage": "coverage (higher is better)",
    "class_accuracy": "class accuracy (higher is better)",
    "ode_distance": "RMS distance to the reference ODE solution (lower is better)",
}


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


def pareto_mask(x: np.ndarray, y: np.ndarray, higher_is_better: bool = False) -> np.ndarray:
    """True for the points no other point beats in both (lower or equal x, better or equal y, one strictly)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    yy = -y if higher_is_better else y
    ok = np.isfinite(x) & np.isfinite(yy)
    mask = np.zeros(len(x), dtype=bool)
    best = np.inf
    # sweep by x (ties: best y first); a point is on the front when it improves on everything cheaper
    for i in np.lexsort((yy, x)):
        if ok[i] and yy[i] < best:
            mask[i] = True
            best = yy[i]
    return mask


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
    for key, g in df.groupby(color, sort=True, dropna=False):
        g = g.sort_values(x)
        error_y = None
        if has_ci:
            error_y = dict(type="data", symmetric=False, array=(g[f"{y}_high"] - g[y]).to_numpy(),
                           arrayminus=(g[y] - g[f"{y}_low"]).to_numpy(), thickness=1)
        text = ["<br>".join(f"{c}={r[c]}" for c in label_cols) for _, r in g.iterrows()]
        fig.add_trace(go.Scatter(x=g[x].to_numpy(), y=g[y].to_numpy(), mode="lines+markers", name=str(key),
                                 error_y=error_y, text=text, hovertemplate=f"%{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra></extra>"))
    if pareto and len(df):
        front = pareto_front(df, x, y)
        fig.add_trace(go.Scatter(x=front[x].to_numpy(), y=front[y].to_numpy(), mode="lines", name="Pareto front",
                                 line=dict(dash="dash", color="black", width=1), hoverinfo="skip"))
    fig.update_layout(title=title or f"{y} vs {x}", xaxis_title=AXIS_LABELS.get(x, x), yaxis_title=AXIS_LABELS.get(y, y),
                      template="plotly_white", legend_title_text=color)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def pareto_front(df, x: str, y: str, higher_is_better: bool | None = None):
    """The rows of ``df`` on the Pareto front of cost ``x`` (lower is better) and quality ``y``, sorted by ``x``.

    Whether larger ``y`` is better defaults to :data:`HIGHER_IS_BETTER`.
    """
    for col in (x, y):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the table; columns: {', '.join(map(str, df.columns))}")
    hib = (y in HIGHER_IS_BETTER) if higher_is_better is None else higher_is_better
    mask = pareto_mask(df[x].to_numpy(), df[y].to_numpy(), hib)
    return df[mask].sort_values(x)
