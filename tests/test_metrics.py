"""Validation of the quality metrics on REAL data (held-out digits), plus their contracts.

Corruptions are applied to the held-out split and compared with the train-split reference: every metric
must move in the documented direction, monotonically, by more than its own interval.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion import metrics as M
from companion.data import digits, gaussian_mixture
from companion.features import load_feature_net

NOISE = (0.0, 0.05, 0.1, 0.2, 0.4)
BLUR = (0.0, 0.6, 1.0, 1.5, 2.5)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def noisy(x, sigma, seed=0):
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def test_set():
    return digits(16, "test")


@pytest.fixture(scope="module")
def noise_sweep(test_set):
    x, y = test_set
    return [M.evaluate_images(noisy(x, s), y) for s in NOISE]


@pytest.fixture(scope="module")
def blur_sweep(test_set):
    x, y = test_set
    return [M.evaluate_images(gaussian_blur(x, s), y, metrics=("fd", "prdc")) for s in BLUR]


def test_fd_real_vs_held_out_is_small(noise_sweep):
    fd = noise_sweep[0]["fd"]
    assert fd.n == 359 and fd.feature == "features-digits"
    assert fd.low <= fd.value <= fd.high
    # real vs real: well under the distance of lightly noised digits (noise std 0.1 in [-1, 1] units)
    assert fd.value < 1.0
    assert fd.high < noise_sweep[2]["fd"].low


@pytest.mark.parametrize("sweep", ["noise_sweep", "blur_sweep"])
def test_fd_grows_monotonically_with_corruption(sweep, request):
    fds = [r["fd"] for r in request.getfixturevalue(sweep)]
    values = [m.value for m in fds]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert fds[-1].low > 10 * fds[0].high  # the strongest corruption is far away, beyond both intervals


@pytest.mark.parametrize("sweep", ["noise_sweep", "blur_sweep"])
def test_precision_falls_with_corruption(sweep, request):
    prec = [r["precision"] for r in request.getfixturevalue(sweep)]
    assert prec[0].value > 0.85
    assert all(b.value <= a.value + 0.02 for a, b in zip(prec, prec[1:])), [p.value for p in prec]
    assert prec[-1].high < prec[0].low - 0.3


def test_kid_behaves(noise_sweep):
    kid = [r["kid"] for r in noise_sweep]
    assert kid[0].low <= 0.0 <= kid[0].high  # real vs real: zero inside the interval (unbiased estimator)
    assert abs(kid[0].value) < 0.05
    values = [k.value for k in kid]
    assert all(b > a for a, b in zip(values[1:], values[2:])), values
    assert kid[-1].low > kid[0].high
    assert all(np.isfinite(k.value) and abs(k.value) < 20 for k in kid)  # bounded kernel: no blow-ups


def test_class_accuracy(noise_sweep, test_set):
    acc = noise_sweep[0]["class_accuracy"]
    assert acc.value > 0.95 and acc.low <= acc.value <= acc.high <= 1.0
    x, y = test_set
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    wrong = M.class_accuracy(x, shuffled)
    assert wrong.value < 0.2 and wrong.high < acc.low


def test_recall_falls_when_only_few_classes():
    # reference: the held-out split; "generated": 250 training digits of all classes vs of 3 classes only
    x, y = digits(16, "train")
    ref = M.reference("features-digits", "test")
    g = torch.Generator().manual_seed(1)
    all_cls = x[torch.randperm(len(x), generator=g)[:250]]
    few = x[y < 3]
    few = few[torch.randperm(len(few), generator=g)[:250]]
    r_all = M.precision_recall(all_cls, ref)
    r_few = M.precision_recall(few, ref)
    assert r_all["recall"].value > 0.8
    assert r_few["recall"].high < 0.45 < r_all["recall"].low
    assert r_few["coverage"].high < r_all["coverage"].low
    assert r_few["precision"].value > 0.8  # what there is still looks real: fidelity is not diversity


def test_fd_matches_torchmetrics_on_the_network_itself(test_set):
    """Features passed through unchanged give the same FD as torchmetrics running the network as its feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = load_feature_net("features-digits")

    class NetFeatures(nn.Module):
        num_features = 64

        def forward(self, x):
            return net(x)[0].double()

    x, _ = test_set
    xt, _ = digits(16, "train")
    fid = FrechetInceptionDistance(feature=NetFeatures())
    fid.update(xt, real=True)
    fid.update(noisy(x, 0.1), real=False)
    ours = M.frechet_distance(noisy(x, 0.1))
    assert ours.value == pytest.approx(float(fid.compute()), rel=1e-4)
    # the batched bootstrap formula agrees with torchmetrics at unit weights
    feats, _, _ = M.extract(noisy(x, 0.1))
    boot = M.fd_from_features(feats, M.reference(), n_boot=2)
    assert boot.value == pytest.approx(ours.value, rel=1e-9)


def test_intervals_are_seeded(test_set):
    x, _ = test_set
    a, b = M.frechet_distance(x, seed=3), M.frechet_distance(x, seed=3)
    c = M.frechet_distance(x, seed=4)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high) and a.value == c.value


def test_too_few_samples_are_refused(test_set):
    x, y = test_set
    with pytest.raises(ValueError, match=r"fd needs at least 128 samples, got 50"):
        M.frechet_distance(x[:50])
    with pytest.raises(ValueError, match=r"prdc needs at least 50 samples, got 20"):
        M.precision_recall(x[:20])
    with pytest.raises(ValueError, match=r"class_accuracy needs at least 20 samples, got 5"):
        M.class_accuracy(x[:5], y[:5])
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(torch.full((200, 1, 16, 16), float("nan")))


def test_measurement_record():
    m = M.Measurement("fd", 1.23456, 1.0, 1.5, 300, "features-digits", "note")
    assert repr(m) == "fd = 1.235 [1, 1.5] (n=300, features-digits)"
    assert m.as_dict() == dict(name="fd", value=1.23456, low=1.0, high=1.5, n=300, feature="features-digits", note="note")
    assert M.as_columns({"fd": m}) == {"fd": 1.23456, "fd_low": 1.0, "fd_high": 1.5, "fd_n": 300}


def test_ode_distance_refuses_stochastic_samplers():
    x = torch.zeros(8, 1, 4, 4)
    with pytest.raises(ValueError, match="euler_a is stochastic"):
        M.ode_distance(x, x, stochastic=True, sampler="euler_a")
    d = M.ode_distance(x + 0.5, x)
    assert d.value == pytest.approx(0.5) and d.low == pytest.approx(0.5) and d.n == 8


def test_toy_metrics_exact():
    gm = gaussian_mixture("ring8")
    true = gm.sample(1000, seed=5)
    blurred = true + 0.3 * torch.randn(true.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    half = true[true[:, 0] > 0.5]  # mode dropping: only the right-hand components
    good, bad, dropped = M.toy_metrics(true, gm), M.toy_metrics(blurred, gm), M.toy_metrics(half, gm)
    # exact: the mean log-density of true samples estimates minus the entropy; spreading samples lowers it
    assert good["log_likelihood"].low > bad["log_likelihood"].high
    assert good["energy_distance"].low <= 0.0 <= good["energy_distance"].high
    assert dropped["energy_distance"].low > 0.1 > good["energy_distance"].high
    assert dropped["log_likelihood"].low > bad["log_likelihood"].high  # likelihood alone misses mode dropping


def test_energy_distance_matches_scipy_in_1d():
    from scipy.stats import energy_distance as scipy_energy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, generator=g, dtype=torch.float64)
    y = torch.randn(700, 1, generator=g, dtype=torch.float64) + 1.0
    ours = M.energy_distance(torch.cat([x, 0 * x], 1), torch.cat([y, 0 * y], 1))
    # scipy returns the square root of the V-statistic version; the U-statistic differs by O(1/n)
    assert ours.value == pytest.approx(scipy_energy(x[:, 0], y[:, 0]) ** 2, rel=0.02)
    assert ours.low < ours.value < ours.high


def test_shapes_space_validation():
    """The same checks in the shapes feature space: real vs held-out small; noise and blur push FD up monotonically."""
    from companion.data import shapes

    x, _ = shapes("test")
    ref = M.reference("features-shapes", images=x[:500])
    held_out = x[500:]
    fd_noise = [M.frechet_distance(noisy(held_out, s), ref, n_boot=50).value for s in (0.0, 0.05, 0.1, 0.2)]
    fd_blur = [M.frechet_distance(gaussian_blur(held_out, s), ref, n_boot=50).value for s in (0.0, 1.0, 2.0)]
    assert fd_noise[0] < 2.0
    assert all(b > a for a, b in zip(fd_noise, fd_noise[1:])), fd_noise
    assert all(b > a for a, b in zip(fd_blur, fd_blur[1:])), fd_blur
    assert fd_noise[-1] > 20 * fd_noise[0]
