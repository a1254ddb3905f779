"""Partial sampling (companion.partial): truncated chains, early stopping, the cheap prior and coarse images."""
from __future__ import annotations

import pytest
import torch

from companion import partial, sample
from companion.oracle import GaussianMixtureOracle
from companion.sampling import SamplingError

MEAN = torch.full((1, 2, 2), 0.3)
STD = 0.2


@pytest.fixture(scope="module")
def gaussian():
    return GaussianMixtureOracle(MEAN.reshape(1, -1), stds=STD, sample_shape=(1, 2, 2), name="gaussian-4d")


def test_full_chain_equals_companion_sample(gaussian):
    """With no start image the chain is exactly companion.sample's (same noise, same trailing timesteps)."""
    for sampler in ("ddim", "dpmpp_2m", "heun"):
        a = sample(gaussian, sampler, 10, batch=16, seed=3, spacing="trailing").samples
        b = partial.sample_from(gaussian, None, None, sampler, 10, batch=16, seed=3).samples
        assert torch.allclose(a, b, atol=1e-6), sampler


@pytest.mark.parametrize("sampler,nfe", [("ddim", 5), ("ddpm", 5), ("euler", 5), ("dpmpp_2m", 5), ("heun", 9)])
def test_truncated_chain_starts_below_t_start_and_counts_nfe(gaussian, sampler, nfe):
    x0 = gaussian.sample_data(32, seed=1)
    res = partial.sample_from(gaussian, x0, 300, sampler, 5, seed=0)
    assert res.t_start <= 300 and res.t_start > 200
    assert res.record.nfe == nfe
    assert torch.isfinite(res.samples).all()


def test_the_start_is_the_forward_process_at_t_start(gaussian):
    """The noised start is sqrt(abar) x0 + sqrt(1 - abar) eps: its mean and spread match q(x_t | x0)."""
    from companion.schedules import alphas_cumprod

    x0 = torch.zeros(20000, 1, 2, 2)
    res = partial.sample_from(gaussian, x0, 499, "ddim", 1, seed=0)
    abar = float(alphas_cumprod()[int(res.t_start)])
    x = res.x_start_noised
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - (1 - abar) ** 0.5) < 0.01


def test_small_t_start_keeps_the_image_and_large_t_start_forgets_it(gaussian):
    """From a point far from the data: at t=20 the output stays near it, from t=900 it lands on the data."""
    far = torch.full((2000, 1, 2, 2), -0.8)
    near = partial.sample_from(gaussian, far, 20, "ddim", 4, seed=0).samples
    forgot = partial.sample_from(gaussian, far, 900, "ddim", 50, seed=0).samples
    assert float((near - far).abs().mean()) < 0.2
    assert abs(float(forgot.mean()) - 0.3) < 0.05
    assert abs(float(forgot.std()) - STD) < 0.03


def test_stop_at_returns_the_denoised_estimate_and_saves_steps(gaussian):
    full = partial.sample_from(gaussian, None, None, "ddim", 20, batch=512, seed=0)
    early = partial.sample_from(gaussian, None, None, "ddim", 20, batch=512, seed=0, stop_at=300)
    assert full.record.nfe == 20 and early.record.nfe == 15 and early.t_end == 299.0
    # the denoised estimate at t=299 is the posterior mean: right mean, too little spread (it averages the noise out)
    assert abs(float(early.samples.mean()) - 0.3) < 0.03
    assert float(early.samples.std()) < float(full.samples.std())
    # the last DDIM step (t=49 -> 0) is itself the denoised estimate: stopping there changes nothing
    last = partial.sample_from(gaussian, None, None, "ddim", 20, batch=512, seed=0, stop_at=49)
    assert torch.allclose(last.samples, full.samples, atol=1e-5)


def test_guidance_counts_two_nfe_per_step():
    from companion import load
    from companion.data import digits

    model = load("digits-cond")
    x, y = digits(16, "test")
    res = partial.sample_from(model, x[:4], 200, "ddim", 3, class_labels=y[:4], guidance=2.0)
    assert res.record.nfe == 6 and res.images.shape == (4, 1, 16, 16)


def test_same_seed_same_result(gaussian):
    x0 = gaussian.sample_data(8, seed=0)
    a = partial.sample_from(gaussian, x0, 400, "ddpm", 5, seed=2).samples
    b = partial.sample_from(gaussian, x0, 400, "ddpm", 5, seed=2).samples
    c = partial.sample_from(gaussian, x0, 400, "ddpm", 5, seed=3).samples
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("args,kwargs,match", [
    ((None, 300), {}, "give both x_start and t_start"),
    ((None, None), {}, "batch is required"),
    (("x", 1200), {}, r"t_start must be a timestep in \[0, 999\]"),
    (("x", 300), dict(steps=0), r"steps must be an int in \[1, 1000\]"),
    (("x", 3), dict(steps=10), "cannot take 10 steps below t_start=3"),
    (("x", 300), dict(stop_at=-5), r"stop_at must be a timestep in \[0, 999\]"),
    (("x", 300), dict(sampler="nope"), "unknown sampler 'nope'; valid samplers: ddpm"),
    (("x", 300), dict(batch=3), "batch=3 but x_start holds 8 images"),
    (("bad", 300), {}, r"x_start must have shape \(B, 1, 2, 2\)"),
])
def test_bad_input_is_refused(gaussian, args, kwargs, match):
    x = {"x": torch.zeros(8, 1, 2, 2), "bad": torch.zeros(8, 4), None: None}[args[0]]
    kw = dict(sampler="ddim", steps=4)
    kw.update(kwargs)
    with pytest.raises((SamplingError, ValueError), match=match):
        partial.sample_from(gaussian, x, args[1], kw.pop("sampler"), kw.pop("steps"), **kw)


def test_gaussian_prior_matches_class_statistics():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    imgs = torch.where(labels[:, None, None, None] == 0, -0.5, 0.5) + 0.1 * torch.randn(400, 1, 4, 4, generator=g)
    prior = partial.GaussianPrior(imgs, labels, rank=2)
    s = prior.sample(torch.tensor([0] * 2000 + [1] * 2000), seed=1)
    assert abs(float(s[:2000].mean()) + 0.5) < 0.01 and abs(float(s[2000:].mean()) - 0.5) < 0.01
    assert abs(float(s[:2000].std()) - 0.1) < 0.01
    assert torch.equal(prior.sample([0, 1], seed=4), prior.sample([0, 1], seed=4))
    with pytest.raises(ValueError, match=r"labels \[7\] were not in the data"):
        prior.sample([7])
    with pytest.raises(ValueError, match="rank must be a non-negative int"):
        partial.GaussianPrior(imgs, labels, rank=-1)


def test_blur_keeps_the_mean_and_removes_detail():
    x = torch.zeros(1, 1, 8, 8)
    x[..., ::2, ::2] = 1.0  # a checkerboard-like fine pattern
    b = partial.blur(x, 2)
    assert abs(float(b.mean()) - float(x.mean())) < 1e-6 and float(b.std()) < 0.1 * float(x.std())
    with pytest.raises(ValueError, match="factor must be a positive int dividing the image size 8"):
        partial.blur(x, 3)
