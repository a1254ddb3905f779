"""The chapters' diagrams, drawn by code as small SVG files (no plotting library: plain SVG text).

:data:`DIAGRAMS` maps each file name to the function that draws it: the survey's taxonomy (read from
``assets/taxonomy.csv``, so it follows the data), one solver step, the cascade of chapter 03, progressive and
consistency distillation. :func:`write_all` writes them into ``assets/diagrams/``; ``companion diagrams`` runs it,
and ``companion diagrams --check`` (and the tests) fail when a committed file differs from what the code draws.
The output is deterministic: the same code and data give the same bytes.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

from .assets import assets_dir
from .taxonomy import load_taxonomy

FONT = "font-family=\"Helvetica, Arial, sans-serif\""
INK, MUTED, ACCENT, ACCENT2, FILL, FILL2 = "#222", "#666", "#1f77b4", "#d62728", "#eef4fb", "#fdeeee"


def _n(v: float) -> str:
    """A coordinate with at most one decimal (small files, stable bytes)."""
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


class Svg:
    """A minimal SVG writer: boxes, text, lines, arrows, paths, circles."""

    def __init__(self, width: int, height: int, title: str):
        self.width, self.height, self.parts = width, height, []
        self.title = title

    def rect(self, x, y, w, h, *, fill=FILL, stroke=ACCENT, rx=4, dash=False):
        d = ' stroke-dasharray="4 3"' if dash else ""
        self.parts.append(f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" rx="{rx}" fill="{fill}" '
                          f'stroke="{stroke}"{d}/>')

    def text(self, x, y, s, *, size=12, anchor="middle", color=INK, bold=False, italic=False):
        style = (' font-weight="bold"' if bold else "") + (' font-style="italic"' if italic else "")
        self.parts.append(f'<text x="{_n(x)}" y="{_n(y)}" font-size="{size}" text-anchor="{anchor}" fill="{color}"'
                          f'{style}>{html.escape(s)}</text>')

    def box(self, x, y, w, h, lines, *, fill=FILL, stroke=ACCENT, size=12, dash=False):
        """A rectangle with centred lines of text (the first in bold when there are several)."""
        self.rect(x, y, w, h, fill=fill, stroke=stroke, dash=dash)
        lines = [lines] if isinstance(lines, str) else list(lines)
        step = size + 3
        top = y + h / 2 - step * (len(lines) - 1) / 2 + size * 0.35
        for i, line in enumerate(lines):
            self.text(x + w / 2, top + i * step, line, size=size, bold=len(lines) > 1 and i == 0)

    def line(self, x1, y1, x2, y2, *, color=INK, width=1.2, arrow=False, dash=False):
        extra = (' marker-end="url(#arrow)"' if arrow else "") + (' stroke-dasharray="4 3"' if dash else "")
        self.parts.append(f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{color}" '
                          f'stroke-width="{width}"{extra}/>')

    def path(self, d, *, color=INK, width=1.5, dash=False, arrow=False):
        extra = (' stroke-dasharray="4 3"' if dash else "") + (' marker-end="url(#arrow)"' if arrow else "")
        self.parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"{extra}/>')

    def dot(self, x, y, *, r=4, color=INK):
        self.parts.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{r}" fill="{color}"/>')

    def render(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" {FONT}>\n<title>{html.escape(self.title)}</title>\n'
                '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{INK}"/></marker></defs>\n'
                f'<rect width="{self.width}" height="{self.height}" fill="white"/>\n')
        return head + "\n".join(self.parts) + "\n</svg>\n"


# ---------------------------------------------------------------------------------------------- taxonomy
GROUPS = {"EDS": ("EDS", "efficient design", "strategies"), "EPS": ("EPS", "efficient process", "strategies")}


def taxonomy() -> str:
    """Group -> lever -> method, with the chapter that measures each method (from ``assets/taxonomy.csv``)."""
    df = load_taxonomy()
    unknown = sorted(set(df["group"]) - set(GROUPS))
    if unknown:
        raise ValueError(f"taxonomy.csv has groups {unknown} the diagram does not know; known: {', '.join(GROUPS)}")
    row_h, top, cols = 21, 48, (10, 200, 440, 660)
    svg = Svg(900, top + row_h * len(df) + 40, "The survey's taxonomy: group, lever, method, chapter")
    svg.text(10, 22, "Efficient diffusion models (Ulhaq & Akhtar, arXiv 2210.09292): group → lever → method → chapter",
             size=13, anchor="start", bold=True)
    y = top
    for group in GROUPS:
        g = df[df["group"] == group]
        if g.empty:
            continue
        svg.box(cols[0], y, 175, row_h * len(g) - 4, GROUPS[group], fill=FILL2 if group == "EPS" else FILL)
        for lever in dict.fromkeys(g["lever"]):
            rows = g[g["lever"] == lever]
            h = row_h * len(rows) - 4
            lever_mid = y + h / 2  # fixed before the rows below move y
            svg.line(cols[0] + 175, lever_mid, cols[1], lever_mid, color=MUTED)
            svg.box(cols[1], y, 220, h, _wrap(lever, 32) if len(rows) > 1 else [_clip(lever, 34)], size=11)
            for _, r in rows.iterrows():
                mid = y + (row_h - 4) / 2
                svg.line(cols[1] + 220, lever_mid, cols[2], mid, color=MUTED, width=0.8)
                survey = r["placement"] == "survey"
                svg.rect(cols[2], y, 200, row_h - 4, fill="white", stroke=ACCENT if survey else MUTED, dash=not survey)
                svg.text(cols[2] + 6, mid + 4, f"{r['method']} ({r['year']})", size=11, anchor="start")
                svg.text(cols[3], mid + 4, f"{r['chapter']}", size=11, anchor="start", color=MUTED)
                y += row_h
    svg.text(10, y + 22, "solid box: named by the survey · dashed box: a companion reading beside it", size=11,
             anchor="start", color=MUTED)
    return svg.render()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -------------------------------------------------------------------------------------------- solver step
def solver_step() -> str:
    """One step of a first-order solver (DDIM / Euler) and one of a second-order multistep solver on the
    probability-flow ODE: the tangent misses the trajectory by the local error; reusing the previous step's
    prediction bends the step towards it."""
    svg = Svg(790, 330, "One solver step on the probability-flow ODE")
    svg.text(12, 22, "One solver step on the probability-flow ODE", size=14, anchor="start", bold=True)
    # axes: noise level (high to low, left to right) and one pixel's value
    svg.line(60, 280, 610, 280, arrow=True)
    svg.line(60, 280, 60, 40, arrow=True)
    svg.text(600, 300, "noise level σ → 0", size=11, anchor="end", color=MUTED)
    svg.text(52, 50, "x", size=12, anchor="end", italic=True)
    # the exact trajectory through three levels
    svg.path("M 80 240 C 220 225, 330 190, 420 140 S 560 70, 600 62", color=ACCENT, width=2)
    svg.text(590, 52, "exact ODE trajectory", size=11, anchor="end", color=ACCENT)
    for x, lbl in ((150, "σ_prev"), (300, "σ_now"), (470, "σ_next")):
        svg.line(x, 280, x, 286)
        svg.text(x, 300, lbl, size=11)
    svg.dot(150, 232, color=MUTED)
    svg.text(150, 220, "x_prev: its call's x̂0 is kept", size=10, color=MUTED)
    svg.dot(300, 193, color=INK)
    svg.text(292, 184, "x_now", size=12, anchor="end")
    # first order: along the current tangent
    svg.line(300, 193, 470, 134, color=ACCENT2, width=1.6, arrow=True)
    svg.dot(470, 134, r=3.5, color=ACCENT2)
    svg.text(478, 150, "first order (DDIM, Euler): one network call,", size=11, anchor="start", color=ACCENT2)
    svg.text(478, 164, "follow the current prediction", size=11, anchor="start", color=ACCENT2)
    # second order multistep: bends with the previous prediction
    svg.path("M 300 193 Q 385 160 470 118", color=INK, width=1.6, dash=True, arrow=True)
    svg.dot(470, 118, r=3.5)
    svg.text(478, 108, "second order (DPM-Solver++ 2M): the same call,", size=11, anchor="start")
    svg.text(478, 122, "corrected with the previous one", size=11, anchor="start")
    svg.dot(470, 113, r=3.5, color=ACCENT)
    svg.line(462, 132, 462, 115, color=MUTED, width=1)
    svg.text(455, 154, "local error of the first-order step", size=10, anchor="end", color=MUTED)
    svg.text(60, 322, "A step costs the network calls it makes (NFE); its error shrinks like h^(p+1) per step, N^-p overall "
             "for order p.", size=11, anchor="start", color=MUTED)
    return svg.render()


# ------------------------------------------------------------------------------------------------ cascade
def cascade() -> str:
    """Chapter 03's cascade: a 16×16 base model, then a 32×32 super-resolution stage conditioned on its output
    (bilinearly upsampled and concatenated to the input), against one 32×32 model."""
    svg = Svg(800, 250, "A two-stage cascade: base model, then super-resolution")
    svg.text(12, 22, "A cascade (chapter 03): a cheap low-resolution stage, then a conditioned super-resolution stage",
             size=13, anchor="start", bold=True)
    y = 60
    svg.box(10, y, 100, 50, ["noise", "3×16×16"], fill="white", stroke=MUTED)
    svg.line(110, y + 25, 140, y + 25, arrow=True)
    svg.box(140, y, 150, 50, ["base model", "shapes-base16, N steps"])
    svg.line(290, y + 25, 320, y + 25, arrow=True)
    svg.box(320, y, 110, 50, ["16×16 image", "clamped to [-1, 1]"], fill="white", stroke=MUTED)
    svg.line(430, y + 25, 500, y + 25, arrow=True)
    svg.text(465, y + 17, "bilinear ×2", size=10, color=MUTED)
    svg.box(500, y, 150, 50, ["SR model", "shapes-sr32, M steps"], fill=FILL2, stroke=ACCENT2)
    svg.line(650, y + 25, 680, y + 25, arrow=True)
    svg.box(680, y, 110, 50, ["32×32 image", "the sample"], fill="white", stroke=MUTED)
    svg.box(500, y + 90, 150, 40, ["noise 3×32×32", "+ the upsampled image as", "extra input channels"],
            fill="white", stroke=MUTED, size=10)
    svg.line(575, y + 90, 575, y + 50, arrow=True)
    svg.text(10, 215, "Cost = N calls at 16×16 + M calls at 32×32; against one 32×32 model (shapes-pixel) that "
             "pays every call at full resolution.", size=11, anchor="start", color=MUTED)
    svg.text(10, 232, "Cascaded diffusion: Ho et al., arXiv 2106.15282.", size=11, anchor="start", color=MUTED)
    return svg.render()


# --------------------------------------------------------------------------------- progressive distillation
def progressive_distillation() -> str:
    """Each stage halves the steps: the student's one step must land where the teacher's two steps land."""
    svg = Svg(700, 300, "Progressive distillation: each stage halves the steps")
    svg.text(12, 22, "Progressive distillation (Salimans & Ho, arXiv 2202.00512): each stage halves the steps",
             size=13, anchor="start", bold=True)
    x0, x1 = 90, 650
    for row, n in enumerate((8, 4, 2, 1)):
        y = 70 + row * 55
        svg.text(80, y + 4, f"{n} step{'s' if n > 1 else ''}", size=12, anchor="end", bold=True)
        pts = [x0 + (x1 - x0) * i / n for i in range(n + 1)]
        for a, b in zip(pts, pts[1:]):
            svg.path(f"M {_n(a)} {y} Q {_n((a + b) / 2)} {y - 22} {_n(b)} {y}", color=ACCENT if row else MUTED,
                     width=1.5, arrow=True)
        for p in pts:
            svg.dot(p, y, r=3)
        if row:
            svg.line(x0, y - 38, x0, y - 6, color=MUTED, dash=True, width=0.8)
    svg.text(x0, 58, "noise (σ_max)", size=10, anchor="middle", color=MUTED)
    svg.text(x1, 58, "image (σ = 0)", size=10, anchor="middle", color=MUTED)
    svg.text(12, 270, "Teacher (row above) takes two Euler steps σ_i → σ_i+1 → σ_i+2; the student (the row below, "
             "initialised from the teacher)", size=11, anchor="start", color=MUTED)
    svg.text(12, 286, "learns the x̂0 whose one step σ_i → σ_i+2 lands on the same point (the target "
             "companion.distill.pd_target computes).", size=11, anchor="start", color=MUTED)
    return svg.render()


# --------------------------------------------------------------------------------- consistency distillation
def consistency_distillation() -> str:
    """Points on one teacher ODE trajectory must map to the same clean image."""
    svg = Svg(830, 310, "Consistency distillation: every point of a trajectory maps to its end")
    svg.text(12, 22, "Consistency distillation (Song et al., arXiv 2303.01469): every point of a trajectory maps to "
             "its end", size=13, anchor="start", bold=True)
    svg.path("M 620 90 C 520 120, 420 200, 300 215 S 140 230, 90 235", color=ACCENT, width=2)
    svg.text(630, 84, "x_T (noise)", size=11, anchor="start")
    svg.dot(90, 235, r=5, color=ACCENT2)
    svg.text(90, 258, "x_0 (the trajectory's end)", size=11, color=ACCENT2)
    svg.dot(470, 163, r=4)
    svg.text(478, 158, "x_t_n+1 (noised data)", size=11, anchor="start")
    svg.dot(400, 193, r=4, color=MUTED)
    svg.text(408, 212, "x̂_t_n: one teacher ODE step (DDIM)", size=11, anchor="start", color=MUTED)
    svg.path("M 470 163 Q 300 60 98 228", color=INK, width=1.3, dash=False, arrow=True)
    svg.text(300, 88, "f_θ(x_t_n+1, t_n+1): the student", size=11)
    svg.path("M 400 193 Q 260 140 100 230", color=MUTED, width=1.3, dash=True, arrow=True)
    svg.text(250, 160, "f_θ⁻(x̂_t_n, t_n): the EMA target", size=11, color=MUTED)
    svg.text(12, 282, "Loss: |f_θ(x_t_n+1) − f_θ⁻(x̂_t_n)|² with f(x, t) = c_skip(t) x + c_out(t) x̂0(x, t) and f(x, 0) = x "
             "(LCM's scalings); θ⁻ is an EMA of θ.", size=11, anchor="start", color=MUTED)
    svg.text(12, 298, "One call of f maps noise to an image: a one-step sampler (more steps re-noise and call f again).",
             size=11, anchor="start", color=MUTED)
    return svg.render()


DIAGRAMS: dict[str, Callable[[], str]] = {
    "taxonomy.svg": taxonomy,
    "solver_step.svg": solver_step,
    "cascade.svg": cascade,
    "progressive_distillation.svg": progressive_distillation,
    "consistency_distillation.svg": consistency_distillation,
}


def diagrams_dir() -> Path:
    return assets_dir() / "diagrams"


def write_all(folder: Path | str | None = None) -> list[Path]:
    """Draw every diagram into ``folder`` (default ``assets/diagrams/``); returns the paths written."""
    out = Path(folder) if folder is not None else diagrams_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in DIAGRAMS.items():
        (out / name).write_text(draw(), encoding="utf-8")
        paths.append(out / name)
    return paths


def stale(folder: Path | str | None = None) -> list[str]:
    """Names of the diagrams whose file in ``folder`` is missing or differs from what the code draws now."""
    out = Path(folder) if folder is not None else diagrams_dir()
    return [name for name, draw in DIAGRAMS.items()
            if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != draw()]
