"""Panels driven programmatically: set widget values, wait for the run, check what changed."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from diffusers import UNet2DModel

from companion.models import DiffusionModel
from companion.plots import grid_png
from companion.widgets import ForwardPanel, LatestOnlyRunner, SamplerPanel
from panel_helpers import mean_abs  # tiny_model: a fixture in tests/conftest.py


def test_runner_coalesces_a_burst_and_ends_on_the_last_request():
    done, started = [], threading.Event()

    def slow(x):
        started.set()
        time.sleep(0.2)
        return x

    r = LatestOnlyRunner(slow, lambda req, res: done.append(res), lambda req, e: done.append(e))
    r.request(0)
    started.wait(2)
    for i in range(1, 21):
        r.request(i)
    assert r.wait_idle(10)
    assert r.runs <= 2
    assert done[-1] == 20


def test_panel_runs_at_build_and_updates_image_record_and_curve(tiny_model):
    p = SamplerPanel(tiny_model, controls=("sampler", "steps", "seed", "guidance", "class"),
                     defaults={"sampler": "ddim", "steps": 4, "batch": 6}, quality=mean_abs, quality_label="mean |x|")
    assert len(p.history) == 1
    img0, rec0 = p.image.value, p.record.value
    assert img0[:4] == b"\x89PNG" and "NFE" in rec0
    n0 = sum(len(t.x) for t in p.figure.data[1:])
    assert n0 == 1
    p.controls["steps"].value = 8
    assert p.wait(60)
    last = p.history[-1].result.record
    assert last.steps == 8 and last.sampler == "ddim"
    assert last.nfe == 16  # classifier-free guidance: both halves count
    assert p.record.value != rec0
    assert sum(len(t.x) for t in p.figure.data[1:]) == 2
    assert p.figure.data[0].x == (p.history[-1].wall_s,)  # the highlight follows the current configuration
    assert len(p.history[-1].times) == p.repeats  # timed again in the background: the median is shown
    p.controls["seed"].value = 5
    assert p.wait(60)
    assert p.image.value != p.history[-2].result and p.image.value != img0
    p.controls["sampler"].value = "euler"
    assert p.wait(60)
    names = {t.name for t in p.figure.data[1:]}
    assert len(names) == 2  # one series per sampler


def test_a_burst_of_20_changes_triggers_at_most_two_runs_and_ends_on_the_last_value(tiny_model):
    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 4},
                     quality=mean_abs)
    runs_before = p.runs
    for s in range(3, 23):
        p.controls["steps"].value = s
    assert p.wait(60)
    assert p.runs - runs_before <= 2
    assert p.history[-1].result.record.steps == 22


def test_an_error_is_shown_in_the_panel_and_the_next_run_works(tiny_model):
    def picky(model, result):
        if result.record.seed == 13:
            raise RuntimeError("seed 13 is unlucky")
        return 0.0

    p = SamplerPanel(tiny_model, controls=("seed",), defaults={"sampler": "ddim", "steps": 2, "batch": 4}, quality=picky)
    p.controls["seed"].value = 13
    assert p.wait(60)
    assert "seed 13 is unlucky" in p.error.value and "RuntimeError" in p.error.value
    n = len(p.history)
    p.controls["seed"].value = 14
    assert p.wait(60)
    assert p.error.value == ""
    assert len(p.history) == n + 1 and p.history[-1].result.record.seed == 14


def test_eta_is_disabled_for_samplers_without_it_and_spacings_follow_the_sampler(tiny_model):
    p = SamplerPanel(tiny_model, controls=("sampler", "eta", "spacing"), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                     quality=mean_abs)
    assert not p.controls["eta"].disabled
    p.controls["sampler"].value = "euler"
    assert p.wait(60)
    assert p.controls["eta"].disabled
    from companion.samplers import REGISTRY

    assert list(p.controls["spacing"].options) == list(REGISTRY["euler"].spacings)


def test_unconditional_model_disables_guidance(tiny_model):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    p = SamplerPanel(DiffusionModel(unet), controls=("guidance",), defaults={"sampler": "ddim", "steps": 2, "batch": 2}, quality=mean_abs)
    assert p.controls["guidance"].disabled
    assert p.history and p.history[-1].result.record.nfe == 2


def test_mode_toggle_switches_models(tiny_model):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    other = DiffusionModel(unet, name="other")
    p = SamplerPanel({"a": tiny_model, "b": other}, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 2}, quality=mean_abs)
    assert "mode" in p.controls
    p.controls["mode"].value = "b"
    assert p.wait(60)
    assert {t.name for t in p.figure.data[1:]} == {"DDIM [a]", "DDIM [b]"} or len(p.figure.data) == 3


def test_static_representation_has_image_and_figure(tiny_model):
    p = SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 2}, quality=mean_abs)
    bundle = p._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "data:image/png;base64," in bundle["text/html"] and "plotly" in bundle["text/html"]


def test_bad_panel_arguments_are_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown control.*'temperature'.*valid"):
        SamplerPanel(tiny_model, controls=("temperature",), run=False)
    with pytest.raises(ValueError, match="x='time'"):
        SamplerPanel(tiny_model, x="time", run=False)


def test_forward_panel_noises_more_as_t_grows():
    imgs = torch.zeros(3, 1, 8, 8)
    f = ForwardPanel(imgs, t=10)
    small = f.image.value
    f.t.value = 900
    assert f.image.value != small
    assert f.figure.data[-1].x == (900,)


def test_grid_png_shape():
    from io import BytesIO

    from PIL import Image

    im = Image.open(BytesIO(grid_png(torch.zeros(5, 3, 4, 4), nrow=3, scale=2)))
    assert im.size == ((3 * 5 + 1) * 2, (2 * 5 + 1) * 2)


def test_default_quality_is_distance_to_a_converged_solution(tiny_model):
    from companion.reference import ReferenceDistance

    q = ReferenceDistance(reference_steps=40)
    p = SamplerPanel(tiny_model, controls=("sampler", "steps"), defaults={"sampler": "ddim", "steps": 40, "batch": 4,
                     "guidance": 1.5}, quality=q)
    near = p.history[-1].quality
    p.controls["steps"].value = 2
    assert p.wait(60)
    far = p.history[-1].quality
    assert far > near >= 0  # 2 DDIM steps land further from the converged solution than 40 do
    p.controls["sampler"].value = "euler_a"  # stochastic: no ODE reference, no point on the curve
    assert p.wait(60)
    assert p.history[-1].quality is None and "stochastic" in p.record.value


def test_speed_options_are_applied_and_recorded(tiny_model):
    p = SamplerPanel(tiny_model, controls=("speed",), defaults={"sampler": "ddim", "steps": 2, "batch": 2}, quality=mean_abs)
    assert "bf16" in p.controls["speed"].options  # the CPU offers bf16 autocast, not fp16
    assert "fp16" not in p.controls["speed"].options
    fp32 = p.history[-1].result
    p.controls["speed"].value = "bf16"
    assert p.wait(60)
    bf16 = p.history[-1].result
    assert bf16.record.speed["precision"] == "bf16" and fp32.record.speed["precision"] == "fp32"
    assert "bf16" in p.record.value
    rel = float((bf16.samples - fp32.samples).norm() / fp32.samples.norm())
    assert 0 < rel < 0.05  # autocast changes the numbers a little, not the picture
