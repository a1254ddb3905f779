"""Euler–Maruyama, probability-flow Euler and predictor–corrector (companion.sde) on exact-score oracles."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from companion import sde
from companion.models import TRAIN_SCHEDULE
from companion.oracle import GaussianMixtureOracle
from companion.sampling import SamplingError

MEAN = torch.tensor([0.5, -0.3])
STD = 0.4  # exact variance 0.16


@pytest.fixture(scope="module")
def gaussian():
    """One isotropic Gaussian in 2-D: the data distribution every sampler should reproduce."""
    return GaussianMixtureOracle(MEAN[None], stds=STD, sample_shape=(2,), name="gaussian-2d")


@pytest.mark.parametrize("sampler,steps", [("euler_maruyama", 200), ("probability_flow", 200), ("predictor_corrector", 60)])
def test_output_mean_and_variance_match_the_exact_gaussian(gaussian, sampler, steps):
    res = sde.sample_sde(gaussian, sampler, steps, batch=20000, seed=0)
    x = res.samples.double()
    # Monte-Carlo standard errors at n=20000: mean 0.003, variance 0.0016; the rest is discretisation bias (O(1/steps))
    assert torch.allclose(x.mean(0), MEAN.double(), atol=0.02), x.mean(0)
    assert torch.allclose(x.var(0), torch.full((2,), STD**2, dtype=torch.float64), atol=0.015), x.var(0)


def test_few_steps_are_worse_than_many_for_the_ode(gaussian):
    """Probability-flow Euler with 5 steps misses the variance by much more than with 200 steps."""
    def var_error(steps):
        return float((sde.probability_flow(gaussian, steps, batch=20000, seed=1).samples.double().var(0) - STD**2).abs().max())

    assert var_error(5) > 3 * var_error(200)


def test_stochastic_sampler_forgets_a_wrong_prior_the_ode_does_not(gaussian):
    """Start from x_T with twice the right spread: the ODE carries the error to the data, the SDE contracts it."""
    x_T = 2.0 * torch.randn(20000, 2, generator=torch.Generator().manual_seed(3))
    ode = sde.probability_flow(gaussian, 200, batch=20000, x_T=x_T).samples.double().var(0)
    em = sde.euler_maruyama(gaussian, 200, batch=20000, x_T=x_T).samples.double().var(0)
    assert (ode - STD**2).abs().min() > 0.1  # far too wide
    assert (em - STD**2).abs().max() < 0.015


def test_nfe_counts(gaussian):
    assert sde.euler_maruyama(gaussian, 7, batch=4).record.nfe == 7
    assert sde.probability_flow(gaussian, 7, batch=4).record.nfe == 7
    assert sde.predictor_corrector(gaussian, 5, batch=4).record.nfe == 10
    assert sde.predictor_corrector(gaussian, 5, batch=4, corrector_steps=2).record.nfe == 15


def test_classifier_free_guidance_counts_two_nfe_per_evaluation():
    from companion import load

    model = load("digits-cond")
    res = sde.euler_maruyama(model, 3, batch=2, class_labels=[1, 2], guidance=2.0)
    assert res.record.nfe == 6 and res.record.guidance == 2.0
    assert res.images.shape == (2, 1, 16, 16) and torch.isfinite(res.images).all()


def test_same_seed_same_samples_other_seed_other_samples(gaussian):
    for name in sde.SAMPLERS:
        a = sde.sample_sde(gaussian, name, 10, batch=8, seed=4).samples
        b = sde.sample_sde(gaussian, name, 10, batch=8, seed=4).samples
        c = sde.sample_sde(gaussian, name, 10, batch=8, seed=5).samples
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


def test_stochastic_path_differs_from_the_ode_from_the_same_noise(gaussian):
    ode = sde.probability_flow(gaussian, 20, batch=64, seed=0)
    em = sde.euler_maruyama(gaussian, 20, batch=64, seed=0)
    assert torch.equal(ode.x_T, em.x_T)
    assert float((ode.samples - em.samples).abs().mean()) > 0.05
    assert em.record.stochastic and not ode.record.stochastic


def test_noise_levels_follow_diffusers_trailing_spacing(gaussian):
    for steps in (1, 10, 37, 1000):
        ts, sigmas = sde.noise_levels(gaussian, steps)
        ddim = DDIMScheduler.from_config(TRAIN_SCHEDULE, timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        assert ts.long().tolist() == ddim.timesteps.tolist()
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and bool((sigmas[:-1].diff() < 0).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="heun"), "unknown SDE-chapter sampler 'heun'; valid: euler_maruyama"),
    (dict(steps=0), r"steps must be an int in \[1, 1000\]"),
    (dict(steps=2.5), r"steps must be an int"),
    (dict(batch=0), "batch must be a positive int"),
    (dict(snr=-1.0), "snr .* must be a positive number, got -1.0"),
    (dict(corrector_steps=0), "corrector_steps must be a positive int, got 0"),
    (dict(x_T=torch.zeros(3, 2)), r"x_T must have shape \(4, 2\)"),
    (dict(guidance=2.0), "needs a class-conditional model"),
])
def test_bad_input_is_refused_with_the_valid_choices(gaussian, kwargs, match):
    args = dict(sampler="euler_maruyama", steps=5, batch=4)
    args.update(kwargs)
    with pytest.raises(SamplingError, match=match):
        sde.sample_sde(gaussian, args.pop("sampler"), args.pop("steps"), **args)
