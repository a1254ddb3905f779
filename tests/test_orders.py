"""Measured convergence orders, network consequences, step grids and few-step failure modes (companion.orders)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from companion import oracle as O
from companion import orders as Od
from companion.schedules import train_sigmas
from companion.samplers import REGISTRY


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 shared cores, tiny nets


@pytest.fixture(scope="module")
def mixture():
    return O.toy_mixture((1, 4, 4))


# --------------------------------------------------------------------------------------------- orders

def test_every_deterministic_registry_sampler_has_a_nominal_order_and_stochastic_ones_are_refused():
    deterministic = {k for k, s in REGISTRY.items() if not s.stochastic}
    assert deterministic <= set(Od.NOMINAL), deterministic - set(Od.NOMINAL)
    assert Od.nominal_order("dpmpp_3m") == 3  # the paper's claim, which the measurement below contradicts
    with pytest.raises(ValueError, match="no nominal ODE order.*ddim"):
        Od.nominal_order("euler_a")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        Od.nominal_order("nope")


def test_fit_order_recovers_a_power_law_and_refuses_unusable_errors():
    steps = np.array([100, 125, 200, 250])
    assert Od.fit_order(steps, 5.0 * steps ** -2.5) == pytest.approx(2.5, abs=1e-9)
    with pytest.raises(ValueError, match="positive, finite"):
        Od.fit_order(steps, [1e-3, 0.0, 1e-4, 1e-5])
    with pytest.raises(ValueError, match="positive, finite"):
        Od.fit_order(steps, [1e-3, math.inf, 1e-4, 1e-5])
    with pytest.raises(ValueError, match=">= 2"):
        Od.fit_order([100], [1e-3])


def test_verdict_uses_the_tolerance_on_both_sides():
    assert Od.verdict(2.2, 3) == "LOWER than designed"
    assert Od.verdict(2.6, 3) == "as designed"
    assert Od.verdict(3.4, 3) == "as designed"
    assert Od.verdict(3.6, 3) == "higher than designed"
    assert Od.verdict(2.8, 3, tolerance=0.1) == "LOWER than designed"


@pytest.fixture(scope="module")
def measured(mixture):
    return Od.measure_orders(["ddim", "dpmpp_3m", "dpmpp_3m_corrected", "heun"], mixture, batch=32, progress=False)


def test_measured_orders_flag_stock_3m_as_lower_than_designed(measured):
    table = Od.order_table(measured)
    assert list(table.index) == ["ddim", "dpmpp_3m", "dpmpp_3m_corrected", "heun"]
    assert table.loc["ddim", "measured order"] == pytest.approx(1.0, abs=0.3)
    assert table.loc["heun", "measured order"] == pytest.approx(2.0, abs=0.3)
    # stock DPM-Solver++ 3M: nominally 3, measured ~2 (its f'' term is halved); the corrected one measures ~3
    assert table.loc["dpmpp_3m", "measured order"] < 2.5
    assert table.loc["dpmpp_3m", "verdict"] == "LOWER than designed"
    assert table.loc["dpmpp_3m_corrected", "measured order"] == pytest.approx(3.0, abs=0.3)
    assert table.loc["dpmpp_3m_corrected", "verdict"] == "as designed"
    assert (table["steps"] == "100-250").all()


def test_measured_rows_count_network_evaluations(measured):
    assert len(measured) == 4 * len(Od.ORDER_STEPS)
    heun = measured[measured.sampler == "heun"]
    assert (heun["nfe"] == 2 * heun["steps"] - 1).all()
    ddim = measured[measured.sampler == "ddim"]
    assert (ddim["nfe"] == ddim["steps"]).all()
    for _, g in measured.groupby("sampler"):
        assert (np.diff(g.sort_values("steps")["error"]) < 0).all()  # errors fall as steps grow


def test_order_figure_draws_the_nominal_slope_through_each_samplers_first_point(measured):
    fig = Od.order_figure(measured)
    assert len(fig.data) == 2 * measured["sampler"].nunique()
    for key in measured["sampler"].unique():
        pts, ref = [t for t in fig.data if t.legendgroup == key]
        assert ref.line.dash == "dash"
        assert ref.x[0] == pts.x[0] and ref.y[0] == pytest.approx(pts.y[0])
        slope = math.log(ref.y[1] / ref.y[0]) / math.log(ref.x[1] / ref.x[0])
        assert slope == pytest.approx(-Od.NOMINAL[key][0], abs=1e-9)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


# --------------------------------------------------------------------------------------------- on a model

def test_solver_consequence_measures_against_one_shared_reference(mixture):
    df = Od.solver_consequence(mixture, ["ddim", "dpmpp_2m"], steps=(5, 40), n_fd=None, n_ode=8, progress=False)
    assert list(df.columns[:6]) == ["sampler", "name", "spacing", "steps", "nfe", "wall_s"]
    assert "fd" not in df.columns
    assert (df["ode_distance_n"] == 8).all()
    assert ((df["ode_distance_low"] <= df["ode_distance"]) & (df["ode_distance"] <= df["ode_distance_high"])).all()
    for _, g in df.groupby("sampler"):
        lo, hi = g.sort_values("steps")["ode_distance"]
        assert hi < 0.5 * lo  # 8x the steps: the distance to the exact solution must shrink clearly
    with pytest.raises(ValueError, match="stochastic"):
        Od.solver_consequence(mixture, ["euler_a"], steps=(5,), n_fd=None, progress=False)
    with pytest.raises(ValueError, match="at least 4"):
        Od.network_reference(mixture, 2)


def test_solver_consequence_frechet_distance_on_the_ideal_digits_denoiser():
    from companion.data import digits

    x, _ = digits(16, "train")
    ideal = O.EmpiricalOracle(x[:300], name="digits-ideal")
    df = Od.solver_consequence(ideal, ["dpmpp_2m"], steps=(2, 12), n_fd=128, n_ode=4, rtol=1e-3, progress=False)
    assert (df["fd_n"] == 128).all() and (df["ode_distance_n"] == 4).all()
    assert ((df["fd_low"] <= df["fd"]) & (df["fd"] <= df["fd_high"])).all()
    few, more = df.sort_values("steps")["fd"]
    assert more < few  # 12 steps of the ideal denoiser land on training digits; 2 steps give blurred means
    text = Od.interval_text(df, "fd")
    assert text.iloc[0].count("[") == 1 and text.iloc[0].endswith("]")


# --------------------------------------------------------------------------------------------- grids

def test_step_grids_are_what_each_spacing_promises():
    g = Od.grids_table("dpmpp_2m", steps=10).set_index("spacing")
    assert set(g.index) == {"leading", "linspace", "trailing", "karras", "exponential"}
    for sp in g.index.unique():
        s = g.loc[sp, "sigma"].to_numpy()
        assert len(s) == 11 and s[-1] == 0 and (np.diff(s) < 0).all()
    expo = np.log(g.loc["exponential", "sigma"].to_numpy()[:-1])
    assert np.ptp(np.diff(expo)) < 1e-4  # exponential = uniform in log sigma = uniform in log-SNR
    karras = g.loc["karras", "sigma"].to_numpy()[:-1] ** (1 / 7)
    assert np.ptp(np.diff(karras)) < 1e-4  # Karras: uniform in sigma^(1/rho), rho = 7
    assert g.loc["trailing", "t"].iloc[0] == 999 and g.loc["linspace", "t"].iloc[0] == 999
    assert g.loc["leading", "t"].iloc[0] == 900  # leading never starts from the last training step
    smax = float(train_sigmas()[-1])
    assert g.loc["trailing", "sigma"].iloc[0] == pytest.approx(smax, rel=1e-5)


def test_step_grid_lists_two_stage_and_timestep_samplers_once_per_step():
    heun = Od.step_grid("heun", "trailing", 10)
    assert len(heun) == 11 and heun["t"].iloc[:-1].is_monotonic_decreasing
    ddim = Od.step_grid("ddim", "trailing", 10)
    assert list(ddim["t"].iloc[:-1]) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    sig = train_sigmas()
    assert ddim["sigma"].iloc[8] == pytest.approx(float(sig[199]), rel=1e-9)
    pndm = Od.step_grid("pndm", "trailing", 10)
    assert pndm["t"].iloc[:-1].is_monotonic_decreasing and pndm["sigma"].iloc[-1] == 0
    fig = Od.grid_figure(Od.grids_table("euler", ["trailing", "karras"], steps=6))
    assert len(fig.data) == 2 and all(min(t.y) > 0 for t in fig.data)


# --------------------------------------------------------------------------------------------- few steps

def test_spacing_errors_skip_unsupported_spacings_and_see_the_log_snr_grid_win(mixture):
    df = Od.spacing_errors(["ddim", "dpmpp_2m"], ["trailing", "exponential"], [10, 50], mixture, batch=16, progress=False)
    assert set(zip(df.sampler, df.spacing)) == {("ddim", "trailing"), ("dpmpp_2m", "trailing"), ("dpmpp_2m", "exponential")}
    e = df.set_index(["sampler", "spacing", "steps"])["error"]
    for key in [("ddim", "trailing"), ("dpmpp_2m", "trailing"), ("dpmpp_2m", "exponential")]:
        assert e[key + (50,)] < e[key + (10,)]
    # uniform-in-t grids jump from t = 1000/N straight to sigma = 0; the log-SNR grid refines the low-noise end
    assert e[("dpmpp_2m", "exponential", 10)] < 0.5 * e[("dpmpp_2m", "trailing", 10)]


def test_ablation_shows_unipc_needs_lower_order_final_and_refuses_unknown_options(mixture):
    df = Od.ablation_errors(["unipc"], {"lower_order_final": False}, [10], mixture, spacing="trailing", batch=8)
    e = df.set_index("setting")["error"]
    assert math.isfinite(e["registry"]) and e["registry"] < 0.2
    assert e["lower_order_final=False"] == math.inf
    with pytest.raises(ValueError, match="has no option"):
        Od.ablation_errors(["ddim"], {"lower_order_final": False}, [10], mixture)


def test_order_command_prints_measured_orders(capsys):
    from companion import cli

    assert cli.main(["order", "ddim", "heun", "--steps", "100,200", "--dim", "2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    orders = {line.split()[0]: float(line.split()[2]) for line in out.strip().splitlines()}
    assert orders["ddim"] == pytest.approx(1.0, abs=0.1) and orders["heun"] == pytest.approx(2.0, abs=0.2)
    assert cli.main(["order", "euler_a", "--dim", "2"]) == 2
    assert "stochastic" in capsys.readouterr().err
