"""The survey's taxonomy as data (``assets/taxonomy.csv``) and its explorer figure.

Columns: method, year, arxiv, group (EDS = efficient design strategy, EPS = efficient process strategy),
lever, family (DDPM / LDM / Frido architecture family), chapter (the notebook that demonstrates it),
placement ("survey" where the survey's abstract/summary names the item under that lever, "companion
reading" where the placement is this companion's own reading, to be corrected in this one file) and note.
"""
from __future__ import annotations

import textwrap

import pandas as pd
import plotly.graph_objects as go

from .assets import assets_dir

COLUMNS = ["method", "year", "arxiv", "group", "lever", "family", "chapter", "placement", "note"]
GROUPS = {"EDS": "Efficient Design Strategies", "EPS": "Efficient Process Strategies"}
PLACEMENTS = ("survey", "companion reading")


def load_taxonomy() -> pd.DataFrame:
    """The taxonomy table, validated (known groups, placements and families; arXiv ids present)."""
    path = assets_dir() / "taxonomy.csv"
    df = pd.read_csv(path, dtype={"arxiv": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
    for col, valid in (("group", tuple(GROUPS)), ("placement", PLACEMENTS), ("family", ("DDPM", "LDM", "Frido"))):
        bad = sorted(set(df[col]) - set(valid))
        if bad:
            raise ValueError(f"{path}: column {col!r} has invalid value(s) {bad}; valid: {list(valid)}")
    return df[COLUMNS]


# Short centre labels: the full names are in the hover text and the title.
GROUP_LABELS = {"EDS": "EDS<br>design", "EPS": "EPS<br>process"}


def _lines(text: str, width: int = 13) -> str:
    """A label broken into lines of about ``width`` characters (a horizontal label fits a narrow wedge)."""
    return "<br>".join(textwrap.wrap(text, width, break_long_words=False)) or text


def sunburst(df: pd.DataFrame | None = None, height: int = 760) -> go.Figure:
    """Group -> lever -> method; hover shows year, arXiv id, family, chapter and whether the placement is the survey's.

    Labels are horizontal and at least 11 px (a label that does not fit its wedge at that size is hidden; hover
    shows it); click a wedge to zoom into it."""
    df = load_taxonomy() if df is None else df
    ids, labels, parents, hover, colors = [], [], [], [], []
    palette = {"EDS": "#4C78A8", "EPS": "#F58518"}
    lever_palette = {"EDS": "#9DB9D6", "EPS": "#F9BE85"}
    for g, gname in GROUPS.items():
        ids.append(g), labels.append(GROUP_LABELS[g]), parents.append(""), hover.append(gname), colors.append(palette[g])
        for lever in sorted(df.loc[df.group == g, "lever"].unique()):
            lid = f"{g}/{lever}"
            ids.append(lid), labels.append(_lines(lever)), parents.append(g), hover.append(f"{gname}<br>lever: {lever}")
            colors.append(lever_palette[g])
            for _, r in df[(df.group == g) & (df.lever == lever)].iterrows():
                mark = "" if r.placement == "survey" else " *"
                ids.append(f"{lid}/{r.method}"), labels.append(_lines(r.method + mark, 12)), parents.append(lid)
                hover.append(f"{r.method} ({r.year}), arXiv {r.arxiv}<br>family: {r.family}<br>chapter: {r.chapter}"
                             f"<br>placement: {r.placement}<br>{r.note}")
                colors.append("#DDDDDD" if r.placement != "survey" else lever_palette[g])
    fig = go.Figure(go.Sunburst(ids=ids, labels=labels, parents=parents, hovertext=hover, hoverinfo="text",
                                marker=dict(colors=colors, line=dict(color="white", width=1)),
                                insidetextorientation="horizontal", textfont=dict(size=13, color="#111"),
                                leaf=dict(opacity=1)))
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=60, b=10), uniformtext=dict(minsize=11, mode="hide"),
                      title=dict(text="Efficient diffusion: the survey's two groups, their levers and methods<br>"
                                      "<sup>EDS = efficient design strategies, EPS = efficient process strategies; "
                                      "* grey = the companion's own placement; click a wedge to zoom</sup>",
                                 x=0, xanchor="left"))
    return fig


def published_numbers() -> pd.DataFrame:
    """Published sample-quality numbers (``assets/published_numbers.csv``), to show *beside* the companion's
    own measurements, labelled as published: CIFAR-10, Inception-FID on 50k samples, from the cited papers.
    Values recalled but not checked against a primary source are left out of the file."""
    return pd.read_csv(assets_dir() / "published_numbers.csv", dtype={"arxiv": str})
