"""The survey's taxonomy as data (``assets/taxonomy.csv``) and its explorer figure.

Columns: method, year, arxiv, group (EDS = efficient design strategy, EPS = efficient process strategy),
lever, family (DDPM / LDM / Frido architecture family), chapter (the notebook that demonstrates it),
placement ("survey" where the survey's abstract/summary names the item under that lever, "companion
reading" where the placement is this companion's own reading, to be corrected in this one file) and note.
"""
from __future__ import annotations

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


def sunburst(df: pd.DataFrame | None = None) -> go.Figure:
    """Group -> lever -> method; hover shows year, arXiv id, family, chapter and whether the placement is the survey's."""
    df = load_taxonomy() if df is None else df
    ids, labels, parents, hover, colors = [], [], [], [], []
    palette = {"EDS": "#4C78A8", "EPS": "#F58518"}
    for g, gname in GROUPS.items():
        ids.append(g), labels.append(f"{g}<br>{gname}"), parents.append(""), hover.append(gname), colors.append(palette[g])
        for lever in sorted(df.loc[df.group == g, "lever"].unique()):
            lid = f"{g}/{lever}"
            ids.append(lid), labels.append(lever), parents.append(g), hover.append(f"lever: {lever}"), colors.append(palette[g])
            for _, r in df[(df.group == g) & (df.lever == lever)].iterrows():
                mark = "" if r.placement == "survey" else " *"
                ids.append(f"{lid}/{r.method}"), labels.append(r.method + mark), parents.append(lid)
                hover.append(f"{r.method} ({r.year}), arXiv {r.arxiv}<br>family: {r.family}<br>chapter: {r.chapter}"
                             f"<br>placement: {r.placement}<br>{r.note}")
                colors.append("#BBBBBB" if r.placement != "survey" else palette[g])
    fig = go.Figure(go.Sunburst(ids=ids, labels=labels, parents=parents, hovertext=hover, hoverinfo="text",
                                marker=dict(colors=colors), insidetextorientation="radial"))
    fig.update_layout(height=560, margin=dict(l=0, r=0, t=30, b=0),
                      title="Efficient diffusion: the survey's two groups (* = the companion's own placement, grey)")
    return fig


def published_numbers() -> pd.DataFrame:
    """Published sample-quality numbers (``assets/published_numbers.csv``), to show *beside* the companion's
    own measurements, labelled as published: CIFAR-10, Inception-FID on 50k samples, from the cited papers.
    Values recalled but not checked against a primary source are left out of the file."""
    return pd.read_csv(assets_dir() / "published_numbers.csv", dtype={"arxiv": str})
