"""Exact-score oracles and the reference ODE solver."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from companion import oracle as O
from companion.reference import solve_ode
from companion.schedules import SigmaMap
from companion.models import TRAIN_SCHEDULE, DiffusionModel
from companion.sampling import sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 shared cores, tiny nets


def log_density(o, x, sigma):
    """log p_sigma(x) of the mixture, written independently of the oracle (torch.distributions)."""
    a = 1 / math.sqrt(1 + sigma**2)
    comps = []
    for k in range(o.means.shape[0]):
        var = a**2 * float(o.variances[k]) + 1 - a**2
        dist = torch.distributions.Normal(a * o.means[k], math.sqrt(var))
        comps.append(dist.log_prob(x).sum(-1) + o.log_weights[k])
    return torch.logsumexp(torch.stack(comps), 0)


@pytest.mark.parametrize("t", [999, 500, 37, 0, 123.4, 871.9])
def test_mixture_eps_is_the_exact_score(t):
    o = O.toy_mixture((1, 2, 3), components=3, std=0.2, seed=1)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = float(o.sigma_map.sigma(torch.tensor(float(t), dtype=torch.float64)))
    x.requires_grad_(True)
    score = torch.autograd.grad(log_density(o, x, sigma).sum(), x)[0]
    eps = o.predict_noise(x.detach().reshape(5, 1, 2, 3), t).reshape(5, 6)
    s_vp = sigma / math.sqrt(1 + sigma**2)
    assert torch.allclose(eps, -s_vp * score, rtol=1e-9, atol=1e-9)


def test_flat_and_image_shaped_mixtures_agree():
    flat = O.toy_mixture(16, seed=2)
    img = O.GaussianMixtureOracle(flat.means, stds=flat.variances.sqrt(), weights=flat.log_weights.exp(), sample_shape=(1, 4, 4))
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(flat.predict_noise(x, 400), img.predict_noise(x.reshape(3, 1, 4, 4), 400).reshape(3, 16))
    assert img.predict_noise(x.float().reshape(3, 1, 4, 4), 400).dtype == torch.float32


def test_sigma_map_matches_diffusers_fractional_timesteps():
    """Karras schedules hand the network interpolated timesteps; the oracle must read them as the scheduler meant."""
    sched = EulerDiscreteScheduler.from_config(TRAIN_SCHEDULE, use_karras_sigmas=True)
    sched.set_timesteps(17)
    smap = SigmaMap(TRAIN_SCHEDULE)
    t = sched.timesteps.double()
    assert (t != t.round()).any()  # really fractional
    assert torch.allclose(smap.sigma(t), sched.sigmas[:-1].double(), rtol=2e-5)
    assert np.allclose(smap.t(smap.sigma(t).numpy()), t.numpy(), atol=1e-6)
    grid = torch.arange(0, 1000, 111).double()
    assert torch.allclose(smap.sigma(grid), smap.sigmas[grid.long()], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="outside the training grid"):
        smap.sigma(torch.tensor(1000.5))


def test_empirical_oracle_is_a_zero_width_mixture_and_reproduces_training_images():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    emp = O.EmpiricalOracle(data)
    x = torch.randn(4, 1, 4, 4, generator=g)
    # the ideal denoiser: a softmax-weighted mean of the data, computed here directly
    sigma = float(emp.sigma_map.sigma(torch.tensor(300.0)))
    a = 1 / math.sqrt(1 + sigma**2)
    d2 = ((x.double().reshape(4, 1, 16) - a * data.double().reshape(1, 12, 16)) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * (1 - a**2)), dim=1)
    x0 = (w @ data.double().reshape(12, 16)).reshape(4, 1, 4, 4)
    assert torch.allclose(emp.posterior_mean(x.double(), sigma), x0, atol=1e-10)
    out = sample(emp, "dpmpp_2m", 50, batch=8, spacing="karras").images
    dist = torch.cdist(out.reshape(8, -1), data.reshape(12, -1)).min(1).values
    assert dist.max() < 0.05  # memorisation: every sample is a training image


def test_reference_solution_matches_the_closed_form_for_one_gaussian():
    """For N(mu, s^2 I) the flow is y(sigma) = mu + (y_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)."""
    mu = torch.tensor([[0.3, -0.5, 0.1, 0.7]], dtype=torch.float64)
    o = O.GaussianMixtureOracle(mu, stds=0.4, sample_shape=(4,))
    x_T = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    smap = o.sigma_map
    sT = float(smap.sigmas[999])
    for t_end in (600, 199, "clean"):
        ref = solve_ode(o, x_T, t_end)
        s1 = 0.0 if t_end == "clean" else float(smap.sigmas[t_end])
        y = mu + (x_T * math.sqrt(1 + sT**2) - mu) * math.sqrt(0.16 + s1**2) / math.sqrt(0.16 + sT**2)
        assert torch.allclose(ref, y / math.sqrt(1 + s1**2), atol=1e-7), t_end


def test_reference_solution_on_a_unet_model_agrees_with_a_fine_sampler(tiny_unet):
    model = DiffusionModel(tiny_unet(), name="tiny")
    res = sample(model, "dpmpp_3m_corrected", 200, batch=2, spacing="trailing", return_trajectory=True)
    t_mid, x_mid = [(t, x) for t, x in res.trajectory if t == 499][0]
    ref = solve_ode(model, res.trajectory[0][1], t_end=t_mid, rtol=1e-7, atol=1e-7)
    scale = float(ref.abs().max())
    assert ref.shape == x_mid.shape and (ref - x_mid.double()).abs().max() < 1e-3 * scale


def test_reference_solution_refuses_bad_ends():
    o = O.toy_mixture(2)
    with pytest.raises(ValueError, match="before t_start"):
        solve_ode(o, torch.zeros(1, 2), t_end=900, t_start=500)
    with pytest.raises(ValueError, match="or 'clean'"):
        solve_ode(o, torch.zeros(1, 2), t_end="data")
