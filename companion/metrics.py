"""Quality metrics with sample counts and bootstrap confidence intervals.

Image metrics live in a bundled feature network's space (:mod:`companion.features`; Inception is not
available offline), so each :class:`Measurement` names its feature network and is comparable only with
measurements in the same space:

- Frechet distance (FD, "FID" in a small CNN's space) and KID, computed by torchmetrics
  (``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with a custom ``feature`` module);
- precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020): k-NN
  manifolds in the same space, separating fidelity (precision, density) from diversity (recall, coverage);
- class accuracy of class-conditional samples under the feature network's classifier head;
- distance to a high-accuracy probability-flow ODE solution from the same initial noise (deterministic
  samplers only): separates ODE solvers where FD from a few hundred samples cannot;
- on 2-D toys, exact metrics: average log-likelihood under the true density and energy distance to fresh
  true samples.

Features of an image set are computed once and shared by every metric and every bootstrap resample; the
reference (real-data) features and statistics are cached in memory per feature network and split.
Intervals are seeded percentile bootstraps over the generated samples (the reference set is held fixed).
Functions raise ``ValueError`` when given fewer samples than the metric needs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from . import data
from .features import default_feature_net_name, load_feature_net
from .reference import reference_for

METRICS_VERSION = "1"  # part of bench cache keys: bump when a metric's definition changes

# The least sample counts each metric accepts. FD needs a well-conditioned covariance of the 64-d
# features (n well above the dimension); k-NN manifolds need many more points than k.
MIN_SAMPLES = {"fd": 128, "kid": 50, "prdc": 50, "class_accuracy": 20, "ode_distance": 4, "log_likelihood": 20, "energy_distance": 50}
DEFAULT_BOOTSTRAP = 200
DEFAULT_K = 5
CONFIDENCE = 0.95


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


def _boot_weights(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """How often each sample is drawn in each bootstrap resample: (n_boot, n) float64 counts."""
    idx = _boot_indices(n, n_boot, seed)
    w = torch.zeros(n_boot, n, dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return w


def mean_measurement(name: str, per_sample: torch.Tensor, *, feature=None, note="", n_boot=DEFAULT_BOOTSTRAP, seed=0) -> Measurement:
    """The mean of a per-sample quantity with a bootstrap interval."""
    v = torch.as_tensor(per_sample, dtype=torch.float64).flatten()
    idx = _boot_indices(len(v), n_boot, seed)
    lo, hi = _interval(v[idx].mean(1).numpy())
    return Measurement(name, float(v.mean()), lo, hi, len(v), feature, note)


class PrecomputedFeatures(nn.Module):
    """The ``feature`` module handed to torchmetrics: features are extracted once by the feature network
    and passed through unchanged, so one extraction serves every metric and every bootstrap resample."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(x.shape)}")
        return x


# --------------------------------------------------------------------------------------------- references
class Reference:
    """Real-data features of one feature network and split, with the statistics every metric reuses."""

    def __init__(self, feature: str, split: str, feats: torch.Tensor, labels: torch.Tensor | None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.feature, self.split = feature, split
        self.feats = feats.double()
        self.labels = labels
        d = self.feats.shape[1]
        self.fid = FrechetInceptionDistance(feature=PrecomputedFeatures(d), reset_real_features=False)
        self.fid.update(self.feats, real=True)
        self.mu = self.feats.mean(0)
        self.kid_feats = kid_normalise(self.feats, self.mu)
        self._radii: dict[int, torch.Tensor] = {}
        self._kid_rr: float | None = None

    @property
    def n(self) -> int:
        return self.feats.shape[0]

    def radii(self, k: int) -> torch.Tensor:
        """Distance of every reference point to its k-th nearest other reference point."""
        if k not in self._radii:
            self._radii[k] = _kth_nn_radii(self.feats, k)
        return self._radii[k]


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
def _batched_fd(mu_r, cov_r, mu_f, cov_f) -> torch.Tensor:
    """torchmetrics' Frechet distance formula, batched over the leading axis of ``mu_f``/``cov_f``."""
    a = (mu_f - mu_r).square().sum(-1)
    b = cov_r.trace() + cov_f.diagonal(dim1=-2, dim2=-1).sum(-1)
    c = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum(-1)
    return a + b - 2 * c


def fd_from_features(feats: torch.Tensor, ref: Reference, *, n_boot=DEFAULT_BOOTSTRAP, seed=0) -> Measurement:
    n = len(feats)
    require_samples(n, "fd")
    feats = feats.double()
    metric = ref.fid
    metric.reset()  # keeps the cached real statistics (reset_real_features=False)
    metric.update(feats, real=False)
    value = float(metric.compute())
    # Bootstrap: resample counts w give weighted means/covariances for all resamples at once.
    w = _boot_weights(n, n_boot, seed)
    mu_f = w @ feats / n
    second = torch.einsum("bn,ni,nj->bij", w, feats, feats)
    cov_f = (second - n * mu_f[:, :, None] * mu_f[:, None, :]) / (n - 1)
    mu_r = metric.real_features_sum / metric.real_features_num_samples
    cov_r = (metric.real_features_cov_sum - metric.real_features_num_samples * torch.outer(mu_r, mu_r)) / (metric.real_features_num_samples - 1)
    boot = _batched_fd(mu_r, cov_r, mu_f, cov_f).numpy()
    # FD is biased upwards at finite n, and more so on resamples (duplicates shrink the effective sample
    # size): shift the percentile interval by the bootstrap bias so it brackets the estimate.
    bias = float(np.mean(boot)) - value
    lo, hi = _interval(boot)
    lo, hi = max(lo - bias, 0.0), hi - bias
    return Measurement("fd", value, lo, hi, n, ref.feature, f"Frechet distance to {ref.split} features (n_ref={ref.n}); bias-corrected bootstrap interval")


def frechet_distance(images: torch.Tensor, reference: str | torch.Tensor | Reference = "train", *, feature: str | None = None,
                     n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """Frechet distance between ``images`` and real data in a bundled feature space (lower is better)."""
    require_samples(len(images), "fd")
    feats, _, name = extract(images, feature)
    return fd_from_features(feats, _as_reference(reference, name), n_boot=n_boot, seed=seed)


def kid_normalise(feats: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Centre on the reference mean and scale every feature vector to norm sqrt(d).

    The cubic kernel on raw ReLU features is dominated by a few large activations (estimates with a
    spread of thousands); on vectors of norm sqrt(d) it is bounded (x.y/d in [-1, 1]), so KID is too.
    """
    x = feats.double() - mu
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torchmetrics' KID kernel: (x.y / d + 1)^3
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid_from_features(feats: torch.Tensor, ref: Reference, *, n_boot=DEFAULT_BOOTSTRAP, seed=0, subsets: int = 50) -> Measurement:
    from torchmetrics.image.kid import KernelInceptionDistance

    n = len(feats)
    require_samples(n, "kid")
    f = kid_normalise(feats, ref.mu)
    r = ref.kid_feats
    size = min(1000, n, ref.n)
    with warnings.catch_warnings():  # the features are in memory already: its memory warning does not apply
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(f.shape[1]), subsets=subsets, subset_size=size)
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng():  # torchmetrics draws its subsets from the global generator
        torch.manual_seed(int(seed))
        value = float(kid.compute()[0])
    # Interval: bootstrap of the full-set unbiased MMD^2 over the generated samples, from the kernel matrices
    # once. A resample is a count vector w; pairs of distinct originals sum to w^T K w - sum_i w_i^2 K_ii
    # (pairs of copies of one sample are left out: they would act as self-similarities and bias it).
    if ref._kid_rr is None:
        k_rr = _poly_kernel(r, r)
        ref._kid_rr = float((k_rr.sum() - k_rr.diagonal().sum()) / (ref.n * (ref.n - 1)))
    k_ff = _poly_kernel(f, f)
    k_rf_col = _poly_kernel(r, f).mean(0)  # (n,)
    w = _boot_weights(n, n_boot, seed)
    ff = ((w @ k_ff) * w).sum(1) - (w * w) @ k_ff.diagonal()
    boot = ref._kid_rr + ff / (n * n - (w * w).sum(1)) - 2 * (w @ k_rf_col) / n
    lo, hi = _interval(boot.numpy())
    return Measurement("kid", value, lo, hi, n, ref.feature, f"KID (cubic kernel, centred unit-scaled features) vs {ref.split} (n_ref={ref.n})")


def kernel_distance(images: torch.Tensor, reference: str | torch.Tensor | Reference = "train", *, feature: str | None = None,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Measurement:
    """KID between ``images`` and real data (unbiased; ~0 for matching distributions; lower is better)."""
    require_samples(len(images), "kid")
    feats, _, name = extract(images, feature)
    return kid_from_features(feats, _as_reference(reference, name), n_boot=n_boot, seed=seed)


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


# --------------------------------------------------------------------------------------------- all at once
IMAGE_METRICS = ("fd", "kid", "prdc", "class_accuracy")


def evaluate_images(images: torch.Tensor, labels=None, *, metrics=IMAGE_METRICS, feature: str | None = None,
                    reference: str | torch.Tensor | Reference = "train", k: int = DEFAULT_K,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Measurement]:
    """Every requested image metric from one feature extraction. ``class_accuracy`` needs ``labels``
    (it is skipped for unconditional samples, where ``labels`` is None)."""
    unknown = [m for m in metrics if m not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown image metric(s) {unknown}; valid: {', '.join(IMAGE_METRICS)}")
    feats, logits, name = extract(images, feature)
    ref = _as_reference(reference, name)
    out: dict[str, Measurement] = {}
    if "fd" in metrics:
        out["fd"] = fd_from_features(feats, ref, n_boot=n_boot, seed=seed)
    if "kid" in metrics:
        out["kid"] = kid_from_features(feats, ref, n_boot=n_boot, seed=seed)
    if "prdc" in metrics:
        out.update(prdc_from_features(feats, ref, k=k, n_boot=n_boot, seed=seed))
    if "class_accuracy" in metrics and labels is not None:
        out["class_accuracy"] = accuracy_from_logits(logits, labels, name, n_boot=n_boot, seed=seed)
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
