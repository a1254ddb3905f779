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
    return [M.evaluate_images(noisy(x, s), y, metrics=(*M.DEFAULT_IMAGE_METRICS, "kid_normalised")) for s in NOISE]


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


@pytest.mark.parametrize("name", ["kid", "kid_normalised"])
def test_kid_behaves(noise_sweep, name):
    kid = [r[name] for r in noise_sweep]
    assert kid[0].low <= 0.0 <= kid[0].high  # real vs real: zero inside the interval (unbiased estimator)
    assert abs(kid[0].value) < 0.1 * kid[2].value
    values = [k.value for k in kid]
    assert all(b > a for a, b in zip(values[1:], values[2:])), values
    assert kid[-1].low > kid[0].high
    # no blow-ups: from light noise on, the interval is within a factor 2 of the value on either side
    assert all(np.isfinite(k.value) and k.value / 2 < k.low <= k.high < 2 * k.value for k in kid[2:])


def test_kid_variants_are_named(noise_sweep):
    standard, normalised = noise_sweep[2]["kid"], noise_sweep[2]["kid_normalised"]
    assert standard.name == "kid" and "raw features" in standard.note
    assert normalised.name == "kid_normalised" and "norm sqrt(d)" in normalised.note
    assert standard.value != pytest.approx(normalised.value, rel=0.5)  # different numbers: never mix them


def test_unlabelled_set_is_taken_as_iid(test_set):
    """The held-out split is class-stratified; without its labels it is taken as i.i.d., which over-corrects the
    FD bias: the value is lower than with the labels (the interval still reaches 0 here)."""
    x, y = test_set
    feats, _, _ = M.extract(x)
    with_labels = M.fd_from_features(feats, M.reference(), labels=y)
    without = M.fd_from_features(feats, M.reference())
    assert without.value < with_labels.value
    assert with_labels.low <= 0.0 <= with_labels.high


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
    feats, _, _ = M.extract(noisy(x, 0.1))
    plug_in = M.plug_in_fd(feats, M.reference())
    assert plug_in == pytest.approx(float(fid.compute()), rel=1e-4)
    # the reported FD is the plug-in minus its estimated finite-sample bias (positive: FD is biased upwards)
    ours = M.frechet_distance(noisy(x, 0.1))
    assert 0 < plug_in - ours.value < 0.5 * plug_in
    assert f"plug-in {plug_in:.4g}" in ours.note


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_on_equal_sizes():
    """With equal set sizes and one subset of all samples, torchmetrics' KID is the same U-statistic."""
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 64, generator=g, dtype=torch.float64) * 2
    fake = torch.rand(300, 64, generator=g, dtype=torch.float64) * 2.1
    kid = KernelInceptionDistance(feature=M.PrecomputedFeatures(64), subsets=1, subset_size=300)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    ref = M.Reference("features-test", "custom", real, None)
    ours = M.kid_from_features(fake, ref, n_boot=10)
    assert ours.value == pytest.approx(float(kid.compute()[0]), rel=1e-9)
    with pytest.warns(DeprecationWarning, match="subsets"):  # the old subset option: accepted, ignored
        assert M.kid_from_features(fake, ref, n_boot=10, subsets=50).value == ours.value


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


def test_resampled_moments_match_torch():
    """The batched weighted means and covariances of the bootstrap equal those of the resampled sets."""
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 5
    idx = M._boot_indices(300, 4, 0)
    mu, cov = M._weighted_moments(x, M._boot_weights(300, 4, 0))
    for b in range(4):
        assert torch.allclose(mu[b], x[idx[b]].mean(0)) and torch.allclose(cov[b], torch.cov(x[idx[b]].T))


def test_leave_group_out_moments_keep_the_design():
    """A stratified deletion replaces one class's mean and covariance by its kept samples' and leaves the class
    sizes of the pooled estimate as they were; an unlabelled set just drops the group."""
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3
    strata = M._strata(torch.arange(40) % 4, 40)
    mu, cov, kept, full, _ = M._leave_group_out_moments(x, strata)
    idx = strata[0]
    dropped = idx[M._jackknife_groups(len(idx), len(kept) // 4)[0]]
    parts = [x[s] for s in strata]
    parts[0] = x[[i for i in idx.tolist() if i not in dropped.tolist()]]
    means = torch.stack([p.mean(0) for p in parts])  # each class weighted by its full size, 10 of 40
    pooled = means.mean(0)
    within = sum(9 * torch.cov(p.T) for p in parts)
    between = sum(10 * torch.outer(m, m) for m in means) - 40 * torch.outer(pooled, pooled)
    assert kept[0] == 10 - len(dropped) and full[0] == 10
    assert torch.allclose(mu[0], pooled) and torch.allclose(cov[0], (within + between) / 39)
    mu, cov, kept, _, _ = M._leave_group_out_moments(x, None)
    keep = torch.ones(40, dtype=torch.bool)
    keep[M._jackknife_groups(40, len(kept))[3]] = False
    assert torch.allclose(mu[3], x[keep].mean(0)) and torch.allclose(cov[3], torch.cov(x[keep].T))


def test_stratified_resamples_keep_class_counts():
    labels = torch.arange(120) % 3
    w = M._boot_weights(120, 5, 0, M._strata(labels, 120))
    for c in range(3):
        assert (w[:, labels == c].sum(1) == 40).all()
    assert M._strata(torch.tensor([0, 0, 0, 1, 1]), 5) is None  # a class of two samples: taken as i.i.d.
    x = torch.randn(130, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = M.Reference("features-test", "custom", x, torch.arange(130) % 10)
    few = torch.cat([torch.zeros(126), torch.ones(3)]).long()  # a class of 3: the smallest that keeps its stratum
    fd = M.fd_from_features(x[:129] + 0.1, ref, n_boot=20, labels=few)
    assert np.isfinite([fd.value, fd.low, fd.high]).all()


def test_measurement_record():
    m = M.Measurement("fd", 1.23456, 1.0, 1.5, 300, "features-digits", "note")
    assert repr(m) == "fd = 1.235 [1, 1.5] (n=300, features-digits)"
    assert m.short() == "1.23 [1, 1.5]" and m.short(2) == "1.2 [1, 1.5]"
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


def test_class_share_distance_separates_balanced_from_collapsed_sets():
    # the judge's logits: a balanced real set of four classes, a held-out balanced set, and a set the judge
    # assigns to one class only (the blobs an unfinished model makes)
    def logits_for(classes):
        return F.one_hot(torch.as_tensor(classes), 4).float() * 5

    real = logits_for(torch.arange(1000) % 4)
    balanced = logits_for(torch.arange(256) % 4)
    collapsed = logits_for(torch.full((256,), 3))
    same = M.class_share_distance(balanced, real, "judge")
    assert same.value == pytest.approx(0.0) and same.low >= 0 and same.high < 0.15
    worst = M.class_share_distance(collapsed, real, "judge")
    assert worst.value == pytest.approx(0.75) and worst.low > 0.7
    assert M.class_shares(collapsed) == [0.0, 0.0, 0.0, 1.0]
    half = logits_for(torch.cat([torch.arange(128) % 4, torch.full((128,), 3)]))
    assert M.class_share_distance(half, real, "judge").value == pytest.approx(0.375)
    with pytest.raises(ValueError, match="5 and 4 classes"):
        M.class_share_distance(F.one_hot(torch.arange(256) % 5, 5).float(), real, "judge")
    with pytest.raises(ValueError, match="at least 20 samples"):
        M.class_share_distance(balanced[:5], real, "judge")


def test_shapes_judge_reads_real_test_images_as_real():
    from companion.data import shapes
    from companion.quality import shapes_judge

    x, _ = shapes("test", 32)
    judged = shapes_judge(x[:256])
    acc = judged["judge_test_accuracy"]
    assert acc.n == 1000 and acc.value >= 0.97  # how good a judge judge-shapes is on held-out images
    assert judged["class_share_distance"].feature == "judge-shapes"
    # a subset of the real test images is sorted like the whole test set: well inside the 0.15 margin
    assert judged["class_share_distance"].high < 0.15
    assert len(judged["shares"]) == 4 and sum(judged["shares"]) == pytest.approx(1.0, abs=0.01)
    # it is sure of (almost) every real image, and of each of the 256 as of the whole test set
    assert judged["real_confident_share"].n == 1000 and judged["real_confident_share"].value >= 0.95
    assert judged["confident_share"].n == 256 and judged["confident_share"].value >= 0.95


def test_shapes_judge_is_unsure_of_blobs_and_pools_them_into_few_classes():
    """What the judge makes of images with no shape in them: each of the four real classes blurred into a blob (a
    7x7 box blur, three times) is no longer read as its class, and the distance of the blobs' class shares from the
    real ones grows well past the 0.15 margin chapter 02 judges a model by."""
    from companion.data import shapes
    from companion.quality import shapes_judge

    x, _ = shapes("test", 32)
    blob = x[:256]
    for _ in range(3):
        blob = F.avg_pool2d(F.pad(blob, (3, 3, 3, 3), mode="replicate"), 7, stride=1)
    judged = shapes_judge(blob)
    assert judged["class_share_distance"].low > 0.15
    assert judged["confident_share"].value < judged["real_confident_share"].value


def test_confident_share_counts_sure_predictions():
    sure = torch.tensor([[10.0, 0, 0, 0]] * 30)
    unsure = torch.zeros(30, 4)  # probability 0.25 each
    m = M.confident_share(torch.cat([sure, unsure]), "judge")
    assert m.value == pytest.approx(0.5) and m.n == 60 and m.low < 0.5 < m.high
    assert M.confident_share(sure, "judge", threshold=0.99).value == 1.0
    assert M.confident_share(unsure, "judge", threshold=0.2).value == 1.0
    with pytest.raises(ValueError, match="threshold must lie strictly between 0 and 1, got 1.5"):
        M.confident_share(sure, "judge", threshold=1.5)
    with pytest.raises(ValueError, match="at least 20 samples"):
        M.confident_share(sure[:5], "judge")
