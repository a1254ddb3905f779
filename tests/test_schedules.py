"""Noise schedules and parameterisation conversions."""
import pytest
import torch

from companion import orders, schedules


def test_cosine_schedule_has_the_huge_sigma_max_that_breaks_samplers():
    # platform-facts: alphas_cumprod[999] = 2.4e-9, sigma_max = 20291 for squaredcos_cap_v2
    assert schedules.sigma_max("cosine") == pytest.approx(20291, rel=1e-3)
    assert schedules.sigma_max("linear") == pytest.approx(157.4, rel=1e-3)


def test_snr_decreases_monotonically():
    for name in schedules.SCHEDULES:
        s = schedules.snr(name)
        assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("src", schedules.PARAMETERISATIONS)
@pytest.mark.parametrize("dst", schedules.PARAMETERISATIONS)
def test_parameterisations_round_trip(src, dst):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    abar = torch.tensor(0.37, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
    assert torch.allclose(schedules.convert(truth[src], xt, abar, src, dst), truth[dst], atol=1e-12)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="schedule='quadratic'.*choose one of"):
        schedules.alphas_cumprod("quadratic")
    with pytest.raises(ValueError, match="parameterisation 'x0'"):
        schedules.convert(torch.zeros(1), torch.zeros(1), 0.5, "x0", "epsilon")
    with pytest.raises(ValueError, match="t=1000 is out of range"):
        schedules.noise(torch.zeros(1, 1, 2, 2), 1000)


def test_schedule_trap_is_measured_and_leading_spacing_fixes_it():
    df = orders.schedule_trap_table(samplers=("ddim", "euler", "dpmpp_2m"), eps_error=0.01, batch=64)
    by = df.set_index("sampler")
    assert (df["linear schedule"] == "ok").all()
    assert (df["cosine + leading"] == "ok").all()
    # a 1 % error in eps, multiplied by sigma_max ~ 2e4 in the first step, throws Euler and DPM-Solver++ off the data
    assert by.loc["Euler", "cosine schedule"].startswith("off the data")
    assert by.loc["DPM-Solver++ 2M", "cosine schedule"].startswith("off the data")
    # DDIM's default spacing is already "leading": it survives
    assert by.loc["DDIM", "cosine schedule"] == "ok"
