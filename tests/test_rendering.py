"""Rendering has one home (companion.plots), run tables another (companion.report); the analysis figures draw
with (Pareto fronts) lives in companion.bench. (The import graph itself is checked in test_architecture.py.)"""
from __future__ import annotations

from io import BytesIO

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from companion import plots, report


def test_pareto_analysis_lives_in_bench_and_plots_draws_with_it():
    from companion import bench

    assert plots.pareto_front is bench.pareto_front and plots.pareto_mask is bench.pareto_mask
    assert plots.HIGHER_IS_BETTER is bench.HIGHER_IS_BETTER


# ------------------------------------------------------------------------------------------ image grids


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(png)))


@pytest.mark.parametrize("shape, nrow", [((5, 3, 4, 4), 3), ((16, 1, 8, 8), None), ((7, 1, 5, 5), 2)])
def test_grid_png_is_image_grid_scaled_up(shape, nrow):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1.3  # some values outside [-1, 1]
    square = int(np.ceil(np.sqrt(shape[0])))
    grid = plots.image_grid(x, nrow=nrow or square)
    assert np.array_equal(decode(plots.grid_png(x, nrow=nrow, scale=1)), grid)
    big = decode(plots.grid_png(x, nrow=nrow, scale=3))
    assert np.array_equal(big[::3, ::3], grid) and big.shape[:2] == (3 * grid.shape[0], 3 * grid.shape[1])


def test_grid_png_refuses_a_bad_shape_naming_it():
    with pytest.raises(ValueError, match=r"C 1 or 3, got \(2, 2, 4, 4\)"):
        plots.grid_png(torch.zeros(2, 2, 4, 4))


def test_difference_png_states_its_scale():
    d = torch.zeros(4, 1, 4, 4)
    png, caption = plots.difference_png(d)
    assert caption.startswith("identical images") and decode(png)[4:20, 4:20].max() == 0  # x4: 1 px border, 4x4 image
    d[0, 0, 0, 0] = 0.5
    png, caption = plots.difference_png(d, scale=1.0)
    assert "white 1 or more (fixed scale)" in caption and "Largest 0.5" in caption
    assert decode(png)[4, 4] == 128  # 0.5 of the scale: mid grey (scaled x4 after a 1 px border: image pixel (0, 0))
    _, caption = plots.difference_png(d)
    assert "white 0.5 or more (the largest difference in this batch)" in caption


def test_html_fragments_escape_what_they_show():
    assert "&lt;b&gt;" in plots.error_html(ValueError("<b>"), "A & B")
    assert "A &amp; B" in plots.error_html(ValueError("x"), "A & B")
    html = plots.png_html(plots.grid_png(torch.zeros(1, 1, 2, 2)), "a <title>")
    assert "a &lt;title&gt;" in html and "data:image/png;base64," in html


def test_html_report_draws_a_sweep_table(tmp_path):
    df = pd.DataFrame({"model": "m", "sampler": ["ddim", "ddim", "dpmpp_2m"], "steps": [5, 10, 5], "guidance": None,
                       "mode": "default", "seed": 0, "nfe": [5, 10, 5], "wall_s": [0.1, 0.2, 0.12],
                       "fd": [30.0, 20.0, 22.0], "fd_low": [28.0, 18.0, 20.0], "fd_high": [32.0, 22.0, 24.0]})
    path = plots.html_report(df, tmp_path / "report.html", title="tiny <sweep>")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "3 runs" in page and "Pareto front" in page
    assert page.count("<script") >= 2 and not (tmp_path / "report.html.tmp").exists()


# ------------------------------------------------------------------------------------------ tables


class _Rec:
    sampler, steps, nfe, wall_s, network_s, overhead_s, seed, batch, stochastic = "ddim", 10, 10, 0.25, 0.2, 0.05, 3, 8, False
    speed = {"label": "bf16"}


def test_record_table_shows_one_run():
    html = report.record_table(_Rec(), 0.12345, "accuracy <higher>")
    for text in ("DDIM", "deterministic", "10 / 10", "250 ms", "200 ms / 50.0 ms", "3 / 8", "bf16", "accuracy &lt;higher&gt;", "0.1235"):
        assert text in html, text
    assert "n/a (stochastic sampler: no ODE reference)" in report.record_table(_Rec(), None, "q")


def test_image_row_renders_each_grid_through_grid_png():
    x = torch.zeros(3, 1, 4, 4)
    row = report.ImageRow({"a & b": x}, nrow=3, scale=2, title="t")
    assert row.pngs["a & b"] == plots.grid_png(x, nrow=3, scale=2)
    assert "a &amp; b" in row._repr_html_()


def test_finding_verdict_names_the_outcome():
    assert report.finding_verdict(True) == report.finding_verdict(True, True) == "supported"
    assert report.finding_verdict(False, True) == "partly supported"
    assert report.finding_verdict(False) == "not supported"


def test_quality_row_measures_a_result_or_plain_images():
    from companion.data import digits

    x, y = digits(16, "test")
    x, y = x[:128], y[:128]
    still = report.quality_row("real", x, y, start=x)
    assert still["NFE"] == 0 and still["wall s"] == 0.0 and still["RMS from start"] == 0.0
    assert still["FD 95% CI"] == f"[{still['FD 95% CI'][1:].split(',')[0]}, {still['FD high']:.1f}]"
    assert still["class acc"] > 0.8  # real test digits: the classifier knows them

    class Result:  # what quality_row reads of a sampling result
        images = x * 1.5  # partly outside [-1, 1]: clamped first, as a saved image would be
        record = _Rec()

    moved = report.quality_row("run", Result(), y, start=x)
    assert moved["NFE"] == 10 and moved["wall s"] == 0.25
    assert moved["RMS from start"] == pytest.approx(float((x.mul(1.5).clamp(-1, 1) - x).pow(2).mean().sqrt()))
    assert np.isnan(report.quality_row("run", Result(), y)["RMS from start"])
