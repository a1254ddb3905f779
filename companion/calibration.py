"""Calibrating the metrics: populations whose FD and MMD^2 are known exactly, and what sample size does to FD.

A feature-space metric is only as trustworthy as its interval. Two checks answer that with numbers instead of
assurances, and both are used by the metrics chapter and by ``tests/test_metrics_coverage.py``:

* **Closed-form Gaussians** (:func:`digits_like_gaussians`): two 64-d Gaussian populations shaped like the bundled
  digits features (their 11 largest covariance eigenvalues, then a geometric tail, a positive mean as ReLU features
  have). Their FD and the cubic-kernel MMD^2 that KID estimates have closed forms (:func:`closed_form_fd`,
  :func:`population_mmd2`), so a 95 % interval's coverage can be counted over seeded trials
  (:func:`coverage_trials`).
* **Sample size** (:func:`fd_by_sample_size`): the plug-in FD (torchmetrics' number) against the bias-corrected one
  on nested subsets of one feature set: the plug-in value falls as n grows, roughly like 1/n, although the
  population has not changed.
"""
from __future__ import annotations

import torch
from scipy.stats import beta

from . import metrics as M

D = 64
# The bundled digits features' largest covariance eigenvalues (rounded); their tail falls from 0.045 to 0.002
# (and 20 dead features); a geometric tail from 0.045 keeps the covariance full rank.
TOP_EIGENVALUES = (30.65, 19.30, 12.91, 8.06, 6.56, 4.36, 1.39, 0.75, 0.47, 0.28, 0.076)

Population = tuple[torch.Tensor, torch.Tensor]  # (mean, covariance), float64


def _float(*shape, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def digits_like_gaussians(seed: int = 0) -> tuple[Population, Population]:
    """(reference, generated) Gaussian populations in 64-d: the generated mean is moved along the top directions,
    its variances are off by up to +-10 % and its axes turned slightly; FD ~ 4.4, on the order of the chapters' gaps."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(_float(D, D, g=g))
    q = q * torch.sign(torch.diagonal(r))
    tail = 0.045 * 0.9 ** torch.arange(D - len(TOP_EIGENVALUES), dtype=torch.float64)
    lam = torch.cat([torch.tensor(TOP_EIGENVALUES, dtype=torch.float64), tail])
    mu = 0.5 + 1.5 * torch.rand(D, generator=g, dtype=torch.float64)
    mu_f = mu + q[:, :3] @ torch.tensor([0.8, -0.5, 0.33], dtype=torch.float64)
    scale = 1 + 0.1 * (2 * torch.rand(D, generator=g, dtype=torch.float64) - 1)
    a = _float(D, D, g=g)
    q_f = torch.linalg.matrix_exp(0.02 * (a - a.T)) @ q
    return (mu, (q * lam) @ q.T), (mu_f, (q_f * (lam * scale)) @ q_f.T)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp_min(0).sqrt()) @ v.T


def closed_form_fd(p: Population, q: Population) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the population FD the estimators aim at."""
    (mu1, s1), (mu2, s2) = p, q
    r = _psd_sqrt(s1)
    cross = _psd_sqrt(r @ s2 @ r).trace()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def cubic_kernel_mean(p: Population, q: Population) -> float:
    """E (X.Y/d + 1)^3 for independent X ~ N(a, A), Y ~ N(b, B), from the normal moments of X.Y given Y:
    E[X.Y | Y] = a.Y = s, E[(X.Y)^2 | Y] = s^2 + Y^T A Y, E[(X.Y)^3 | Y] = s^3 + 3 s Y^T A Y."""
    (a, big_a), (b, big_b) = p, q
    d = a.numel()
    m, v = a @ b, a @ big_b @ a  # s ~ N(m, v)
    quad = b @ big_a @ b + (big_a * big_b).sum()  # E[Y^T A Y]
    e1 = m / d
    e2 = (m * m + v + quad) / d**2
    e3 = (m**3 + 3 * m * v + 3 * (m * quad + 2 * a @ big_b @ big_a @ b)) / d**3
    return float(1 + 3 * e1 + 3 * e2 + e3)


def population_mmd2(p: Population, q: Population) -> float:
    """MMD^2 of the cubic kernel between N(p) and N(q): what KID estimates."""
    return cubic_kernel_mean(p, p) + cubic_kernel_mean(q, q) - 2 * cubic_kernel_mean(p, q)


def draw(p: Population, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` samples of the Gaussian ``p`` (float64)."""
    mu, s = p
    return mu + _float(n, mu.numel(), g=g) @ torch.linalg.cholesky(s).T


METRICS = {"fd": (M.fd_from_features, closed_form_fd), "kid": (M.kid_from_features, lambda ref, gen: population_mmd2(gen, ref))}


def coverage_trials(metric: str, n: int, trials: int, *, n_ref: int = 1438, identical: bool = False, n_boot: int = 100,
                    seed: int = 2024) -> tuple[float, list[M.Measurement]]:
    """(truth, measurements): ``trials`` seeded repetitions of ``metric`` ("fd" or "kid") between ``n`` samples of
    the generated population (of the reference's own with ``identical``: truth 0) and a fresh reference set of
    ``n_ref`` samples. Count how often ``low <= truth <= high`` to get the coverage of the 95 % intervals."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    for name, value in (("n", n), ("trials", trials), ("n_ref", n_ref)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    M.require_samples(n, metric)
    estimate, population = METRICS[metric]
    ref_pop, gen_pop = digits_like_gaussians()
    truth = 0.0 if identical else population(ref_pop, gen_pop)
    g = torch.Generator().manual_seed(seed)
    found = []
    for t in range(trials):
        ref = M.Reference(f"gaussian-{D}", f"trial {t}", draw(ref_pop, n_ref, g), None)
        found.append(estimate(draw(ref_pop if identical else gen_pop, n, g), ref, n_boot=n_boot, seed=t))
    return truth, found


def hits(measurements: list[M.Measurement], truth: float) -> int:
    """How many of the intervals contain ``truth``."""
    return sum(m.low <= truth <= m.high for m in measurements)


def clopper_pearson(k: int, n: int, confidence: float = M.CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion ``k / n``, e.g. a measured coverage."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def fd_by_sample_size(feats: torch.Tensor, ref: M.Reference, sizes, *, seed: int = 0, n_boot: int = 100) -> list[dict]:
    """Plug-in and bias-corrected FD (with its interval) of the first ``n`` of a fixed random order of ``feats``,
    for each ``n`` in ``sizes``: the same population measured with more or fewer samples."""
    sizes = sorted(int(s) for s in sizes)
    if not sizes or sizes[-1] > len(feats):
        raise ValueError(f"sizes must be non-empty and at most the {len(feats)} features given, got {sizes}")
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
    rows = []
    for n in sizes:
        x = feats[order[:n]]
        m = M.fd_from_features(x, ref, n_boot=n_boot, seed=seed)
        rows.append({"n": n, "plug-in FD": M.plug_in_fd(x, ref), "FD": m.value, "FD low": m.low, "FD high": m.high})
    return rows
