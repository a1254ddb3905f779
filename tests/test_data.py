"""companion.data: digits, exact Gaussian mixtures, 2-D toys, shapes, and the optional Hub path."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from companion import data


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_sizes_range_and_disjointness():
    xtr, ytr = data.digits(16, "train")
    xte, yte = data.digits(16, "test")
    assert xtr.shape == (1438, 1, 16, 16) and xte.shape == (359, 1, 16, 16)
    assert xtr.min() >= -1 and xtr.max() <= 1
    # stratified: every class holds out 20 % of its images (rounded)
    per_class = torch.bincount(torch.cat([ytr, yte]))
    assert torch.equal(torch.bincount(yte), torch.round(per_class * 0.2).long())
    flat_tr = {tuple(r) for r in data.digits(8, "train")[0].flatten(1).numpy().round(5).tolist()}
    overlap = sum(tuple(r) in flat_tr for r in data.digits(8, "test")[0].flatten(1).numpy().round(5).tolist())
    assert overlap <= 2  # scikit-learn's digits contain a couple of exact duplicates, nothing more


def test_digits_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="size=12.*8, 16, 32"):
        data.digits(12)
    with pytest.raises(ValueError, match="split='val'.*'train'"):
        data.digits(16, "val")


# ------------------------------------------------------------------------------------------------ Gaussian mixture
def _scipy_logpdf(gm: data.GaussianMixture, x: np.ndarray, a: float) -> np.ndarray:
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal as mvn

    d = gm.dim
    terms = [
        np.log(w) + mvn(np.sqrt(a) * m, a * c + (1 - a) * np.eye(d)).logpdf(x)
        for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy())
    ]
    return logsumexp(np.stack(terms), axis=0)


@pytest.mark.parametrize("name", data.MIXTURES)
@pytest.mark.parametrize("alpha_bar", [1.0, 0.5, 0.02])
def test_mixture_log_prob_matches_scipy(name, alpha_bar):
    gm = data.gaussian_mixture(name)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    ours = gm.log_prob(x, alpha_bar).numpy()
    np.testing.assert_allclose(ours, _scipy_logpdf(gm, x.numpy(), alpha_bar), rtol=1e-9, atol=1e-9)


def test_mixture_score_is_the_gradient_and_eps_its_rescaling():
    gm = data.gaussian_mixture("skewed")
    x = gm.sample(64, seed=3).requires_grad_(True)
    a = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, a).sum(), x)
    score = gm.score(x.detach(), a)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.eps(x.detach(), a), -(1 - a).sqrt()[:, None] * score)


def test_mixture_eps_is_the_posterior_mean_noise():
    """E[eps | x_t] by Monte Carlo over (x0, eps) pairs near a point agrees with the exact eps."""
    gm = data.GaussianMixture([1.0], [[0.5, -0.5]], [[0.3, 0.1]])  # one Gaussian: eps is linear and exact
    a = 0.4
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(400_000, seed=1)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    # linear regression of eps on x_t is the exact conditional mean for jointly Gaussian variables
    design = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, eps).solution
    probe = torch.tensor([[0.2, 0.1], [-1.0, 1.0]], dtype=torch.float64)
    mc = torch.cat([probe, torch.ones(2, 1, dtype=torch.float64)], 1) @ coef
    torch.testing.assert_close(gm.eps(probe, a), mc, atol=5e-3, rtol=0)


def test_mixture_samples_have_the_mixture_moments_and_are_seeded():
    gm = data.gaussian_mixture("skewed")
    x = gm.sample(200_000, seed=0)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    second = (gm.weights[:, None, None] * (gm.covs + gm.means[:, :, None] * gm.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    torch.testing.assert_close(x.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.02, rtol=0)
    assert torch.equal(gm.sample(10, seed=5), gm.sample(10, seed=5))
    assert not torch.equal(gm.sample(10, seed=5), gm.sample(10, seed=6))


def test_fully_noised_mixture_is_standard_normal():
    gm = data.gaussian_mixture("ring8")
    x = torch.randn(20, 2, dtype=torch.float64)
    std_normal = -0.5 * (x**2).sum(1) - np.log(2 * np.pi)
    torch.testing.assert_close(gm.log_prob(x, 1e-8), std_normal, atol=1e-6, rtol=0)
    torch.testing.assert_close(gm.eps(x, 1e-8), x, atol=1e-6, rtol=0)


def test_mixture_bad_input_is_refused():
    with pytest.raises(ValueError, match="covs must have shape"):
        data.GaussianMixture([1, 1], [[0, 0], [1, 1]], torch.ones(3))
    with pytest.raises(ValueError, match="positive definite"):
        data.GaussianMixture([1], [[0, 0]], [[[1, 2], [2, 1]]])
    gm = data.gaussian_mixture("ring8")
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \(0, 1\]"):
        gm.eps(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        gm.log_prob(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="name='moons'.*'ring8'"):
        data.gaussian_mixture("moons")


@pytest.mark.parametrize("fn", [data.two_moons, data.swiss_roll])
def test_2d_toys_are_seeded_and_standardised(fn):
    x = fn(2000, seed=0)
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert torch.equal(x, fn(2000, seed=0)) and not torch.equal(x, fn(2000, seed=1))
    assert x.mean(0).abs().max() < 1e-5
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-4


# ------------------------------------------------------------------------------------------------ shapes
def test_shapes_sizes_range_labels_and_determinism():
    x, y = data.shapes("train")
    xt, yt = data.shapes("test")
    assert x.shape == (5000, 3, 32, 32) and xt.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.bincount(y).tolist() == [1250] * 4 and torch.bincount(yt).tolist() == [250] * 4
    assert len(data.SHAPES_CLASSES) == 4 and int(y.max()) == 3
    x2, y2 = data.shapes("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xa, ya = data.shapes("all")
    assert torch.equal(xa[:5000], x) and torch.equal(xa[5000:], xt) and torch.equal(ya[5000:], yt)
    assert not torch.equal(x[:1000], xt)


def test_shapes_returns_copies():
    x, _ = data.shapes("test")
    x.zero_()
    assert data.shapes("test")[0].abs().sum() > 0


def test_shapes_have_spatial_redundancy():
    """Smoothness: 2x2 pooling then bilinear upsampling keeps shapes at high PSNR; 12x fewer PCA numbers suffice."""
    x, _ = data.shapes("test")
    up = F.interpolate(F.avg_pool2d(x, 2), size=32, mode="bilinear", align_corners=False)
    psnr = 10 * np.log10(4.0 / float(F.mse_loss(up, x)))
    assert psnr > 24, psnr
    # 256 principal components (= the numbers in a 4x8x8 latent) explain nearly all of the shapes' variance
    flat = x.flatten(1)
    flat = flat - flat.mean(0)
    ev = torch.linalg.eigvalsh(flat @ flat.T).flip(0)  # the Gram matrix has the same non-zero spectrum
    explained = float(ev[:256].sum() / ev.sum())
    assert explained > 0.9, explained


def test_shapes_16_is_the_same_scenes():
    x32, y32 = data.shapes("test", 32)
    x16, y16 = data.shapes("test", 16)
    assert x16.shape == (1000, 3, 16, 16) and torch.equal(y16, y32)
    assert float((F.avg_pool2d(x32, 2) - x16).abs().mean()) < 0.05


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="split='valid'"):
        data.shapes("valid")
    with pytest.raises(ValueError, match="size=28.*16, 32, 64"):
        data.shapes("train", 28)


# ------------------------------------------------------------------------------------------------ Hub data sets
def test_hub_dataset_fails_fast_and_clearly_offline(hf_offline):
    t0 = time.perf_counter()
    with pytest.raises(data.DataUnavailable, match=r"ylecun/mnist.*not in the Hugging Face cache.*digits\(\)"):
        data.hub_dataset("mnist")
    assert time.perf_counter() - t0 < 10


def test_hub_dataset_unreachable_endpoint_times_out(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE the reachability probe itself must answer within the timeout."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://10.255.255.1")  # non-routable: connections hang
    t0 = time.perf_counter()
    with pytest.raises(data.DataUnavailable, match="uoft-cs/cifar10.*not reachable"):
        data.hub_dataset("cifar10", "test", timeout=1.0)
    assert time.perf_counter() - t0 < 6


def test_hub_dataset_unknown_name():
    with pytest.raises(ValueError, match="name='svhn'.*'mnist', 'cifar10'"):
        data.hub_dataset("svhn")
