"""Rectified flow (companion.flows, companion.models.FlowModel): the exact velocity of the Gaussian-mixture oracle,
flow samplers' measured orders on it, straightness of exact and sampled trajectories, the flow recipe, the bundled
flow model's health, and the refusals between flow and diffusion samplers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from companion import assets, flows, quality, recipes
from companion import oracle as O
from companion import samplers as S
from companion.errors import SamplerError, SamplingError
from companion.models import FLOW_SCHEDULE, FlowModel, load
from companion.pipelines import FLOW_EQUIVALENTS, flow_samplers
from companion.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 shared cores


@pytest.fixture(scope="module")
def mixture():
    return O.toy_mixture((1, 4, 4))


# --------------------------------------------------------------------------------------------- the exact field

@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_flow_velocity_is_the_vp_oracles_posterior_mean_on_the_linear_path(mixture, t):
    """x_t = (1 - t) x0 + t noise is the VE state x0 + sigma noise scaled by 1 / (1 + sigma), sigma = t / (1 - t):
    so v = (x - E[x0 | x]) / t with the posterior mean of the (independently written) VP oracle."""
    x = torch.randn((16, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = flows.flow_velocity(mixture, x, t)
    x0 = mixture.posterior_mean(x / math.sqrt((1 - t) ** 2 + t**2), t / (1 - t))
    torch.testing.assert_close(v, (x - x0) / t, rtol=1e-10, atol=1e-10)


def test_flow_velocity_is_exact_at_both_ends(mixture):
    x = torch.randn((8, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # t = 1: x is pure noise, E[x0 | x] is the mixture's mean; t = 0: x is the data point itself
    mean = (mixture.log_weights.exp()[:, None] * mixture.means).sum(0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(flows.flow_velocity(mixture, x, 1.0), x - mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flows.flow_velocity(mixture, x, 0.0), -x, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(flows.vp_velocity(mixture, x, 0.0)).all() and torch.isfinite(flows.vp_velocity(mixture, x, 1.0)).all()


def test_vp_velocity_matches_finite_differences_of_its_own_path(mixture):
    """dx/dt of the VP flow is the derivative of alpha(t) x0 + s(t) noise in expectation: for a point mass the
    posterior is certain, so the field must equal the path's derivative exactly (checked by central differences)."""
    point = O.GaussianMixtureOracle(mixture.means[:1].reshape(1, 1, 4, 4), stds=0.0)
    z = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu = point.means.reshape(1, 1, 4, 4)
    t, h = 0.4, 1e-6

    def path(t):
        a = flows.vp_alpha(t)
        return a * mu + (1 - a**2).sqrt() * z

    fd = (path(t + h) - path(t - h)) / (2 * h)
    torch.testing.assert_close(flows.vp_velocity(point, path(t), t), fd, rtol=1e-6, atol=1e-6)


def test_flow_oracle_drives_the_flow_samplers_and_refuses_diffusion_ones(mixture):
    oracle = flows.FlowOracle(mixture)
    res = sample(oracle, "euler", 16, batch=8, seed=0)
    assert res.record.scheduler_class == "FlowMatchEulerDiscreteScheduler" and res.record.nfe == 16
    x, t_end = flows.flow_run(oracle, "euler", 16, res.x_T)
    assert t_end == 0.0
    torch.testing.assert_close(res.samples.double(), x, rtol=0, atol=1e-6)
    with pytest.raises(SamplerError, match="'ddim'.*Samplers that fit: euler, heun"):
        sample(oracle, "ddim", 8, batch=2)


def test_flow_run_refuses_a_diffusion_model(mixture):
    with pytest.raises(SamplingError, match="is a diffusion model.*convergence_order"):
        flows.flow_run(mixture, "euler", 8, torch.zeros(2, 1, 4, 4))


# --------------------------------------------------------------------------------------------- orders

@pytest.fixture(scope="module")
def flow_errors(mixture):
    return flows.flow_orders(("euler", "heun"), flows.FlowOracle(mixture), batch=32)


def test_flow_euler_is_first_order_and_heun_second_order_on_the_exact_field(flow_errors):
    table = flows.flow_order_table(flow_errors)
    assert table.loc["euler", "measured order"] == pytest.approx(1.0, abs=0.3)
    assert table.loc["heun", "measured order"] == pytest.approx(2.0, abs=0.3)
    assert set(table["verdict"]) == {"as designed"}
    # the errors are the scheduler's, not rounding: they fall with every doubling of the steps
    for _, g in flow_errors.groupby("sampler"):
        assert (g["error"].diff().dropna() < 0).all()


def test_the_order_verdict_can_fail():
    """The same table judges a made-up first-order Heun as LOWER than designed (the test above can fail)."""
    import pandas as pd

    fake = pd.DataFrame({"sampler": "heun", "name": "x", "steps": [8, 16, 32], "error": [0.1, 0.05, 0.025]})
    assert flows.flow_order_table(fake).loc["heun", "verdict"] == "LOWER than designed"


# --------------------------------------------------------------------------------------------- straightness

def test_straightness_is_zero_for_a_straight_constant_speed_path_and_known_for_a_bent_one():
    t = torch.linspace(1, 0, 101, dtype=torch.float64)
    a, b = torch.tensor([3.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    line = (b + t[:, None] * (a - b))[:, None, :]  # x(1) = a, x(0) = b
    r = flows.straightness(t, line)
    assert r["straightness"] == pytest.approx(0, abs=1e-20) and r["excess_length"] == pytest.approx(0, abs=1e-12)
    assert r["turning_deg"] == pytest.approx(0, abs=1e-4)
    # an L-shaped path: first along e1 for t in [1, 1/2] at speed 2, then along e2: v = (2, 0) or (0, 2), chord (1, 1)
    corner = torch.where(t[:, None] >= 0.5, torch.stack([2 * t - 1, torch.ones_like(t)], 1),
                         torch.stack([torch.zeros_like(t), 2 * t], 1))[:, None, :]
    r = flows.straightness(t, corner)
    assert r["straightness"] == pytest.approx(2.0 / 2, rel=1e-9)  # |(1,1) - (2,0)|^2 = 2 everywhere, per dimension 1
    # all of it is bending: v's part along the chord, (1, 1), is the chord itself (the speed along it is even)
    assert r["straightness_bend"] == pytest.approx(1.0, rel=1e-9) and r["straightness_speed"] == pytest.approx(0, abs=1e-9)
    assert r["excess_length"] == pytest.approx(2 / math.sqrt(2) - 1, rel=1e-9)
    assert r["turning_deg"] == pytest.approx(90.0, rel=1e-6)


def test_exact_rectified_flow_is_straighter_than_the_vp_probability_flow_ode(mixture):
    """Measured on the same noise and clock: the VP ODE's S is several times the rectified flow's, and almost all of
    it is uneven speed (its clock), not bending; the exact node velocities and the trajectories' finite differences
    agree, so S is a property of the paths, not of how it is computed."""
    table = flows.exact_straightness(mixture, batch=64, nodes=129)
    rf, vp = table.loc[flows.FIELDS[0]], table.loc[flows.FIELDS[1]]
    assert vp["straightness"] > 3 * rf["straightness"]
    assert vp["straightness_speed"] > 0.8 * vp["straightness"]
    assert vp["straightness_bend"] < 1.5 * rf["straightness_bend"]
    x1 = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times, xs, vs = flows.exact_trajectories(mixture, flows.FIELDS[0], x1, nodes=257)
    exact, fd = flows.straightness(times, xs, vs), flows.straightness(times, xs)
    assert fd["straightness"] == pytest.approx(exact["straightness"], rel=0.02)


def test_diffusion_ode_and_rectified_flow_land_on_the_same_samples(mixture):
    """The explanation of the gap: the two exact ODEs are one transport seen through another clock and zoom."""
    assert flows.diffusion_as_flow_gap(mixture, batch=8) < 1e-7


# --------------------------------------------------------------------------------------------- the model family

def test_flow_recipe_matches_digits_cond_budget():
    flow, base = recipes.recipe("digits-flow"), recipes.recipe("digits-cond")
    assert flow.steps == base.steps and flow.seed == base.seed
    assert {k: v for k, v in flow.config.items() if k != "weights_dtype"} == base.config


def test_flow_recipe_trains_saves_and_loads_a_flow_model(tmp_path):
    tiny = dict(batch=4, limit=32)
    out = recipes.run_recipe("digits-flow", steps=2, out=tmp_path / "digits-flow", config=tiny, measure=False,
                             progress=False, threads=1)
    m = load(out)
    assert isinstance(m, FlowModel) and m.kind == "flow" and m.prediction == "flow"
    assert m.scheduler_config == FLOW_SCHEDULE and m.card["kind"] == "flow"
    assert assets.read_card(out)["weights_dtype"] == "float16"
    labels = torch.arange(4)
    for key in ("euler", "heun", "dpmpp_2m"):
        res = sample(m, key, 3, batch=4, class_labels=labels, guidance=2.0)
        assert torch.isfinite(res.images).all()
    with pytest.raises(SamplerError, match="'lms'.*flow-matching model.*Samplers that fit"):
        sample(m, "lms", 4, batch=2)


def test_registry_names_the_flow_schedulers_it_runs():
    assert {k: s.flow_scheduler for k, s in S.REGISTRY.items() if s.flow_scheduler} == FLOW_EQUIVALENTS
    g = S.glossary().set_index("key")
    assert "FlowMatchEulerDiscreteScheduler" in g.loc["euler", "flow-matching form"]
    assert "FlowMatchHeunDiscreteScheduler" in g.loc["heun", "flow-matching form"]
    assert set(FLOW_EQUIVALENTS) <= set(flow_samplers())


BUNDLED = (assets.models_dir() / "digits-flow" / assets.CARD).is_file()


@pytest.mark.skipif(not BUNDLED, reason="digits-flow is not bundled yet: companion train digits-flow --install")
def test_bundled_flow_model_samples_the_requested_digits_in_range(no_unpickling):
    """As the students are checked: 20 guided FlowMatch Euler samples in range, and the held-out judge (logistic
    regression on 8x8-pooled train digits) reads >= 80 % as the requested class; the card records the same judge."""
    m = load("digits-flow")
    card = assets.verify(assets.models_dir() / "digits-flow")
    assert card["training_steps"] == recipes.recipe("digits-flow").steps
    assert card["quality"]["cfg_accuracy_g2"] >= 0.8
    labels = torch.arange(20) % 10
    imgs = sample(m, "euler", 20, batch=20, class_labels=labels, guidance=2.0, seed=0).images
    assert torch.isfinite(imgs).all() and float((imgs.abs() <= 1.05).float().mean()) > 0.95
    clf, _ = quality.digits_reference_classifier()
    pred = torch.from_numpy(clf.predict(F.avg_pool2d(imgs.clamp(-1, 1), 2).flatten(1).numpy()))
    assert float((pred == labels).float().mean()) >= 0.8
    with pytest.raises(SamplerError, match="Samplers that fit: euler, heun"):
        sample(m, "ddim", 10, batch=2, class_labels=torch.arange(2))


def test_sampler_panel_toggles_between_a_diffusion_and_a_flow_model(tiny_model, tiny_unet):
    """One panel, a model choice: switching to the flow model offers only flow samplers (an unfit choice moves to
    Euler, which runs diffusers' FlowMatch Euler there) and switching back restores every sampler."""
    from companion.widgets import SamplerPanel

    flow = FlowModel(tiny_unet(num_class_embeds=4), name="tiny-flow", num_classes=3)
    panel = SamplerPanel({"diffusion": tiny_model, "flow": flow}, controls=("sampler", "steps"),
                         defaults={"sampler": "ddim", "steps": 2, "batch": 2}, run=False, repeats=1)
    try:
        sampler = panel.controls["sampler"]
        n_all = len(sampler.options)
        panel.controls["mode"].value = "flow"
        panel.wait()
        assert sampler.value == "euler" and {o[1] for o in sampler.options} == set(flow_samplers())
        assert panel.history[-1].result.record.scheduler_class == "FlowMatchEulerDiscreteScheduler"
        panel.controls["mode"].value = "diffusion"
        panel.wait()
        assert len(sampler.options) == n_all and sampler.value == "euler"
    finally:
        panel.close()


def test_equal_nfe_runs_use_each_models_own_first_order_solver():
    from companion import load

    flow, diffusion = load("digits-flow"), load("digits-cond")
    assert flows.first_order_sampling(flow) == {"sampler": "euler"}
    assert flows.first_order_sampling(diffusion) == {"sampler": "ddim", "spacing": "trailing"}
    runs = flows.equal_nfe_runs({"reflow": flow, "flow": flow}, steps=(1,), n=128)
    # the same model from the same noise twice: identical FD, and the table names the two kinds it was given
    (a, ra), (b, rb) = runs[("reflow", 1)], runs[("flow", 1)]
    assert a.value == b.value and ra.record.nfe == rb.record.nfe == 1 and ra.record.sampler == "euler"
    table = flows.equal_nfe_table(runs)
    assert list(table.columns) == ["NFE reflow / flow", "FD reflow [95 %]", "FD flow [95 %]"]
    with pytest.raises(ValueError, match="two kinds"):
        flows.equal_nfe_table({("a", 1): runs[("flow", 1)]})


def test_flow_grid_is_diffusers_grid_ending_at_one_thousandth_then_zero():
    from companion import load

    flow = load("digits-flow")
    assert flows.flow_grid(flow, "euler", 1) == [1.0, 0.0]
    assert flows.flow_grid(flow, "euler", 2) == [1.0, 0.001, 0.0]  # the second call covers the last 0.1 % of the path
    grid = flows.flow_grid(flow, "euler", 4)
    assert len(grid) == 5 and grid[0] == 1.0 and grid[-2] == 0.001 and grid[-1] == 0.0
