"""Quality metrics with sample counts and bootstrap confidence intervals.

Image metrics live in a bundled feature network's space (:mod:`companion.features`; Inception is not
available offline), so each :class:`Measurement` names its feature network and is comparable only with
measurements in the same space:

- Frechet distance (FD, "FID" in a small CNN's space), bias-corrected (below);
- KID: the unbiased MMD^2 with the cubic kernel (x.y/d + 1)^3. ``"kid"`` is the standard KID on the raw
  feature vectors (Binkowski et al. 2018, torchmetrics); ``"kid_normalised"`` is a variant on features centred
  on the reference mean and scaled to norm sqrt(d), bounded and so less noisy, but a different number;
- precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020): k-NN
  manifolds in the same space, separating fidelity (precision, density) from diversity (recall, coverage);
- class accuracy of class-conditional samples under the feature network's classifier head;
- distance to a high-accuracy probability-flow ODE solution from the same initial noise (deterministic
  samplers only): separates ODE solvers where FD from a few hundred samples cannot;
- on 2-D toys, exact metrics: average log-likelihood under the true density and energy distance to fresh
  true samples.

FD and KID are estimates of population quantities from two finite sets, and their intervals say so:

- The plug-in FD (torchmetrics' number, :func:`plug_in_fd`) is biased upwards by O(d/n + d/n_ref): with 64-d
  features and 128 samples by more than many differences a chapter compares. The reported FD subtracts that
  bias, extrapolated in 1/n for each set (Chong & Forsyth 2019) from leave-one-group-out fits (a grouped
  jackknife with fixed groups, so the value does not depend on the bootstrap seed). It scatters around the
  population FD, around 0 for matching distributions, and is then sometimes slightly negative: it is not clipped.
- KID's U-statistic is unbiased as it is; the value is computed over all pairs of the two sets.
- Intervals of FD and KID come from bootstrap resamples of the generated AND the reference features (a
  percentile interval centred on the value), so the reference set's sampling error is in them; the
  reference's resampled statistics are cached per reference and seed. tests/test_metrics_coverage.py checks
  their coverage on Gaussian features with a known FD and MMD^2 (91-99 % in runs of 100-200 trials at n = 128,
  256 and 2000 against 1438 reference samples). They are conservative (wider than needed) near FD = 0 and for
  class-balanced sets.
- Class-balanced samples and the stratified data splits are not i.i.d. draws: pass the classes as ``labels``
  and the bias correction, the KID pairs and the resamples keep the strata. Without them a stratified set is
  taken as i.i.d. and its FD is over-corrected (too low).

Other intervals are seeded percentile bootstraps over the generated samples. Features of an image set are
computed once and shared by every metric and every bootstrap resample; the reference (real-data) features
and statistics are cached in memory per feature network and split. Functions raise ``ValueError`` when given
fewer samples than the metric needs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .features import default_feature_net_name, load_feature_net
from .reference import reference_for

METRICS_VERSION = "2"  # part of bench cache keys: bump when a metric's definition changes (2: bias-corrected FD,
# standard KID on raw features, intervals over both sets)

# The least sample counts each metric accepts. FD needs a well-conditioned covariance of the 64-d
# features (n well above the dimension); k-NN manifolds need many more points than k.
MIN_SAMPLES = {"fd": 128, "kid": 50, "kid_normalised": 50, "prdc": 50, "class_accuracy": 20, "ode_distance": 4,
               "log_likelihood": 20, "energy_distance": 50, "clip_score": 4,
               "confident_share": 20}
DEFAULT_BOOTSTRAP = 200
DEFAULT_K = 5
CONFIDENCE = 0.95
JACKKNIFE_GROUPS = 50  # leave-one-group-out subsets per set (shared among its strata) for FD's bias extrapolation
# The reference's bootstrap resamples use seed + this, so they are not the same index draws as the generated set's
# when the two sets have the same size (which would couple two resamples that must be independent).
REFERENCE_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Measurement:
    """One measured number: ``value`` with a ``CONFIDENCE`` bootstrap interval [``low``, ``high``] from ``n`` samples."""

    name: str
    value: float
    low: float
    high: float
    n: int
    feature: str | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def overlaps(self, other: "Measurement") -> bool:
        """Whether the two intervals share any value."""
        return self.low <= other.high and other.low <= self.high

    def short(self, digits: int = 3) -> str:
        """``"value [low, high]"`` with ``digits`` significant digits: a table cell."""
        return f"{self.value:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"

    def __repr__(self) -> str:
        space = f", {self.feature}" if self.feature else ""
        return f"{self.name} = {self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n}{space})"

    __str__ = __repr__


# --------------------------------------------------------------------------------------------- helpers
def require_samples(n: int, metric: str, minimum: int | None = None) -> None:
    """Raise ``ValueError`` when ``n`` samples are too few for ``metric``."""
    minimum = MIN_SAMPLES[metric] if minimum is None else minimum
    if n < minimum:
        raise ValueError(f"{metric} needs at least {minimum} samples, got {n}; sample more (estimates from fewer are too noisy to compare)")


def _interval(boot: np.ndarray) -> tuple[float, float]:
    a = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(np.asarray(boot, dtype=np.float64), [a, 1 - a])
    return float(lo), float(hi)


def _boot_indices(n: int, n_boot: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def _boot_weights(n: int, n_boot: int, seed: int, strata: list[torch.Tensor] | None = None) -> torch.Tensor:
    """How often each sample is drawn in each bootstrap resample: (n_boot, n) float64 counts.

    With ``strata`` (index sets, see :func:`_strata`) each resample redraws every stratum within itself, so
    it keeps the class counts the set was drawn with."""
    if strata is None:
        idx = _boot_indices(n, n_boot, seed)
    else:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.cat([s[torch.randint(0, len(s), (n_boot, len(s)), generator=g)] for s in strata], 1)
    w = torch.zeros(n_boot, n, dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return w


def _strata(labels, n: int) -> list[torch.Tensor] | None:
    """Index sets of the classes of a set drawn with fixed counts per class (class-balanced samples, the
    stratified data splits), or None for an unlabelled set, taken as drawn i.i.d.

    Stratified sets vary less than i.i.d. ones (the class proportions do not vary), so their FD bias, their
    KID pair structure and their resamples must keep the strata. A set with a class of fewer than 3 samples
    is taken as i.i.d.: a class's covariance with one sample left out needs two left."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).flatten().cpu()
    if len(labels) != n:
        raise ValueError(f"got {n} samples but {len(labels)} labels")
    strata = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    return strata if min(len(s) for s in strata) >= 3 else None


def mean_measurement(name: str, per_sample: torch.Tensor, *, feature=None, note="", n_boot=DEFAULT_BOOTSTRAP, seed=0) -> Measurement:
    """The mean of a per-sample quantity with a bootstrap interval."""
    v = torch.as_tensor(per_sample, dtype=torch.float64).flatten()
    idx = _boot_indices(len(v), n_boot, seed)
    lo, hi = _interval(v[idx].mean(1).numpy())
    return Measurement(name, float(v.mean()), lo, hi, len(v), feature, note)


class PrecomputedFeatures(nn.Module):
    """A torchmetrics ``feature`` module that passes precomputed features through unchanged, for checking this
    module's FD and KID against torchmetrics' on the same features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(x.shape)}")
        return x


# --------------------------------------------------------------------------------------------- references
class Reference:
    """Real-data features of one feature network and split, with the statistics every metric reuses.

    FD and KID intervals resample the reference set too; its resampled statistics depend only on the
    reference, ``n_boot`` and the seed, so they are computed once per (n_boot, seed) and kept (the last few).
    """

    _KEEP = 8  # cached resample sets per reference (a few MB each): a sweep uses a handful of seeds

    def __init__(self, feature: str, split: str, feats: torch.Tensor, labels: torch.Tensor | None):
        self.feature, self.split = feature, split
        self.feats = feats.double()
        self.labels = labels
        self.mu = self.feats.mean(0)
        self.strata = _strata(labels, len(self.feats))  # the data splits are stratified by class
        self._radii: dict[int, torch.Tensor] = {}
        self._stats: dict[tuple, object] = {}  # of the whole set: kept
        self._resamples: dict[tuple, object] = {}  # per (n_boot, seed): the last _KEEP

    @property
    def n(self) -> int:
        return self.feats.shape[0]

    @property
    def kid_feats(self) -> torch.Tensor:
        """The reference features of the ``kid_normalised`` variant (centred on their mean, norm sqrt(d))."""
        return self._cached(("kid_feats",), lambda: kid_normalise(self.feats, self.mu))

    def radii(self, k: int) -> torch.Tensor:
        """Distance of every reference point to its k-th nearest other reference point."""
        if k not in self._radii:
            self._radii[k] = _kth_nn_radii(self.feats, k)
        return self._radii[k]

    def _cached(self, key: tuple, make: Callable, resampled: bool = False):
        cache = self._resamples if resampled else self._stats
        if key not in cache:
            if resampled and len(cache) >= self._KEEP:
                cache.pop(next(iter(cache)))  # the oldest
            cache[key] = make()
        return cache[key]

    def fd_side(self) -> "_FDSide":
        """Mean, covariance square root and trace of the whole reference set."""
        return self._cached(("fd",), lambda: _FDSide.of(self.mu, torch.cov(self.feats.T)))

    def fd_leave_group_out(self) -> tuple["_FDSide", list[torch.Tensor]]:
        """The same with each jackknife group left out in turn, and the sizes kept (for the bias correction)."""
        def make():
            mu, cov, *sizes = _leave_group_out_moments(self.feats, self.strata)
            return _FDSide.of(mu, cov), sizes
        return self._cached(("fd_groups",), make)

    def fd_resamples(self, n_boot: int, seed: int) -> "_FDSide":
        """The same for ``n_boot`` bootstrap resamples of the reference (seed offset from the generated set's)."""
        def make():
            w = _boot_weights(self.n, n_boot, seed + REFERENCE_SEED_OFFSET, self.strata)
            return _FDSide.of(*_weighted_moments(self.feats, w))
        return self._cached(("fd", n_boot, seed), make, resampled=True)

    def kid_resamples(self, normalised: bool, n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(KID features, resample counts (n_boot + 1, n) with the all-ones row first, mean kernel value over
        pairs of distinct reference samples for each row)."""
        def make():
            r = self.kid_feats if normalised else self.feats
            w = _with_full_row(_boot_weights(self.n, n_boot, seed + REFERENCE_SEED_OFFSET, self.strata))
            return r, w, _within_pair_means(r, w, self.strata)
        return self._cached(("kid", normalised, n_boot, seed), make, resampled=True)


_REFERENCES: dict[tuple, Reference] = {}


REFERENCE_SIZES = {"digits": 16, "shapes": 32}  # the resolution each feature network measures at


def _real_data(dataset: str, split: str):
    if dataset not in REFERENCE_SIZES:
        raise ValueError(f"no real data set {dataset!r} for reference statistics; valid: {', '.join(REFERENCE_SIZES)}")
    return data.images(dataset, REFERENCE_SIZES[dataset], split)


def reference(feature: str = "features-digits", split: str = "train", images: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> Reference:
    """Reference statistics of real data in ``feature``'s space (cached in memory per network and split).

    By default the real data is the data set the feature network was trained for (its card's ``dataset``),
    ``split`` ``"train"``, ``"test"`` or ``"all"``. Pass ``images`` to use another real set (not cached).
    """

    net = load_feature_net(feature)
    if images is not None:
        feats, _ = net.extract(images)
        return Reference(feature, "custom", feats, labels)
    key = (feature, net.sha256, split)
    if key not in _REFERENCES:
        x, y = _real_data(net.card["dataset"], split)
        feats, _ = net.extract(x)
        _REFERENCES[key] = Reference(feature, split, feats, y)
    return _REFERENCES[key]


def _as_reference(ref, feature: str) -> Reference:
    if isinstance(ref, Reference):
        if ref.feature != feature:
            raise ValueError(f"reference is in {ref.feature!r} space but the metric was asked for {feature!r}")
        return ref
    if isinstance(ref, str):
        return reference(feature, ref)
    if torch.is_tensor(ref):
        return reference(feature, images=ref)
    raise TypeError(f"reference must be a split name ('train', 'test', 'all'), an image tensor or a Reference, got {type(ref).__name__}")


def _feature_name(images: torch.Tensor, feature: str | None) -> str:

    return feature or default_feature_net_name(images.shape[1:])


def extract(images: torch.Tensor, feature: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(features, logits, feature-net name) of an image set; images (N, C, H, W) in [-1, 1]."""

    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ValueError(f"{bad} of {len(images)} images contain NaN or inf: the sampler diverged; metrics would be meaningless")
    name = _feature_name(images, feature)
    feats, logits = load_feature_net(name).extract(images)
    return feats.double(), logits, name


# --------------------------------------------------------------------------------------------- FD and KID
# Both statistics are computed for the full sets and for every bootstrap resample by one code path: a row of
# resample counts ``w`` (all ones for the sets themselves) gives weighted means, covariances and kernel sums.
def _with_full_row(w: torch.Tensor) -> torch.Tensor:
    """Prepend the all-ones row (the set itself) to bootstrap counts (B, n): row 0 is the estimate."""
    return torch.cat([torch.ones(1, w.shape[1], dtype=w.dtype), w])


def _outer(v: torch.Tensor) -> torch.Tensor:
    return v[..., :, None] * v[..., None, :]


def _weighted_moments(x: torch.Tensor, w: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (B, d) and unbiased covariances (B, d, d) of resamples given by counts ``w`` (B, n), each summing to n.

    All resamples' second moments come from one matrix product of the counts with the samples' outer
    products (upper triangles only, in chunks of samples to bound memory): much faster than a batch of
    small products. Centred on the full mean first, so the second moments do not cancel catastrophically
    for features with a large mean and a small spread."""
    n, d = x.shape
    centre = x.mean(0)
    xc = x - centre
    rows, cols = torch.triu_indices(d, d)
    second = torch.zeros(len(w), len(rows), dtype=x.dtype)
    for i in range(0, n, chunk):
        part = xc[i:i + chunk]
        second += w[:, i:i + chunk] @ (part[:, rows] * part[:, cols])
    mu = w @ xc / n
    cov = torch.empty(len(w), d, d, dtype=x.dtype)
    cov[:, rows, cols] = second
    cov[:, cols, rows] = second
    return mu + centre, (cov - n * _outer(mu)) / (n - 1)


def _jackknife_groups(n: int, groups: int) -> list[torch.Tensor]:
    """``groups`` disjoint index sets covering 0..n-1, dealt out from a fixed (seeded) random order, so the
    bias correction and hence the value do not depend on the bootstrap seed, and an ordered set (e.g. by
    class) is not cut into unlike pieces."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return [order[g::groups] for g in range(groups)]


def _leave_group_out_moments(x: torch.Tensor, strata: list[torch.Tensor] | None):
    """Pooled mean and covariance of ``x`` with one jackknife group of one stratum left out, for every group.

    Returns (means (J, d), covariances (J, d, d), kept stratum sizes (J,), full stratum sizes (J,), share (J,):
    1 / groups in that stratum). An unlabelled set is one stratum. The estimate is a function of the strata's
    means m_k and covariances S_k with their sizes n_k fixed by the design:
    (n - 1) S = sum_k (n_k - 1) S_k + sum_k n_k m_k m_k^T - n mu mu^T, mu = sum_k (n_k / n) m_k; a deletion
    replaces one stratum's m_k, S_k by those of its kept samples and leaves the design (n_k, n) as it is, so
    each stratum's bias extrapolates in 1/n_k (the stratified jackknife); for one stratum this is simply
    the kept samples' mean and covariance."""
    n = x.shape[0]
    strata = strata or [torch.arange(n)]
    per = max(2, math.ceil(JACKKNIFE_GROUPS / len(strata)))
    xc = x - x.mean(0)  # centred: the pooled mean is 0, and the outer products below do not cancel large means
    cov = torch.cov(xc.T)
    out = []
    for idx in strata:
        n_k = len(idx)
        m_k = xc[idx].mean(0)
        z = xc[idx] - m_k
        groups = _jackknife_groups(n_k, min(per, n_k))
        kept = torch.tensor([n_k - len(g) for g in groups], dtype=x.dtype)
        shift = -torch.stack([z[g].sum(0) for g in groups]) / kept[:, None]  # kept mean minus m_k
        second = z.T @ z - torch.stack([z[g].T @ z[g] for g in groups])
        s_kept = (second - kept[:, None, None] * _outer(shift)) / (kept - 1)[:, None, None]
        mu = (n_k / n) * shift
        change = (n_k - 1) * (s_kept - z.T @ z / (n_k - 1)) + n_k * (_outer(m_k + shift) - _outer(m_k)) - n * _outer(mu)
        full = torch.full_like(kept, n_k)
        out.append((mu, cov + change / (n - 1), kept, full, torch.full_like(kept, 1 / len(groups))))
    mu, cov, kept, full, share = (torch.cat(parts) for parts in zip(*out))
    return mu + x.mean(0), cov, kept, full, share


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square roots of (batched) covariance matrices; tiny negative eigenvalues are rounding, set to 0."""
    e, v = torch.linalg.eigh(cov)
    return (v * e.clamp_min(0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


@dataclass(frozen=True)
class _FDSide:
    """What FD needs of one side's covariances: means, square roots and traces (batched over a leading axis)."""

    mu: torch.Tensor
    root: torch.Tensor
    trace: torch.Tensor

    @classmethod
    def of(cls, mu: torch.Tensor, cov: torch.Tensor) -> "_FDSide":
        return cls(mu, _psd_sqrt(cov), cov.diagonal(dim1=-2, dim2=-1).sum(-1))


def _fd(side: _FDSide, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Frechet distance |mu_r - mu|^2 + tr(C_r) + tr(C) - 2 tr((R C R)^1/2), R = C_r^1/2, batched over the
    leading axis. R C R is symmetric with the eigenvalues of C_r C (torchmetrics' form), so eigvalsh applies."""
    a = (mu - side.mu).square().sum(-1)
    eig = torch.linalg.eigvalsh(side.root @ cov @ side.root).clamp_min(0)
    return a + side.trace + cov.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * eig.sqrt().sum(-1)


def _extrapolated_bias(theta: float, left_out: torch.Tensor, kept: torch.Tensor, full: torch.Tensor,
                       share: torch.Tensor) -> float:
    """Bias of an estimate from its values on leave-one-group-out subsets (:func:`_leave_group_out_moments`).

    FD's bias is sum_k b_k / n_k to first order (one term per stratum; Chong & Forsyth 2019, "Effectively
    unbiased FID", arXiv 1911.07023, extrapolate FID in 1/n the same way): a subset's excess over the full
    estimate measures b_k (1/kept - 1/n_k). This is the grouped jackknife; with equal groups it is exact for
    the squared-mean term, whose bias (tr(C)/n for an i.i.d. set) it removes. Preferred to the bootstrap's
    estimate of the bias (mean of the resamples minus the estimate), which does as well on Gaussian features:
    the jackknife's fixed groups make the value a function of the data alone, not of the bootstrap seed."""
    slopes = (left_out - theta) / (1.0 / kept - 1.0 / full)
    return float((share * slopes / full).sum())


def _centred_interval(value: float, boot: torch.Tensor) -> tuple[float, float]:
    """The resamples' percentile interval moved so that their mean sits on ``value``: value + (q - mean).

    ``value`` is bias-corrected while the resamples' mean carries the bias (twice, for FD: a resample's
    statistic is biased about the set's, which is biased about the truth), so the plain percentile interval
    would sit too high. Moving it keeps the resamples' skew in its own orientation. The reflected ("basic")
    interval, value - (q - mean), missed the truth on the low side in 6-10 % of trials on Gaussian features
    (tests/test_metrics_coverage.py): the bootstrap overstates the right skew of FD's and KID's errors (their
    quadratic part), and reflecting it left too little room above the estimate."""
    boot = boot.double()
    lo, hi = _interval(boot.numpy())
    shift = value - float(boot.mean())
    return lo + shift, hi + shift


def _fd_parts(x: torch.Tensor, strata, ref: "Reference", n_boot: int, seed: int) -> tuple[float, float, torch.Tensor]:
    """(plug-in FD, its estimated bias, bootstrap FDs (n_boot,)) of generated features ``x`` against ``ref``."""
    n = len(x)
    mu, cov = x.mean(0), torch.cov(x.T)
    full = ref.fd_side()
    theta = float(_fd(full, mu, cov))
    g_mu, g_cov, *sizes = _leave_group_out_moments(x, strata)
    bias = _extrapolated_bias(theta, _fd(full, g_mu, g_cov), *sizes)
    r_side, r_sizes = ref.fd_leave_group_out()
    bias += _extrapolated_bias(theta, _fd(r_side, mu, cov), *r_sizes)
    b_mu, b_cov = _weighted_moments(x, _boot_weights(n, n_boot, seed, strata))
    boot = _fd(ref.fd_resamples(n_boot, seed), b_mu, b_cov)
    return theta, bias, boot


def _checked_features(feats: torch.Tensor, ref: "Reference", metric: str) -> torch.Tensor:
    require_samples(len(feats), metric)
    require_samples(ref.n, metric)
    if feats.ndim != 2 or feats.shape[1] != ref.feats.shape[1]:
        raise ValueError(f"features must have shape (N, {ref.feats.shape[1]}) like the reference's, got {tuple(feats.shape)}")
    return feats.double()


def plug_in_fd(feats: torch.Tensor, ref: "Reference") -> float:
    """The uncorrected Frechet distance of the two sets' means and covariances (torchmetrics' number). It is
    biased upwards by O(d/n + d/n_ref): larger than the population FD, the more so the fewer samples."""
    x = _checked_features(feats, ref, "fd")
    return float(_fd(ref.fd_side(), x.mean(0), torch.cov(x.T)))


def fd_from_features(feats: torch.Tensor, ref: Reference, *, n_boot=DEFAULT_BOOTSTRAP, seed=0, labels=None) -> Measurement:
    """Bias-corrected Frechet distance of generated features to ``ref`` with a bootstrap interval over both sets.

    Value: the plug-in FD minus its finite-sample bias, extrapolated in 1/n for each set separately
    (:func:`_extrapolated_bias`). It estimates the population FD without the upward bias, so for matching
    distributions it scatters around 0 and may be slightly negative; it is not clipped (clipping would bias it
    again). Interval: the bootstrap distribution from ``n_boot`` resamples of the generated AND the reference
    features, centred on the value (:func:`_centred_interval`), so it also carries the reference set's
    sampling error.

    ``labels``: the classes class-conditional samples were drawn for (fixed counts per class). Bias and
    resamples then keep those strata, as they keep the reference's (its split is stratified by class);
    without labels the samples are taken as drawn i.i.d."""
    x = _checked_features(feats, ref, "fd")
    theta, bias, boot = _fd_parts(x, _strata(labels, len(x)), ref, n_boot, seed)
    value = theta - bias
    lo, hi = _centred_interval(value, boot)
    note = (f"bias-corrected Frechet distance to {ref.split} features (n_ref={ref.n}; plug-in {theta:.4g}); "
            "bootstrap interval over generated and reference samples")
    return Measurement("fd", value, lo, hi, len(x), ref.feature, note)


def frechet_distance(images: torch.Tensor, reference: str | torch.Tensor | Reference = "train", *, feature: str | None = None,
                     n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, labels=None) -> Measurement:
    """Bias-corrected Frechet distance between ``images`` and real data in a bundled feature space (lower is
    better; ~0, possibly slightly negative, for matching distributions). See :func:`fd_from_features`."""
    require_samples(len(images), "fd")
    feats, _, name = extract(images, feature)
    return fd_from_features(feats, _as_reference(reference, name), n_boot=n_boot, seed=seed, labels=labels)


def kid_normalise(feats: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Centre on the reference mean and scale every feature vector to norm sqrt(d) (the ``kid_normalised`` variant).

    The cubic kernel on raw ReLU features is dominated by a few large activations; on vectors of norm sqrt(d)
    it is bounded (x.y/d in [-1, 1]). It is not the KID of the literature: a different number (lightly noised
    held-out digits: 1.29 standard vs 0.081 normalised) that compares only with other ``kid_normalised`` values.
    """
    x = feats.double() - mu
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torchmetrics' KID kernel (Binkowski et al. 2018): (x.y / d + 1)^3
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _kernel_products(x: torch.Tensor, w: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(w^T K w for each row of counts ``w`` (B, n), diagonal of K) for the kernel matrix K of ``x``, built
    in row blocks so a reference of several thousand samples never needs n x n at once."""
    n = x.shape[0]
    kw = torch.zeros_like(w)
    diag = torch.empty(n, dtype=x.dtype)
    for i in range(0, n, block):
        k = _poly_kernel(x[i:i + block], x)
        kw += w[:, i:i + block] @ k
        diag[i:i + block] = k.diagonal(i)
    return (kw * w).sum(1), diag


def _within_pair_means(x: torch.Tensor, w: torch.Tensor, strata: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Unbiased estimate of E k(X, X') within one set, for each row of resample counts ``w`` (B, n).

    Only pairs of distinct originals count: a resample's pairs within a group of samples sum to
    w^T K w - sum_i w_i^2 K_ii (pairs of copies of one sample would act as self-similarities and bias it), so
    with w = 1 this is the U-statistic. For a stratified set (class p_k = n_k / n fixed) the pairs of one
    class estimate E k(X_k, X_k') and pairs across classes E k(X_k, X_l), weighted p_k p_l: the i.i.d.
    U-statistic would under-weight same-class pairs by O(1/n) and bias KID downwards."""
    n = x.shape[0]
    total, diag = _kernel_products(x, w)
    if strata is None:
        return (total - (w * w) @ diag) / (n * n - (w * w).sum(1))
    cross, within = total, torch.zeros_like(total)
    for idx in strata:
        wk = w[:, idx]
        same, _ = _kernel_products(x[idx], wk)
        copies = (wk * wk) @ diag[idx]
        cross = cross - same
        within = within + (len(idx) / n) ** 2 * (same - copies) / (len(idx) ** 2 - (wk * wk).sum(1))
    return cross / (n * n) + within


def _kid_parts(f: torch.Tensor, strata, r: torch.Tensor, w_r: torch.Tensor, rr: torch.Tensor, n_boot: int,
               seed: int) -> torch.Tensor:
    """Unbiased MMD^2 of the sets (row 0) and of ``n_boot`` paired resamples of both (rows 1:)."""
    n, m = len(f), len(r)
    w_f = _with_full_row(_boot_weights(n, n_boot, seed, strata))
    ff = _within_pair_means(f, w_f, strata)
    rf = ((w_r @ _poly_kernel(r, f)) * w_f).sum(1) / (n * m)
    return rr + ff - 2 * rf


def kid_from_features(feats: torch.Tensor, ref: Reference, *, n_boot=DEFAULT_BOOTSTRAP, seed=0, subsets: int | None = None,
                      normalised: bool = False, labels=None) -> Measurement:
    """KID: the unbiased estimate of MMD^2 with the cubic kernel (x.y/d + 1)^3, with a bootstrap interval over
    both sets.

    ``normalised=False`` (standard KID, name ``"kid"``): the kernel on the raw feature vectors, as in Binkowski et
    al. 2018 and torchmetrics. ``normalised=True`` (name ``"kid_normalised"``): on features centred on the
    reference mean and scaled to norm sqrt(d) (:func:`kid_normalise`); bounded, so less noisy, but a different
    number. The value is the U-statistic over all pairs (what torchmetrics' average over random subsets
    estimates, without the subset noise); ``subsets`` is accepted for compatibility and ignored.
    Interval: bootstrap over resamples of the generated and the reference features
    (:func:`_centred_interval`); for the normalised variant the centring is held at the full reference mean
    in every resample. ``labels``: as for :func:`fd_from_features` (class-balanced samples are a stratified
    design; so is the reference split).
    """
    if subsets is not None:
        warnings.warn("kid_from_features(subsets=...) is ignored: KID is the unbiased MMD^2 over all pairs",
                      DeprecationWarning, stacklevel=2)
    name = "kid_normalised" if normalised else "kid"
    x = _checked_features(feats, ref, name)
    r, w_r, rr = ref.kid_resamples(normalised, n_boot, seed)
    f = kid_normalise(x, ref.mu) if normalised else x
    est = _kid_parts(f, _strata(labels, len(x)), r, w_r, rr, n_boot, seed)
    value = float(est[0])
    lo, hi = _centred_interval(value, est[1:])
    space = "features centred on the reference mean and scaled to norm sqrt(d)" if normalised else "raw features"
    note = f"KID (unbiased MMD^2, cubic kernel on {space}) vs {ref.split} (n_ref={ref.n}); bootstrap interval over both sets"
    return Measurement(name, value, lo, hi, len(x), ref.feature, note)


def kernel_distance(images: torch.Tensor, reference: str | torch.Tensor | Reference = "train", *, feature: str | None = None,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, normalised: bool = False, labels=None) -> Measurement:
    """KID between ``images`` and real data (unbiased; ~0 for matching distributions; lower is better).
    Standard KID on raw features unless ``normalised`` (see :func:`kid_from_features`)."""
    require_samples(len(images), "kid_normalised" if normalised else "kid")
    feats, _, name = extract(images, feature)
    return kid_from_features(feats, _as_reference(reference, name), n_boot=n_boot, seed=seed, normalised=normalised,
                             labels=labels)


# --------------------------------------------------------------------------------------------- k-NN manifolds
def _kth_nn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    # the k+1-th smallest includes the point itself at distance 0
    return d.kthvalue(k + 1, dim=1).values


def prdc_from_features(feats: torch.Tensor, ref: Reference, *, k: int = DEFAULT_K, n_boot=DEFAULT_BOOTSTRAP, seed=0) -> dict[str, Measurement]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(feats)
    require_samples(n, "prdc")
    require_samples(ref.n, "prdc")
    real, generated = ref.feats, feats.double()
    r_real = ref.radii(k)  # (N,)
    r_generated = _kth_nn_radii(generated, k)  # (M,)
    d = torch.cdist(real, generated)  # (N, M)
    in_real_ball = d <= r_real[:, None]  # real i's ball contains generated j
    per_generated_precision = in_real_ball.any(0).double()
    per_generated_density = in_real_ball.sum(0).double() / k
    per_real_recall = (d <= r_generated[None, :]).any(1).double()
    per_real_coverage = (d.min(1).values <= r_real).double()
    note = f"k={k}, reference {ref.split} (n_ref={ref.n}); interval over samples with the manifolds held fixed"
    out = {}
    for name, v, s in (("precision", per_generated_precision, seed), ("recall", per_real_recall, seed + 1),
                       ("density", per_generated_density, seed + 2), ("coverage", per_real_coverage, seed + 3)):
        m = mean_measurement(name, v, feature=ref.feature, note=note, n_boot=n_boot, seed=s)
        out[name] = Measurement(name, m.value, m.low, m.high, n, ref.feature, note)
    return out


def precision_recall(images: torch.Tensor, reference: str | torch.Tensor | Reference = "train", *, feature: str | None = None,
                     k: int = DEFAULT_K, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Measurement]:
    """Precision, recall, density and coverage of ``images`` against real data (k-NN manifolds; higher is better)."""
    require_samples(len(images), "prdc")
    feats, _, name = extract(images, feature)
    return prdc_from_features(feats, _as_reference(reference, name), k=k, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------- class accuracy
def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor, feature: str, *, n_boot=DEFAULT_BOOTSTRAP, seed=0) -> Measurement:
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != len(logits):
        raise ValueError(f"got {len(logits)} images but {len(labels)} labels")
    require_samples(len(labels), "class_accuracy")
    hit = (logits.argmax(1) == labels).double()
    return mean_measurement("class_accuracy", hit, feature=feature, note="fraction classified as the requested class", n_boot=n_boot, seed=seed)


def class_accuracy(images: torch.Tensor, labels, *, feature: str | None = None, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """Fraction of class-conditional samples that the feature network classifies as the requested class."""
    _, logits, name = extract(images, feature)
    return accuracy_from_logits(logits, labels, name, n_boot=n_boot, seed=seed)


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    return F.one_hot(logits.argmax(1), logits.shape[1]).double()


def class_shares(logits: torch.Tensor, digits: int = 3) -> list[float]:
    """The share of images a classifier assigns to each class (its argmax), rounded to ``digits``."""
    return [round(float(v), digits) for v in _predicted(logits).mean(0)]


def class_share_distance(logits: torch.Tensor, reference_logits: torch.Tensor, feature: str, *,
                         n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """How differently a classifier ("the judge") sorts generated and real images: the total-variation distance
    ``0.5 * sum_c |p_c - q_c|`` between the shares of its predicted classes on the generated set (``logits``) and
    on real images (``reference_logits``). 0: it finds every class as often as in the data; 1: no overlap.

    For an *unconditional* model there is no requested class to score accuracy against; a model whose samples are
    recognisable makes the judge find each class about as often as in real data, while blobs it cannot read pile
    into whichever class their texture resembles. Both sets are resampled in the bootstrap (the estimate is biased
    upwards at small n: at 256 samples of four balanced classes by about 0.04)."""
    require_samples(len(logits), "class_accuracy")
    require_samples(len(reference_logits), "class_accuracy")
    if logits.shape[1] != reference_logits.shape[1]:
        raise ValueError(f"the two sets have logits for {logits.shape[1]} and {reference_logits.shape[1]} classes")
    pred, ref = _predicted(logits), _predicted(reference_logits)

    def tv(p, q):
        return 0.5 * (p - q).abs().sum(-1)

    value = float(tv(pred.mean(0), ref.mean(0)))
    shares = pred[_boot_indices(len(pred), n_boot, seed)].mean(1)
    ref_shares = ref[_boot_indices(len(ref), n_boot, seed + REFERENCE_SEED_OFFSET)].mean(1)
    lo, hi = _interval(tv(shares, ref_shares).numpy())
    note = (f"total-variation distance of the predicted-class shares, generated {class_shares(logits)} vs real "
            f"{class_shares(reference_logits)} (real n={len(ref)})")
    return Measurement("class_share_distance", value, lo, hi, len(pred), feature, note)


CONFIDENT = 0.9  # a judgement counts as sure when the judge gives its class at least this probability


def confident_share(logits: torch.Tensor, feature: str, *, threshold: float = CONFIDENT,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """The share of images a classifier names with probability >= ``threshold`` (softmax of ``logits``), with a
    bootstrap interval: on unlabelled generated images, how often the judge is sure what it sees (a blob it cannot
    read gets a hedged answer), to set beside the same share on real images."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    require_samples(len(logits), "confident_share")
    sure = (logits.double().softmax(1).max(1).values >= threshold).double()
    return mean_measurement("confident_share", sure, feature=feature, n_boot=n_boot, seed=seed,
                            note=f"share of images whose predicted class has probability >= {threshold}")


# --------------------------------------------------------------------------------------------- text alignment
CLIP_DEFAULT = "openai/clip-vit-base-patch16"  # torchmetrics' CLIP score default


def load_clip(name_or_path: str = CLIP_DEFAULT, *, device=None):
    """``(CLIPModel, CLIPProcessor)`` from the Hub or a local folder (the ``hub`` extra: transformers)."""
    try:
        from transformers import CLIPModel, CLIPProcessor  # optional: the hub extra
    except ImportError as e:
        raise ImportError(f"the CLIP score needs transformers ({e}); install the hub extra: pip install '.[hub]'") from None
    model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).eval()
    return model.to(device or "cpu"), CLIPProcessor.from_pretrained(name_or_path)


_CLIPS: dict[str, tuple] = {}


def clip_pair(clip=CLIP_DEFAULT) -> tuple:
    """``(model, processor)`` for ``clip``: a loaded pair as it is, a Hub id or folder loaded once per process (a
    sweep scores many runs with one CLIP)."""
    if isinstance(clip, tuple):
        return clip
    key = str(clip)
    if key not in _CLIPS:
        _CLIPS[key] = load_clip(key)
    return _CLIPS[key]


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts, *, clip=CLIP_DEFAULT, batch: int = 32, n_boot: int = DEFAULT_BOOTSTRAP,
               seed: int = 0) -> Measurement:
    """CLIP score (Hessel et al., arXiv 2104.08718, as torchmetrics defines it): 100 * max(cos(image, prompt), 0) of
    each image with its prompt in CLIP's joint embedding space, averaged, with a bootstrap interval over images.

    ``images``: (N, 3, H, W) in [-1, 1] (quantised to 8 bits, as a saved image is, before CLIP's own
    preprocessing). ``prompts``: one string for all or N strings. ``clip``: a Hub id or folder (:func:`load_clip`),
    or a loaded ``(model, processor)`` pair. Computed here rather than with torchmetrics' ``clip_score``, which in
    torchmetrics 1.9 fails with transformers 5 (its ``get_image_features`` returns an output object, not a tensor).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_score needs RGB images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    n = len(images)
    require_samples(n, "clip_score")
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"clip_score needs one prompt or {n} prompts (strings), got {len(prompts)}")
    model, processor = clip_pair(clip)
    dev = next(model.parameters()).device
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scores = []
    for i in range(0, n, batch):
        inputs = processor(text=prompts[i : i + batch], images=list(pixels[i : i + batch]), return_tensors="pt",
                           padding=True, truncation=True)
        out = model(**{k: v.to(dev) for k, v in inputs.items()})
        img = F.normalize(out.image_embeds.float(), dim=-1)
        txt = F.normalize(out.text_embeds.float(), dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp(min=0).cpu())
    name = str(clip) if not isinstance(clip, tuple) else (getattr(model, "name_or_path", "") or type(model).__name__)
    return mean_measurement("clip_score", torch.cat(scores), feature=f"CLIP ({name})",
                            note="100 * max(cosine(image, prompt), 0), mean over images", n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------- Inception-FID
INCEPTION = "inception-v3 (torch-fidelity, FID weights)"


def load_inception(dims: int = 2048) -> nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the TensorFlow FID network; its weights are fetched
    on first use). Needs the hub extra: torch-fidelity is kept out of the default install because it pulls torchvision."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)]).eval()
    except ModuleNotFoundError as e:
        raise ImportError(f"Inception-FID needs torch-fidelity ({str(e).splitlines()[0]}); install the hub extra: "
                          f"pip install '.[hub]' (it pulls torchvision; on a CPU machine install torch's CPU wheels first)") from None


@torch.no_grad()
def inception_fd(images: torch.Tensor, reference_images: torch.Tensor, *, inception: nn.Module | None = None,
                 batch: int = 64, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """Frechet distance in Inception-v3 space (FID) between ``images`` and ``reference_images``, both (N, 3, H, W) in
    [-1, 1]: each set quantised to 8 bits, as saved images are, and fed to ``inception`` (default
    :func:`load_inception`, which resizes to 299 px itself). Value and interval as :func:`fd_from_features`
    (bias-corrected, bootstrap over both sets); the note keeps the plug-in value, the number FID tables report, which
    is biased upward at small n: published FIDs use 50,000 samples, so compare only at equal n."""
    for what, x in (("images", images), ("reference_images", reference_images)):
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"inception_fd needs RGB {what} (N, 3, H, W) in [-1, 1], got {tuple(getattr(x, 'shape', ()))}")
        require_samples(len(x), "fd")
    net = inception if inception is not None else load_inception()
    dev = next(net.parameters()).device

    def feats(x: torch.Tensor) -> torch.Tensor:
        pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return torch.cat([net(pixels[i : i + batch].to(dev)).double().cpu() for i in range(0, len(pixels), batch)])

    ref = Reference(INCEPTION if inception is None else type(net).__name__, "reference_images", feats(reference_images), None)
    return fd_from_features(feats(images), ref, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------- all at once
IMAGE_METRICS = ("fd", "kid", "kid_normalised", "prdc", "class_accuracy")
# "kid" is the standard KID (raw features): a number called KID should mean what it means in the literature and
# in torchmetrics; the bounded variant is asked for by its own name.
DEFAULT_IMAGE_METRICS = ("fd", "kid", "prdc", "class_accuracy")


def evaluate_images(images: torch.Tensor, labels=None, *, metrics=DEFAULT_IMAGE_METRICS, feature: str | None = None,
                    reference: str | torch.Tensor | Reference = "train", k: int = DEFAULT_K,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Measurement]:
    """Every requested image metric from one feature extraction. ``class_accuracy`` needs ``labels``
    (it is skipped for unconditional samples, where ``labels`` is None). ``labels`` are the classes the
    samples were drawn for: FD and KID treat them as strata (see :func:`fd_from_features`)."""
    unknown = [m for m in metrics if m not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown image metric(s) {unknown}; valid: {', '.join(IMAGE_METRICS)}")
    feats, logits, name = extract(images, feature)
    return evaluate_features(feats, logits, name, labels, metrics=metrics, reference=reference, k=k, n_boot=n_boot, seed=seed)


def evaluate_features(feats: torch.Tensor, logits: torch.Tensor, feature: str, labels=None, *, metrics=DEFAULT_IMAGE_METRICS,
                      reference: str | torch.Tensor | Reference = "train", k: int = DEFAULT_K,
                      n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Measurement]:
    """:func:`evaluate_images` from features and logits already extracted in ``feature``'s space (e.g. gathered
    from several processes): each requested metric computed once."""
    unknown = [m for m in metrics if m not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown image metric(s) {unknown}; valid: {', '.join(IMAGE_METRICS)}")
    ref = _as_reference(reference, feature)
    out: dict[str, Measurement] = {}
    if "fd" in metrics:
        out["fd"] = fd_from_features(feats, ref, n_boot=n_boot, seed=seed, labels=labels)
    for kid in ("kid", "kid_normalised"):
        if kid in metrics:
            out[kid] = kid_from_features(feats, ref, n_boot=n_boot, seed=seed, normalised=kid == "kid_normalised", labels=labels)
    if "prdc" in metrics:
        out.update(prdc_from_features(feats, ref, k=k, n_boot=n_boot, seed=seed))
    if "class_accuracy" in metrics and labels is not None:
        out["class_accuracy"] = accuracy_from_logits(logits, labels, feature, n_boot=n_boot, seed=seed)
    return out


# --------------------------------------------------------------------------------------------- ODE reference
def ode_distance(samples: torch.Tensor, reference_samples: torch.Tensor, *, stochastic: bool = False, sampler: str = "",
                 n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """RMS distance per sample between a deterministic sampler's outputs and a high-accuracy probability-flow
    ODE solution from the same initial noise (both in diffusion space; lower is better).

    The value is the mean over samples of the per-sample RMS difference. Stochastic samplers (ancestral, SDE,
    DDPM, eta > 0) do not approximate the ODE: they are refused.
    """
    if stochastic:
        raise ValueError(
            f"ode_distance is defined for deterministic samplers only; {sampler or 'this sampler'} is stochastic "
            "(its output does not approximate the probability-flow ODE solution). Use fd/precision_recall instead."
        )
    if samples.shape != reference_samples.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference_samples.shape)} differ in shape")
    require_samples(len(samples), "ode_distance")
    diff = (samples.double() - reference_samples.double()).flatten(1)
    per = diff.pow(2).mean(1).sqrt()
    return mean_measurement("ode_distance", per, note="mean per-sample RMS distance to the reference ODE solution", n_boot=n_boot, seed=seed)


def ode_reference_distance(result, model, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, reference=None, **reference_kwargs) -> Measurement:
    """:func:`ode_distance` for a :func:`companion.sampling.sample` result, against the reference ODE solution (to
    the data end, DOP853) from the result's own initial noise, labels and guidance, from the shared cache of
    :mod:`companion.reference` (or against ``reference`` when given)."""
    rec = result.record
    stochastic = bool(getattr(rec, "stochastic", False))
    if stochastic:
        ode_distance(result.samples, result.samples, stochastic=True, sampler=getattr(rec, "sampler", ""))
    if reference is None:
        reference = reference_for(result, model, **reference_kwargs)
    return ode_distance(result.samples, reference, sampler=getattr(rec, "sampler", ""), n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------- 2-D toys
def log_likelihood(samples: torch.Tensor, density, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """Average exact log-density of ``samples`` (N, D) under the true density (higher is better).

    ``density``: an object with ``log_prob(x)`` (e.g. :class:`companion.data.GaussianMixture`) or a callable.
    """
    x = torch.as_tensor(samples, dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"samples must have shape (N, D), got {tuple(x.shape)}")
    require_samples(len(x), "log_likelihood")
    fn: Callable = density.log_prob if hasattr(density, "log_prob") else density
    lp = torch.as_tensor(fn(x), dtype=torch.float64)
    if not torch.isfinite(lp).all():
        note = f"{int((~torch.isfinite(lp)).sum())} samples have zero density"
    else:
        note = "mean exact log-density under the true distribution"
    return mean_measurement("log_likelihood", lp, note=note, n_boot=n_boot, seed=seed)


def energy_distance(samples: torch.Tensor, reference, *, n_reference: int = 2000, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between ``samples`` and true samples (0 iff equal; lower is better).

    ``reference``: true samples (M, D), or a distribution with ``sample(n, seed)`` from which ``n_reference``
    fresh samples are drawn (seed ``seed + 1``, never the generator's seed). Unbiased (U-statistic) terms.
    """
    x = torch.as_tensor(samples, dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"samples must have shape (N, D), got {tuple(x.shape)}")
    y = reference.sample(n_reference, seed=seed + 1) if hasattr(reference, "sample") else reference
    y = torch.as_tensor(y, dtype=torch.float64)
    if y.ndim != 2 or y.shape[1] != x.shape[1]:
        raise ValueError(f"reference samples must have shape (M, {x.shape[1]}), got {tuple(y.shape)}")
    n, m = len(x), len(y)
    require_samples(n, "energy_distance")
    require_samples(m, "energy_distance")
    d_xy = torch.cdist(x, y).mean(1)  # (n,)
    d_xx = torch.cdist(x, x)
    d_yy = torch.cdist(y, y)
    e_yy = float(d_yy.sum() / (m * (m - 1)))

    def energy(w: torch.Tensor) -> torch.Tensor:
        # w: (B, n) resample counts. d_xx has a zero diagonal, so w^T D w sums the pairs of distinct
        # originals; copies of one sample are left out of the pair count too.
        return 2 * (w @ d_xy) / n - ((w @ d_xx) * w).sum(1) / (n * n - (w * w).sum(1)) - e_yy

    value = float(energy(torch.ones(1, n, dtype=torch.float64))[0])
    lo, hi = _interval(energy(_boot_weights(n, n_boot, seed)).numpy())
    return Measurement("energy_distance", value, lo, hi, n, None, f"vs {m} true samples")


def toy_metrics(samples: torch.Tensor, density, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Measurement]:
    """Both exact 2-D metrics for a toy with a known density that can also be sampled."""
    return {"log_likelihood": log_likelihood(samples, density, n_boot=n_boot, seed=seed),
            "energy_distance": energy_distance(samples, density, n_boot=n_boot, seed=seed)}


def as_columns(measurements: Mapping[str, Measurement]) -> dict:
    """Flatten measurements to table columns: ``name``, ``name_low``, ``name_high``, ``name_n``."""
    row = {}
    for name, m in measurements.items():
        row[name] = m.value
        row[f"{name}_low"] = m.low
        row[f"{name}_high"] = m.high
        row[f"{name}_n"] = m.n
    return row


# --------------------------------------------------------------------------------------------- comparing measurements
# A chapter's claims ("guided is clearly more accurate", "the cascade's FD is better than single-scale") are
# decided on intervals, never on point values alone: two numbers whose intervals overlap are not distinguishable
# at this sample size. These read a Measurement, a (value, low, high) triple or a table row, so a chapter
# decides the same way whichever form its numbers are in.


def interval(m) -> tuple[float, float, float]:
    """``(value, low, high)`` of a :class:`Measurement` or of a ``(value, low, high)`` triple."""
    if isinstance(m, Measurement):
        return m.value, m.low, m.high
    try:
        value, low, high = m
    except (TypeError, ValueError):
        raise TypeError(f"expected a Measurement or a (value, low, high) triple, got {m!r}") from None
    return float(value), float(low), float(high)


def from_columns(row: Mapping, name: str) -> tuple[float, float, float]:
    """``(value, low, high)`` of metric ``name`` from a table row with :func:`as_columns`'s columns
    (``name``, ``name_low``, ``name_high``), e.g. a row of a :func:`companion.bench.sweep` table."""
    missing = [c for c in (name, f"{name}_low", f"{name}_high") if c not in row]
    if missing:
        raise KeyError(f"the row has no column(s) {missing}; columns: {', '.join(map(str, row.keys()))}")
    return float(row[name]), float(row[f"{name}_low"]), float(row[f"{name}_high"])


def clearly_above(a, b) -> bool:
    """Whether ``a``'s whole interval lies above ``b``'s (``a.low > b.high``)."""
    return bool(interval(a)[1] > interval(b)[2])


def clearly_below(a, b) -> bool:
    """Whether ``a``'s whole interval lies below ``b``'s (``a.high < b.low``)."""
    return bool(interval(a)[2] < interval(b)[1])


def compared_with(a, b, reference: str = "base", *, higher_is_better: bool = False) -> str:
    """``a`` against ``b`` in words: ``"better than <reference>"``, ``"worse than <reference>"`` (intervals
    disjoint) or ``"not distinguishable from <reference> (95 % intervals overlap)"``. Lower is better unless
    ``higher_is_better`` (e.g. FD: lower; class accuracy: higher)."""
    above, below = clearly_above(a, b), clearly_below(a, b)
    better, worse = (above, below) if higher_is_better else (below, above)
    if better:
        return f"better than {reference}"
    if worse:
        return f"worse than {reference}"
    return f"not distinguishable from {reference} ({round(100 * CONFIDENCE)} % intervals overlap)"


def fd_triple(images: torch.Tensor, reference="train", *, feature: str | None = None) -> tuple[float, float, float]:
    """Frechet distance of ``images`` clamped to [-1, 1] (as any saved image would be), as ``(value, low, high)``:
    the three table columns a chapter shows (FD, FD low, FD high)."""
    return interval(frechet_distance(images.clamp(-1, 1), reference, feature=feature))


def class_accuracy_quality(model, result) -> float:
    """A panel's per-run quality (``quality=`` of :class:`companion.widgets.SamplerPanel`): the bundled
    classifier's accuracy on the run's images, clamped to [-1, 1] as any saved image would be, against the
    classes they were drawn for. Needs a batch of at least ``MIN_SAMPLES["class_accuracy"]`` (20)."""
    return class_accuracy(result.images.clamp(-1, 1), result.class_labels).value


class_accuracy_quality.label = "class accuracy (higher is better)"  # the panel's axis and record label


def fd_quality(model, result) -> float:
    """A panel's per-run quality: the bias-corrected FD of the run's images (clamped to [-1, 1] as saved images
    are) in the bundled feature space for their size, resampled within the classes they were drawn for. Needs a
    batch of at least ``MIN_SAMPLES["fd"]`` (128); below ~500 its interval is wide (the metrics chapter measures how)."""
    return frechet_distance(result.images.clamp(-1, 1), labels=result.class_labels).value


fd_quality.label = "FD, bias-corrected (lower is better)"
