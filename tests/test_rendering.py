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


# ------------------------------------------------------------------------------------------ readable figures


def test_fit_scale_picks_the_largest_integer_scale_that_fits():
    x = torch.zeros(8, 1, 16, 16)  # 3 a row: 3 * 17 + 1 = 52 pixels wide
    assert plots.fit_scale(x, max_width=320) == 6 and plots.fit_scale(x, max_width=51) == 1
    png = plots.grid_png(x, scale=plots.fit_scale(x, max_width=320))
    assert plots.png_size(png) == (312, 312)
    tag = plots.img_tag(png)
    assert "width='312' height='312'" in tag and "image-rendering:pixelated" in tag


def test_data_range_starts_at_zero_and_fits_the_data():
    assert plots.data_range([0.2, 0.5]) == pytest.approx([0.0, 0.58])
    assert plots.data_range([]) is None and plots.data_range([float("nan")]) is None
    lo, hi = plots.data_range([0.01, 1.0], log=True)
    assert lo < -2 and 0 < hi < 0.5
    assert plots.data_range([-1.0, 1.0])[0] < -1  # signed data keeps its sign


def test_order_figure_gives_each_sampler_its_own_style_and_a_plain_title():
    rows = []
    for key, name, p in (("ddim", "DDIM", 1), ("heun", "Heun", 2), ("dpmpp_2m", "DPM-Solver++ 2M", 2)):
        for steps in (100, 200):
            rows.append({"sampler": key, "name": name, "steps": steps, "nfe": steps, "error": 1e-2 * (100 / steps) ** p})
    fig = plots.order_figure(pd.DataFrame(rows))
    measured = [t for t in fig.data if t.showlegend is not False]
    assert len(measured) == 3 and len(fig.data) == 6
    assert len({t.marker.color for t in measured}) == 3 and len({t.marker.symbol for t in measured}) == 3
    assert fig.layout.yaxis.title.text == "error vs exact solution (RMS)"
    assert fig.layout.legend.x > 1 and fig.layout.height >= 480  # the legend beside the plot: it never scrolls
    assert all(t.line.dash == "dot" for t in fig.data if t.showlegend is False)
    assert list(measured[0].x) == sorted(measured[0].x)


def test_sweep_table_speaks_plainly():
    df = pd.DataFrame({"model": "m", "sampler": ["dpmpp_2m", "ddim", "ddim"], "steps": [5, 10, 5], "guidance": None,
                       "mode": "default", "seed": 0, "nfe": [5, 10, 5], "wall_s": [0.1, 0.2, 0.12],
                       "fd": [30.0, 20.0, 22.0], "fd_low": [28.0, 18.0, 20.0], "fd_high": [32.0, 22.0, 24.0]})
    t = report.sweep_table(df)
    assert list(t.columns) == ["sampler", "steps", "NFE", "wall time (s)", "FD", "FD 95% interval"]
    assert t["sampler"].tolist() == ["DDIM", "DDIM", "DPM-Solver++ 2M"] and t["steps"].tolist() == [5, 10, 5]
    assert t["FD 95% interval"].iloc[0] == "[20, 24]"
    varied = report.sweep_table(df.assign(mode=["default", "{'spacing': 'karras'}", "default"]))
    assert "options" in varied.columns and "default" in varied["options"].tolist()


def test_fit_table_wraps_long_columns_and_keeps_labels_on_one_line():
    df = pd.DataFrame({"key": ["ddim"], "diffusers": ["DDIMScheduler (" + "x=1, " * 20 + ")"]})
    html = report.FitTable(df, wrap=("diffusers",))._repr_html_()
    assert "white-space:nowrap" in html and "max-width:22em" in html and "overflow-x:auto" in html
    assert "td:nth-child(2),.companion-table th:nth-child(2){white-space:normal" in html
    assert repr(report.FitTable(df)) == df.to_string(index=False)  # plain text where HTML is not shown


def test_sunburst_labels_are_horizontal_and_readable():
    from companion import taxonomy

    fig = taxonomy.sunburst()
    tr = fig.data[0]
    assert tr.insidetextorientation == "horizontal" and tr.textfont.size >= 12
    assert fig.layout.uniformtext.minsize >= 11 and fig.layout.height >= 700


def test_quality_axis_titles_are_short_enough_to_show_whole():
    y_titles = {k: t for k, t in plots.AXIS_LABELS.items() if k not in ("wall_s", "network_s", "nfe", "flops_per_sample")}
    assert y_titles and all(len(t) <= 34 for t in y_titles.values()), {k: len(t) for k, t in y_titles.items()}


def test_speed_quality_figure_has_no_negative_axis_even_with_one_point():
    df = pd.DataFrame({"sampler": ["ddim"], "steps": [5], "nfe": [5], "wall_s": [0.2], "fd": [3.0], "fd_low": [2.5],
                       "fd_high": [3.5]})
    fig = plots.speed_quality_figure(df, x="wall_s", y="fd", log_x=False)
    assert fig.layout.xaxis.range[0] == 0 and fig.layout.xaxis.range[1] > 0.2
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] > 3.5
    log = plots.speed_quality_figure(df.assign(wall_s=[0.05]), x="wall_s", y="fd")  # a log axis: its decades, around the point
    assert log.layout.xaxis.range[0] < np.log10(0.05) < log.layout.xaxis.range[1]
