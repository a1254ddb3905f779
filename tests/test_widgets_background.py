"""Panels show images first and measure afterwards: quality (with its reference solution) and further timed runs
arrive from the background, which yields to the next images; timing excludes warm-up; the curve, its axes, the
image sizes and the tables read cleanly."""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from companion import widgets
from companion.models import DiffusionModel
from companion.plots import grid_png, png_size
from companion.reference import ReferenceSolutions
from companion.widgets import (BACKGROUND, GATE, ComparePanel, ImageDistance, SamplerPanel, series_points,
                               yielding)
from panel_helpers import SlowReferences, mean_abs  # tiny_model: a fixture in tests/conftest.py


def series_traces(fig):
    return [t for t in fig.data if t.hovertemplate and t.x]


# ------------------------------------------------------------------------------------------ background


def test_images_come_first_and_the_quality_arrives_later_without_blocking_the_controls(tiny_model):
    refs = SlowReferences()  # open while the panel is built: the first run is complete when the constructor returns
    p = SamplerPanel(tiny_model, controls=("steps", "seed"), defaults={"sampler": "ddim", "steps": 4, "batch": 4},
                     quality=ImageDistance(reference_steps=8, cache=refs), x="nfe")
    first = p.history[-1]
    assert first.measured and first.quality is not None and series_points(p.figure) == 1
    refs.gate.clear()  # from now on every reference takes until the test says so

    p.controls["seed"].value = 1  # a new seed needs a new reference
    assert p._runner.wait_idle(60)  # the images are there...
    assert refs.waiting.wait(60)  # ...while the reference is still being computed in the background
    run1 = p.history[-1]
    assert run1.result.record.seed == 1 and p.image.value == grid_png(run1.result.images, scale=p.image_scale)
    assert not run1.quality_done and "measuring" in p.record.value and "measuring" in p.status.value
    assert series_points(p.figure) == 1 and p.figure.data[0].x == ()  # no point yet; the ring waits for it too

    p.controls["steps"].value = 6  # the controls still work while that reference is pending
    assert p._runner.wait_idle(60)
    run2 = p.history[-1]
    assert run2.result.record.steps == 6 and run2.result.record.seed == 1
    assert p.image.value == grid_png(run2.result.images, scale=p.image_scale)
    assert not p.wait(0.2)  # wait() waits for the background work too

    refs.gate.set()
    assert p.wait(60)
    assert run1.quality_done and run2.quality_done and run1.quality > 0 and run2.quality > 0
    assert series_points(p.figure) == 3 and p.status.value == ""
    assert p.figure.data[0].x == (float(run2.result.record.nfe),) and p.figure.data[0].y == (run2.quality,)
    assert refs.computed == 2  # one reference per initial noise: steps 4 -> 6 reused seed 1's


def test_references_are_shared_across_panels(tiny_model):
    refs = ReferenceSolutions()
    q = dict(defaults={"sampler": "ddim", "steps": 3, "batch": 4, "guidance": 1.5}, x="nfe")
    a = SamplerPanel(tiny_model, controls=("steps",), quality=ImageDistance(reference_steps=8, cache=refs), **q)
    b = ComparePanel(tiny_model, a=dict(sampler="ddim", steps=3), b=dict(sampler="euler", steps=5),
                     defaults=dict(batch=4, guidance=1.5), quality=ImageDistance(reference_steps=8, cache=refs), x="nfe")
    assert refs.computed == 1  # the same noise, labels and guidance: one reference for both panels and all three runs
    assert b.history[-1].a.quality == pytest.approx(a.history[-1].quality)


def test_background_network_calls_yield_to_a_foreground_run(tiny_model):
    yielding(tiny_model)
    calls, stop, owner = [], threading.Event(), type("Owner", (), {})()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])

    def job(_):
        while not stop.is_set():
            with torch.no_grad():
                tiny_model.predict_noise(x, t, class_labels=torch.tensor([0, 1]))
            calls.append(1)

    BACKGROUND.submit(owner, job)
    deadline = time.monotonic() + 30
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 3
    yields = GATE.yields
    with GATE.foreground():
        time.sleep(0.05)  # a call that had started may finish
        held = len(calls)
        time.sleep(0.3)
        assert len(calls) == held  # paused at its next network call while the foreground run is in flight
        assert GATE.yields > yields
    deadline = time.monotonic() + 30
    while len(calls) == held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) > held  # and resumed afterwards
    stop.set()
    assert BACKGROUND.wait_idle(owner, 30)
    # the hook does nothing outside background work: the kernel thread calls the network during a foreground run
    with GATE.foreground():
        with torch.no_grad():
            tiny_model.predict_noise(x, t, class_labels=torch.tensor([0, 1]))


def test_a_closed_panel_drops_its_queued_measurements(tiny_model):
    refs = SlowReferences()
    p = SamplerPanel(tiny_model, controls=("seed",), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                     quality=ImageDistance(reference_steps=4, cache=refs))
    refs.gate.clear()
    p.controls["seed"].value = 1
    assert refs.waiting.wait(60)
    p.controls["seed"].value = 2
    assert p._runner.wait_idle(60)
    p.close()
    refs.gate.set()
    assert BACKGROUND.wait_idle(p, 60)
    assert not p.history[-1].quality_done  # seed 2's measurement was dropped with the panel


# ------------------------------------------------------------------------------------------ fair timing


def test_warm_up_precedes_the_first_timed_run_of_a_sampler_and_batch_shape(tiny_model):
    p = SamplerPanel(tiny_model, controls=("sampler", "steps"), defaults={"sampler": "ddim", "steps": 4, "batch": 4},
                     quality=mean_abs)
    assert p.setup.warmups == 1
    p.controls["steps"].value = 5  # same sampler and batch shape: no new warm-up
    assert p.wait(60)
    assert p.setup.warmups == 1
    p.controls["sampler"].value = "euler"
    assert p.wait(60)
    assert p.setup.warmups == 2
    for run in p.history:
        assert len(run.times) == p.repeats and run.wall_s == sorted(run.times)[1]  # the median of three
    assert re.search(r"median of 3, \d+–\d+\)", p.record.value)


def test_compare_panel_times_a_and_b_interleaved(tiny_model, monkeypatch):
    order = []
    real = widgets.SamplingSetup.time_again

    def spy(self, run):
        order.append(run.params["sampler"])
        return real(self, run)

    monkeypatch.setattr(widgets.SamplingSetup, "time_again", spy)
    p = ComparePanel(tiny_model, a=dict(sampler="ddim", steps=3), b=dict(sampler="euler", steps=3),
                     defaults=dict(batch=4), quality=mean_abs, repeats=3)
    assert order == ["ddim", "euler", "ddim", "euler"]
    cmp = p.history[-1]
    assert len(cmp.a.times) == len(cmp.b.times) == 3
    for side in "AB":
        assert "median of 3" in p.records[side].value
    assert "interleaved" in p.caption.value and "warm-up" in p.caption.value


# ------------------------------------------------------------------------------------------ the curve


def test_curve_lines_are_sorted_by_x_and_the_axes_start_at_zero(tiny_model):
    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 8, "batch": 2},
                     quality=mean_abs, x="nfe")
    one = series_traces(p.figure)[0]
    assert p.figure.layout.xaxis.range[0] == 0 and p.figure.layout.xaxis.range[1] > one.x[0]
    assert p.figure.layout.yaxis.range[0] == 0 and p.figure.layout.yaxis.range[1] > one.y[0]
    for steps in (2, 5, 3):
        p.controls["steps"].value = steps
        assert p.wait(60)
    (trace,) = series_traces(p.figure)
    assert list(trace.x) == [2.0, 3.0, 5.0, 8.0]  # sorted by x, not in run order
    p.set_x("wall_s")
    (trace,) = series_traces(p.figure)
    assert list(trace.x) == sorted(trace.x) and all(x > 0 for x in trace.x)
    assert p.figure.layout.xaxis.title.text == "wall time per run (s)"
    assert p.figure.layout.xaxis.range[0] == 0 and p.x_control.value == "wall_s"
    assert trace.error_x.array is not None  # the range of the timed runs
    p.x_control.value = "nfe"
    (trace,) = series_traces(p.figure)
    assert list(trace.x) == [2.0, 3.0, 5.0, 8.0] and p.figure.layout.xaxis.title.text == "NFE per sample"


def test_going_back_to_a_configuration_pools_its_timings_into_one_point(tiny_model):
    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 4, "batch": 2},
                     quality=mean_abs)
    for steps in (5, 4):
        p.controls["steps"].value = steps
        assert p.wait(60)
    (trace,) = series_traces(p.figure)
    assert len(trace.x) == 2  # steps 4 (run twice) and steps 5
    first, again = p.history[0], p.history[2]
    pooled = sorted(first.times + again.times)
    x4 = trace.x[list(trace.text).index(next(t for t in trace.text if "steps 4" in t))]
    assert x4 == pytest.approx((pooled[2] + pooled[3]) / 2)  # the median of all six timed runs
    assert p.figure.data[0].x == (x4,)  # the ring sits on that pooled point


def test_one_line_per_sampler_and_setting_one_legend_entry_per_sampler(tiny_model):
    p = SamplerPanel(tiny_model, controls=("sampler", "steps", "seed"), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                     quality=mean_abs, x="nfe")
    for name, value in (("steps", 4), ("seed", 1), ("steps", 3), ("sampler", "euler")):
        p.controls[name].value = value
        assert p.wait(60)
    traces = series_traces(p.figure)
    assert sorted((t.name, len(t.x)) for t in traces) == [("DDIM", 2), ("DDIM", 2), ("Euler", 1)]
    assert sum(bool(t.showlegend) for t in traces) == 2
    ddim = [t for t in traces if t.name == "DDIM"]
    assert ddim[0].marker.color == ddim[1].marker.color and ddim[0].line.dash != ddim[1].line.dash
    euler = next(t for t in traces if t.name == "Euler")
    assert euler.marker.color != ddim[0].marker.color and euler.marker.symbol != ddim[0].marker.symbol


def test_no_negative_axis_before_any_point(tiny_model):
    p = SamplerPanel(tiny_model, controls=("sampler",), defaults={"sampler": "euler_a", "steps": 2, "batch": 2})
    assert series_points(p.figure) == 0  # a stochastic sampler has no ODE reference
    assert p.figure.layout.xaxis.range[0] >= 0 and p.figure.layout.yaxis.range[0] >= 0
    html = p.static_html()  # the static figure too: no axis below 0 (an empty plotly figure spans -0.5 .. 1 by itself)
    assert '"xaxis":{"range":[0,1]' in html and '"yaxis":{"range":[0,1]' in html


# ------------------------------------------------------------------------------------------ one quality space


def _latent_model():
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=1, norm_num_groups=4, sample_size=8).eval()
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return DiffusionModel(unet, name="tiny-latent", vae=vae, image_shape=(1, 8, 8))


def test_latent_and_pixel_runs_are_measured_in_image_space():
    latent = _latent_model()
    assert latent.is_latent
    refs = ReferenceSolutions()
    q = ImageDistance(reference_steps=6, cache=refs)
    p = SamplerPanel({"latent": latent}, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 3},
                     quality=q, x="nfe")
    run = p.history[-1]
    assert run.result.images.shape[1:] == (1, 8, 8) and run.result.samples.shape[1:] == (1, 4, 4)
    ref_latent = refs.get(latent, run.result.x_T, method="sampler", sampler="unipc", steps=6)
    expected = (run.result.images.clamp(-1, 1) - latent.decode(ref_latent).clamp(-1, 1)).pow(2).mean().sqrt()
    assert run.quality == pytest.approx(float(expected), rel=1e-5)
    assert "image space" in q.label and "decoded" in p.caption.value
    assert p.figure.layout.yaxis.title.text == "distance to converged (RMS)"


def test_a_reference_distance_given_by_a_chapter_is_measured_in_image_space(tiny_model):
    from companion.reference import ReferenceDistance

    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                     quality=ReferenceDistance(teacher=tiny_model, reference_steps=4), run=False)
    assert isinstance(p.quality, ImageDistance) and p.quality.teacher is tiny_model
    assert "teacher" in p.quality_label and "image space" in p.quality_label


# ------------------------------------------------------------------------------------------ images and tables


def _img_sizes(html: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"<img [^>]*width='(\d+)' height='(\d+)'", html)]


def test_compare_images_share_one_integer_scale_and_size(tiny_model):
    p = ComparePanel(tiny_model, a=dict(sampler="ddim", steps=2), b=dict(sampler="euler", steps=2),
                     defaults=dict(batch=8), quality=mean_abs)
    sizes = [png_size(p.images["A"].value), png_size(p.images["B"].value), png_size(p.diff_image.value)]
    assert len(set(sizes)) == 1
    width, height = sizes[0]
    grid_w, grid_h = 3 * (8 + 1) + 1, 3 * (8 + 1) + 1  # 8 images of 8x8 pixels, 3 a row, 1-pixel padding
    assert p.image_scale >= 2 and (width, height) == (p.image_scale * grid_w, p.image_scale * grid_h)
    for image in (p.images["A"], p.images["B"], p.diff_image):
        assert (image.width, image.height) == (str(width), str(height))  # shown at its own size: no browser scaling
        assert image.layout.width == f"{width}px" and "companion-pixelated" in image._dom_classes
    assert "image-rendering:pixelated" in p.widget.children[0].value
    html = p.static_html()
    assert _img_sizes(html) == [(width, height)] * 3 and html.count("image-rendering:pixelated") == 3


def test_record_table_labels_do_not_wrap(tiny_model):
    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 2}, quality=mean_abs)
    labels = re.findall(r"<td style='([^']*)'>([^<]*)</td>", p.record.value)
    assert labels and all("white-space:nowrap" in style for style, _ in labels)


def test_sweep_view_shows_human_columns_no_ring_and_light_error_bars(tmp_path):
    from companion import oracle
    from companion.widgets import SweepView

    view = SweepView(oracle.toy_mixture(), ["ddim", "heun"], [4, 2], n_samples=4, n_ode=4, metrics=("ode_distance",),
                     cache_dir=tmp_path)
    assert view.wait(60)
    table = view.table.value
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers[:4] == ["sampler", "steps", "NFE", "wall time (s)"] and "distance to ODE solution" in headers
    for raw in ("wall_s", "guidance", "mode", "ode_distance", "None", "default"):
        assert raw not in table, raw
    assert not [t for t in view.figure.data if not t.hovertemplate]  # no highlight ring in a sweep
    for t in series_traces(view.figure):
        assert list(t.x) == sorted(t.x)
        assert t.error_y.thickness == 1 and t.error_y.color.startswith("rgba(") and t.error_y.color.endswith(",0.35)")
    assert view.figure.layout.yaxis.range[0] == 0
