"""Training in seconds (companion.quicktrain) and its panel: targets and weights as the papers define them, a run
that learns, x0-predicting models converted exactly, bad configurations refused by name."""
from __future__ import annotations

import math

import pytest
import torch

from companion import quicktrain as Q
from companion import schedules
from companion.models import DiffusionModel
from companion.schedules import TRAIN_SCHEDULE

ABAR = schedules.alphas_cumprod(TRAIN_SCHEDULE).float()


def _x0_weight(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """How the plain MSE of each target weighs the error expressed in x0 (eps: SNR, x0: 1, v: SNR + 1)."""
    return {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}[prediction]


@pytest.mark.parametrize("prediction", schedules.PARAMETERISATIONS)
def test_min_snr_weight_makes_the_x0_weight_min_snr_gamma_for_every_target(prediction):
    snr = torch.tensor([1e-4, 0.5, 5.0, 20.0, 1e4])
    w = Q.loss_weight(snr, prediction, "min_snr", 5.0)
    assert torch.allclose(w * _x0_weight(prediction, snr), snr.clamp(max=5.0), rtol=1e-6)
    assert torch.equal(Q.loss_weight(snr, prediction, "uniform"), torch.ones_like(snr))
    assert float(Q.loss_weight(torch.tensor(20.0), "epsilon", "min_snr", 5.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("prediction", schedules.PARAMETERISATIONS)
def test_training_targets_agree_with_the_parameterisation_conversions(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    abar = ABAR[torch.tensor([0, 250, 600, 999])].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = Q.training_target(prediction, x0, eps, abar)
    assert torch.allclose(schedules.convert(target, x_t, abar, prediction, "epsilon"), eps, atol=2e-3)


class _Oracle(torch.nn.Module):
    """Outputs a fixed parameterisation of known (x0, eps): what a perfect network of that kind would say."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction = x0, prediction
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, class_labels=None):
        abar = ABAR[t].view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return Q.training_target(self.prediction, self.x0, eps, abar)


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_a_model_predicting_x0_or_v_gives_samplers_the_noise(prediction):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900])
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    model = DiffusionModel(_Oracle(x0, prediction), TRAIN_SCHEDULE, sample_shape=(1, 8, 8), prediction=prediction)
    assert torch.allclose(model.predict_noise(x_t, t), eps, atol=1e-4)


def test_unknown_prediction_is_refused_naming_the_valid_ones():
    with pytest.raises(Exception, match="x0.*valid: epsilon, sample, v_prediction"):
        DiffusionModel(_Oracle(torch.zeros(1, 1, 8, 8), "sample"), TRAIN_SCHEDULE, sample_shape=(1, 8, 8), prediction="x0")


@pytest.mark.parametrize("field, value, match", [
    ("prediction", "x0", "prediction='x0' is not valid; choose one of epsilon, sample, v_prediction"),
    ("weighting", "snr", "weighting='snr' is not valid; choose one of uniform, min_snr"),
    ("steps", 0, "steps must be a positive int, got 0"),
    ("steps", 2.5, "steps must be a positive int, got 2.5"),
    ("batch", True, "batch must be a positive int, got True"),
    ("lr", 0.0, r"lr must lie in \(0, 1\), got 0.0"),
    ("ema", 1.0, r"ema must lie in \[0, 1\), got 1.0"),
    ("gamma", -1.0, "gamma must be > 0, got -1.0"),
])
def test_bad_configs_are_refused_with_the_value_and_the_choices(field, value, match):
    with pytest.raises(ValueError, match=match):
        Q.TrainConfig(**{field: value})


def test_a_short_run_learns_and_is_deterministic():
    cfg = Q.TrainConfig(steps=300, batch=64, width=64, blocks=2)
    seen = []
    run = Q.train(cfg, callback=lambda r: seen.append(r.steps_done), every=100)
    assert seen == [100, 200, 300] and run.steps_done == 300 and run.seconds > 0
    first, last = sum(run.losses[:20]) / 20, sum(run.losses[-50:]) / 50
    assert last < 0.5 * first, (first, last)
    again = Q.train(cfg)
    assert again.losses == run.losses
    for a, b in zip(run.ema.parameters(), again.ema.parameters()):
        assert torch.equal(a, b)
    # the EMA copy trails the raw weights: different, but not by more than the raw weights moved
    moved = sum((p - q).abs().sum() for p, q in zip(run.net.parameters(), Q.TinyDenoiser(64, 2).parameters()))
    gap = sum((p - q).abs().sum() for p, q in zip(run.net.parameters(), run.ema.parameters()))
    assert 0 < gap < moved


def test_samples_are_judged_at_16_pixels_in_the_feature_space_like_every_digits_model():
    run = Q.train(Q.TrainConfig(steps=50, batch=32, width=32, blocks=1))
    images, labels = Q.draw(run.model(), 130, steps=4)
    assert images.shape == (130, 1, 8, 8) and labels.tolist() == list(range(10)) * 13
    scores = Q.judge(images, labels)
    assert scores["fd"].feature == scores["class_accuracy"].feature == "features-digits"
    assert scores["fd"].n == 130
    assert Q.upsample(images).shape == (130, 1, 16, 16)
    with pytest.raises(ValueError, match="expected 8x8 images, got \\(16, 16\\)"):
        Q.upsample(torch.zeros(1, 1, 16, 16))


def test_real_digits_upsampled_are_exactly_the_16_pixel_data_set():
    from companion import data

    x8, _ = data.digits(8, "test")
    x16, _ = data.digits(16, "test")
    assert torch.allclose(Q.upsample(x8), x16, atol=1e-6)
    real = Q.judge_real(200)
    assert real["class_accuracy"].n == 200 and real["class_accuracy"].value > 0.9
    with pytest.raises(ValueError, match="n=1000 is more than the 359 held-out digits"):
        Q.judge_real(1000)


def test_variants_differ_in_one_field_and_refuse_unknown_fields():
    base = Q.TrainConfig(steps=10)
    vs = Q.variants(base, prediction=schedules.PARAMETERISATIONS)
    assert [v.prediction for v in vs] == list(schedules.PARAMETERISATIONS) and all(v.steps == 10 for v in vs)
    with pytest.raises(ValueError, match="'decay' is not a TrainConfig field"):
        Q.variants(base, decay=[0.9])
    assert Q.TrainConfig(prediction="v_prediction", weighting="min_snr").label() == "v, min-SNR-5"


def test_training_view_draws_each_look_and_trains_from_its_controls():
    from companion.widgets import TrainingView

    view = TrainingView([Q.TrainConfig(steps=40, batch=16, width=16, blocks=1)], every=20, preview_n=20, preview_steps=3)
    runs = view.run()
    assert len(runs) == 1 and [p["step"] for p in view.points] == [20, 40]
    assert [t.name for t in view.figure.data] == ["eps"] and len(view.figure.data[0].x) == 2
    assert view.image.value[:4] == b"\x89PNG" and "<img" in view.static_html()
    form = TrainingView(controls=True, every=10, preview_n=20, preview_steps=3)
    form.controls["prediction"].value = "sample"
    form.controls["steps"].value = 250
    cfg = form.chosen()
    assert (cfg.prediction, cfg.steps) == ("sample", 250)
    form.train_one(Q.TrainConfig(steps=20, batch=16, width=16, blocks=1, prediction="sample"))
    assert len(form.runs) == 1 and not form.train_button.disabled
    assert form.figure.data[0].name.startswith("1. x0")
    with pytest.raises(TypeError, match="configs must be a TrainConfig"):
        TrainingView([])
    with pytest.raises(ValueError, match="every must be a positive int"):
        TrainingView(controls=True, every=0)
    assert math.isfinite(view.points[-1]["class_accuracy"])


def test_by_class_orders_a_grid_one_class_per_column():
    labels = torch.tensor([3, 1, 0, 2, 1, 0, 3, 2] + list(range(4, 10)) * 2)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    grid = Q.by_class(images, labels)
    assert grid[:, 0, 0, 0].tolist() == list(range(10)) * 2
    with pytest.raises(ValueError, match="class 0 has 2 image"):
        Q.by_class(images, labels, per_class=3)
