"""The taxonomy data file and its explorer figure."""
import re

import pandas as pd
import pytest

from companion import taxonomy
from companion.cli import static_view


def test_taxonomy_rows_are_complete_and_valid():
    df = taxonomy.load_taxonomy()
    assert len(df) >= 15
    assert set(df.group) == {"EDS", "EPS"}
    assert df.arxiv.map(lambda a: bool(re.fullmatch(r"\d{4}\.\d{5}", a))).all()
    assert set(df.family) <= {"DDPM", "LDM", "Frido"}
    # the three architectures the survey anchors on are present, as the survey's own placement
    for m in ("DDPM", "LDM", "Frido"):
        assert df.loc[df.method == m, "placement"].item() == "survey"
    assert not df.method.duplicated().any()


def test_invalid_taxonomy_is_refused(tmp_path, monkeypatch):
    df = taxonomy.load_taxonomy().copy()
    df.loc[0, "group"] = "XYZ"
    df.to_csv(tmp_path / "taxonomy.csv", index=False)
    monkeypatch.setenv("COMPANION_ASSETS", str(tmp_path))
    with pytest.raises(ValueError, match=r"'group' has invalid value\(s\) \['XYZ'\]"):
        taxonomy.load_taxonomy()


def test_sunburst_has_every_method_under_its_group_and_lever():
    df = taxonomy.load_taxonomy()
    fig = taxonomy.sunburst(df)
    tr = fig.data[0]
    parent_of = dict(zip(tr.ids, tr.parents))
    for _, r in df.iterrows():
        leaf = f"{r.group}/{r.lever}/{r.method}"
        assert parent_of[leaf] == f"{r.group}/{r.lever}"
        assert parent_of[f"{r.group}/{r.lever}"] == r.group


def test_static_view_prefers_static_html_over_a_widget_view():
    import nbformat

    nb = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/html": "<b>static</b>", "text/plain": "panel"})
    only_widget = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2, "version_minor": 0}, "text/plain": "w"})
    nb.cells = [nbformat.v4.new_code_cell("p", outputs=[out, only_widget])]
    nb.metadata["widgets"] = {"state": {}}
    view = static_view(nb)
    assert "application/vnd.jupyter.widget-view+json" not in view.cells[0].outputs[0].data
    assert "application/vnd.jupyter.widget-view+json" in view.cells[0].outputs[1].data
    assert "widgets" not in view.metadata
    assert "application/vnd.jupyter.widget-view+json" in nb.cells[0].outputs[0].data  # the original is untouched
