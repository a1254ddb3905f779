"""ComparePanel driven programmatically: two configurations from the same noise, their difference and both points."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from companion.widgets import ComparePanel, series_points
from panel_helpers import mean_abs  # tiny_model: a fixture in tests/conftest.py


def panel(model, **kw):
    kw.setdefault("a", dict(sampler="ddim", steps=4))
    kw.setdefault("b", dict(sampler="dpmpp_2m", steps=4))
    kw.setdefault("defaults", dict(batch=4))
    kw.setdefault("quality", mean_abs)
    return ComparePanel(model, **kw)


def mark(fig, name):
    return next(t for t in fig.data if t.name == name)


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_both_sides_start_from_the_same_noise_and_show_images_records_and_marks(tiny_model):
    p = panel(tiny_model, controls=("seed", "guidance"), side_controls=("sampler", "steps"))
    cmp = p.history[-1]
    assert torch.equal(cmp.a.result.x_T, cmp.b.result.x_T)  # same seed: identical initial noise
    assert cmp.a.result.record.sampler == "ddim" and cmp.b.result.record.sampler == "dpmpp_2m"
    for s in "AB":
        assert p.images[s].value[:4] == b"\x89PNG" and "NFE" in p.records[s].value
    assert "DDIM" in p.records["A"].value and "DPM-Solver++ 2M" in p.records["B"].value
    # the difference image is |A - B| of the displayed images, and differs from zero for different solvers
    expected = (cmp.a.result.images.clamp(-1, 1) - cmp.b.result.images.clamp(-1, 1)).abs()
    assert torch.equal(cmp.difference, expected) and float(cmp.difference.max()) > 0
    assert "black 0, white" in p.diff_caption.value and p.diff_image.value[:4] == b"\x89PNG"
    # both points on the curve, each highlighted by its labelled mark at its own (wall time, quality)
    assert series_points(p.figure) == 2
    for s, run in (("A", cmp.a), ("B", cmp.b)):
        m = mark(p.figure, s)
        assert m.x == (run.wall_s,) and m.y == (run.quality,) and m.text == (s,)


def test_changing_one_side_reruns_only_that_side(tiny_model):
    p = panel(tiny_model, side_controls=("sampler", "steps"))
    first = p.history[-1]
    img_a, img_b, rec_a, rec_b = p.images["A"].value, p.images["B"].value, p.records["A"].value, p.records["B"].value
    p.side_controls["B"]["steps"].value = 8
    assert p.wait(60)
    cmp = p.history[-1]
    assert cmp.reused == {"A"} and cmp.a is first.a
    assert cmp.b.result.record.steps == 8 and cmp.a.result.record.steps == 4
    assert p.images["A"].value == img_a  # A's images were not sampled again...
    assert len(first.a.times) == 5 and "median of 5" in p.records["A"].value  # ...but A was timed again beside B
    assert p.records["A"].value.split("wall time")[0] == rec_a.split("wall time")[0]
    assert p.images["B"].value != img_b and p.records["B"].value != rec_b and "8 / 8" in p.records["B"].value
    assert series_points(p.figure) == 3  # B's new configuration added one point; A's was already there
    assert mark(p.figure, "B").x == (cmp.b.wall_s,)
    assert mark(p.figure, "A").x == (first.a.wall_s,)  # A's run, timed again beside B's
    assert torch.equal(cmp.difference, (cmp.a.result.images.clamp(-1, 1) - cmp.b.result.images.clamp(-1, 1)).abs())


def test_a_shared_control_reruns_both_sides_from_new_identical_noise(tiny_model):
    p = panel(tiny_model, controls=("seed",))
    before = p.history[-1]
    imgs = {s: p.images[s].value for s in "AB"}
    p.controls["seed"].value = 3
    assert p.wait(60)
    cmp = p.history[-1]
    assert not cmp.reused
    assert cmp.a.result.record.seed == cmp.b.result.record.seed == 3
    assert torch.equal(cmp.a.result.x_T, cmp.b.result.x_T)
    assert not torch.equal(cmp.a.result.x_T, before.a.result.x_T)
    assert all(p.images[s].value != imgs[s] for s in "AB")
    assert series_points(p.figure) == 4


def test_identical_configurations_give_an_exactly_zero_difference(tiny_model):
    same = dict(sampler="dpmpp_2m", steps=5)
    p = panel(tiny_model, a=same, b=same, controls=("seed",), side_controls=("steps",), defaults=dict(batch=6, seed=7))
    cmp = p.history[-1]
    assert cmp.a is not cmp.b  # both sides were sampled, not one reused for the other
    assert torch.equal(cmp.a.result.x_T, cmp.b.result.x_T)
    assert torch.count_nonzero(cmp.difference) == 0
    assert png_pixels(p.diff_image.value).max() == 255  # the grid's white separators...
    assert "identical images" in p.diff_caption.value
    # ...and every image cell black: the difference grid is the grid of a zero batch
    from companion.plots import grid_png

    assert p.diff_image.value == grid_png(torch.full((6, 1, 8, 8), -1.0), scale=p.image_scale)


def test_the_difference_image_follows_its_stated_scale(tiny_model):
    p = panel(tiny_model, diff_scale=0.5)
    d = p.history[-1].difference
    assert "white 0.5 or more (fixed scale)" in p.diff_caption.value
    from companion.plots import grid_png

    assert p.diff_image.value == grid_png((d / 0.5).clamp(0, 1) * 2 - 1, scale=p.image_scale)


def test_a_burst_of_20_changes_triggers_at_most_two_runs_and_ends_on_the_last_value(tiny_model):
    def slow(model, result):  # keeps the worker busy while the burst arrives, as a real model does
        time.sleep(0.05)
        return mean_abs(model, result)

    p = panel(tiny_model, a=dict(sampler="ddim", steps=2), b=dict(sampler="ddim", steps=2), quality=slow)
    runs_before = p.runs
    for s in range(3, 23):
        p.side_controls["B"]["steps"].value = s
    assert p.wait(60)
    assert p.runs - runs_before <= 2
    assert p.history[-1].b.result.record.steps == 22 and p.history[-1].a.result.record.steps == 2
    assert p.side_controls["B"]["steps"].value == 22


def test_an_error_is_shown_in_the_panel_and_the_next_run_works(tiny_model):
    def picky(model, result):
        if result.record.seed == 13:
            raise RuntimeError("seed 13 is unlucky")
        return 0.0

    p = panel(tiny_model, controls=("seed",), quality=picky)
    n, points = len(p.history), series_points(p.figure)
    p.controls["seed"].value = 13
    assert p.wait(60)
    assert "seed 13 is unlucky" in p.error.value and "RuntimeError" in p.error.value
    assert len(p.history) == n + 1  # the images were shown; their quality failed
    assert series_points(p.figure) == points and "failed" in p.records["A"].value  # no point without a quality
    p.controls["seed"].value = 14
    assert p.wait(60)
    assert p.error.value == ""
    assert len(p.history) == n + 2 and p.history[-1].a.result.record.seed == 14 == p.history[-1].b.result.record.seed


def test_a_sampler_error_on_one_side_is_shown_in_plain_words(tiny_model):
    p = panel(tiny_model, side_controls=("sampler", "steps", "spacing"))
    p.side_controls["B"]["steps"].value = 1  # PLMS needs more steps than one: refused by sample()
    p.side_controls["B"]["sampler"].value = "pndm"
    assert p.wait(60)
    assert "This run failed" in p.error.value and "pndm" in p.error.value.lower()
    p.side_controls["B"]["steps"].value = 6
    assert p.wait(60)
    assert p.error.value == "" and p.history[-1].b.result.record.sampler == "pndm"


def test_controls_the_sampler_cannot_use_are_disabled_per_side(tiny_model):
    p = panel(tiny_model, side_controls=("sampler", "eta"), a=dict(sampler="ddim", steps=2), b=dict(sampler="euler", steps=2))
    assert not p.side_controls["A"]["eta"].disabled and p.side_controls["B"]["eta"].disabled


def test_static_representation_has_both_images_the_difference_and_the_figure(tiny_model):
    p = panel(tiny_model)
    bundle = p._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    html = bundle["text/html"]
    assert html.count("<img src='data:image/png;base64,") == 3 and "plotly" in html and "|A − B|" in html
    assert "DDIM" in html and "DPM-Solver++ 2M" in html


def test_bad_arguments_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"\['seed'\] cannot differ between A and B"):
        ComparePanel(tiny_model, side_controls=("sampler", "seed"), run=False)
    with pytest.raises(ValueError, match=r"b= sets \['batch'\].*defaults="):
        ComparePanel(tiny_model, b=dict(batch=4), run=False)
    with pytest.raises(ValueError, match=r"\['steps'\] are in both"):
        ComparePanel(tiny_model, controls=("steps",), side_controls=("steps",), run=False)
    with pytest.raises(ValueError, match=r"unknown control.*'temperature'.*valid"):
        ComparePanel(tiny_model, side_controls=("temperature",), run=False)
    with pytest.raises(ValueError, match=r"diff_scale=0"):
        ComparePanel(tiny_model, diff_scale=0, run=False)
