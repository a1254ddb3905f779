"""Data sets that work offline: handwritten digits (scikit-learn), 2-D toys with known densities, and shapes.

Images are float32 tensors of shape (N, C, H, W) with values in [-1, 1]; labels are int64 tensors.

- :func:`digits`: scikit-learn's 1797 handwritten 8x8 digits, upsampled to 16 or 32 pixels.
- :class:`GaussianMixture` (:func:`gaussian_mixture` for named ones), :func:`two_moons`, :func:`swiss_roll`:
  2-D toys. The mixture's log-density and its noise prediction at every noise level are exact, so samplers
  can be measured against the truth.
- :func:`shapes`: procedural RGB scenes (5000 train / 1000 test, 32x32) for the latent-diffusion and
  multi-scale chapters. Why this set: those chapters need images with *real spatial redundancy*. Digits
  upsampled from 8x8 hold no more than 64 numbers, so an autoencoder that downsamples 16x16 by f=4 keeps all
  of them (4x4x4 latents = 64 numbers): no compression happens and the latent chapter would show nothing.
  Smooth gradient backgrounds and flat-coloured, anti-aliased shapes are highly redundant at 32x32 (3072
  numbers), so f=4 latents (8x8x4 = 256 numbers, 12x fewer) are meaningful, and a 16x16 version keeps the
  layout while losing edge detail, which is what a super-resolution stage must add back. The set is
  generated deterministically from fixed seeds (no download), balanced over :data:`SHAPES_CLASSES`.
- :func:`hub_dataset`: MNIST / CIFAR-10 from the Hugging Face Hub when online (optional; fails fast offline).
"""
from __future__ import annotations

import colorsys
import io
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .assets import HUB_TIMEOUT_S, hub_unavailable
from .device import generator
from .errors import DataUnavailable  # noqa: F401  (raised here; defined with the others)

DIGITS_SIZES = (8, 16, 32)
SPLITS = ("train", "test", "all")
# Fixed split: a seeded permutation stratified by class; ~20 % held out for metrics and classifiers.
_SPLIT_SEED = 1234
_TEST_FRACTION = 0.2


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


@lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@lru_cache(maxsize=None)
def _digits_split() -> dict[str, np.ndarray]:
    _, y = _digits_raw()
    rng = np.random.default_rng(_SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * _TEST_FRACTION))])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    return {"train": train, "test": test, "all": np.arange(len(y))}


def digits(size: int = 16, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits (8x8, 10 classes), bilinearly upsampled to ``size``.

    Returns ``(images, labels)``: images (N, 1, size, size) in [-1, 1], labels (N,) in 0..9.
    ``split`` is ``"train"`` (1438 images), ``"test"`` (359, fixed, stratified: 20 % of each class) or ``"all"``.
    """
    _check_choice("size", size, DIGITS_SIZES)
    _check_choice("split", split, SPLITS)
    x, y = _digits_raw()
    idx = _digits_split()[split]
    imgs = torch.from_numpy(x[idx]).unsqueeze(1)
    if size != 8:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    imgs = (imgs.clamp(0, 1) * 2 - 1).contiguous()
    return imgs, torch.from_numpy(y[idx])


# ---------------------------------------------------------------------------------------------------------
# 2-D toys with exactly known densities
# ---------------------------------------------------------------------------------------------------------
class GaussianMixture:
    """A Gaussian mixture in R^D whose density, noised density and noise prediction are exact.

    Under the variance-preserving forward process ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` (``a`` = alpha_bar)
    a mixture stays a mixture: component k becomes N(sqrt(a) mu_k, a S_k + (1 - a) I). Each covariance is
    kept as an eigendecomposition S_k = U_k diag(l_k) U_k^T, so the noised covariance is
    U_k diag(a l_k + 1 - a) U_k^T and its inverse and log-determinant are exact and cheap at every level.
    All arithmetic is float64.

    ``covs`` may be a scalar variance per component (K,), diagonal variances (K, D) or full matrices (K, D, D).
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means, got {tuple(w.shape)}")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.shape == (k,):
            c = torch.diag_embed(c[:, None].expand(k, d))
        elif c.shape == (k, d):
            c = torch.diag_embed(c)
        elif c.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k},), ({k}, {d}) or ({k}, {d}, {d}); got {tuple(c.shape)}")
        c = 0.5 * (c + c.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(c)
        if (evals <= 0).any():
            raise ValueError("every covariance must be positive definite")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = c
        self._evals = evals  # (K, D)
        self._evecs = evecs  # (K, D, D), columns are eigenvectors
        self.dim = d

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @staticmethod
    def _alpha_bar(alpha_bar, n: int) -> torch.Tensor:
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if a.ndim == 0:
            a = a.expand(n)
        if a.shape != (n,):
            raise ValueError(f"alpha_bar must be a scalar or have shape ({n},), got {tuple(a.shape)}")
        if (a <= 0).any() or (a > 1).any():
            raise ValueError("alpha_bar must lie in (0, 1]")
        return a

    def _terms(self, x: torch.Tensor, alpha_bar):
        """Per-sample, per-component quantities of the noised mixture at level ``alpha_bar``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        a = self._alpha_bar(alpha_bar, x.shape[0])[:, None, None]  # (N,1,1)
        diff = x[:, None, :] - a[..., 0].sqrt()[..., None] * self.means[None]  # (N,K,D)
        y = torch.einsum("nkd,kde->nke", diff, self._evecs)  # coordinates in each eigenbasis
        var = a * self._evals[None] + (1 - a)  # (N,K,D)
        logp_k = -0.5 * ((y * y / var).sum(-1) + var.log().sum(-1) + self.dim * np.log(2 * np.pi))
        logp_k = logp_k + self.weights.log()[None]
        return x, y, var, logp_k

    def log_prob(self, x, alpha_bar=1.0) -> torch.Tensor:
        """Exact log-density of the (noised, if ``alpha_bar`` < 1) mixture at ``x`` (N, D); float64 (N,)."""
        _, _, _, logp_k = self._terms(x, alpha_bar)
        return torch.logsumexp(logp_k, dim=1)

    def score(self, x_t, alpha_bar) -> torch.Tensor:
        """Exact score grad_x log p_t(x_t) of the noised mixture; float64 (N, D)."""
        _, y, var, logp_k = self._terms(x_t, alpha_bar)
        resp = torch.softmax(logp_k, dim=1)  # posterior component probabilities (N,K)
        comp = -torch.einsum("nke,kde->nkd", y / var, self._evecs)  # per-component scores (N,K,D)
        return (resp[..., None] * comp).sum(1)

    def eps(self, x_t, alpha_bar) -> torch.Tensor:
        """Exact noise prediction E[eps | x_t] = -sqrt(1 - alpha_bar) * score; float64 (N, D)."""
        x_t = torch.as_tensor(x_t, dtype=torch.float64)
        a = self._alpha_bar(alpha_bar, x_t.shape[0])
        return -(1 - a).sqrt()[:, None] * self.score(x_t, a)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` exact samples (float64 (n, D)), reproducible from ``seed``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        g = generator(seed)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        scaled = z * self._evals[comp].sqrt()
        return self.means[comp] + torch.einsum("nde,ne->nd", self._evecs[comp], scaled)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


def gaussian_mixture(name: str = "ring8") -> GaussianMixture:
    """Named mixtures used by the chapters.

    ``"ring8"``: 8 equal components on a circle of radius 2 (std 0.2); ``"grid25"``: 5x5 grid with spacing 1
    (std 0.1); ``"skewed"``: 3 anisotropic, unequally weighted components.
    """
    _check_choice("name", name, MIXTURES)
    if name == "ring8":
        ang = torch.arange(8, dtype=torch.float64) * (2 * np.pi / 8)
        means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
        return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.2**2))
    if name == "grid25":
        g = torch.arange(-2, 3, dtype=torch.float64)
        means = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        return GaussianMixture(torch.ones(25), means, torch.full((25,), 0.1**2))
    covs = torch.tensor([[[0.30, 0.20], [0.20, 0.30]], [[0.05, 0.0], [0.0, 0.40]], [[0.10, -0.05], [-0.05, 0.10]]])
    return GaussianMixture([0.5, 0.3, 0.2], [[-1.5, -0.5], [1.5, 0.0], [0.0, 1.5]], covs)


MIXTURES = ("ring8", "grid25", "skewed")


def _standardise(x: np.ndarray) -> torch.Tensor:
    x = x - x.mean(0, keepdims=True)
    return torch.from_numpy(x / x.std()).to(torch.float32)


def two_moons(n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """``n`` points of scikit-learn's two moons, centred and scaled to unit overall std; float32 (n, 2)."""
    from sklearn.datasets import make_moons

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return _standardise(x)


def swiss_roll(n: int, seed: int = 0, noise: float = 0.3) -> torch.Tensor:
    """``n`` points of the 2-D swiss roll (scikit-learn's, x and z axes), centred, unit overall std; float32 (n, 2)."""
    from sklearn.datasets import make_swiss_roll

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return _standardise(x[:, [0, 2]])


# ---------------------------------------------------------------------------------------------------------
# shapes: procedural RGB images with real spatial redundancy
# ---------------------------------------------------------------------------------------------------------
SHAPES_CLASSES = ("circle", "square", "triangle", "ring")
SHAPES_SIZES = (16, 32, 64)
_SHAPES_COUNTS = {"train": 5000, "test": 1000}
_SHAPES_SEEDS = {"train": 20221017, "test": 20221018}
_SUPERSAMPLE = 4  # render at 4x and average: anti-aliased edges


def _inside(kind: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) (shape-centred, rotated coordinates) for shapes of radius ``r``."""
    d = np.sqrt(u * u + v * v)
    circle = d <= r
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    # equilateral triangle with circumradius r: three half-planes at distance r/2 from the centre
    tri = np.ones_like(circle)
    for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        tri &= u * np.cos(ang) + v * np.sin(ang) >= -0.5 * r
    ring = (d <= r) & (d >= 0.55 * r)
    return np.select([kind == 0, kind == 1, kind == 2], [circle, square, tri], ring)


def _hsv_to_rgb(h, s, v):
    return np.array([colorsys.hsv_to_rgb(a, b, c) for a, b, c in zip(h, s, v)], dtype=np.float32)


def _render_shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    s = size * _SUPERSAMPLE
    # coordinates in units of 32-pixel images, whatever the output size, so content does not depend on size
    coords = (np.arange(s) + 0.5) / s * 32.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    # background: a smooth linear gradient between two muted colours, in a random direction
    bg_a = _hsv_to_rgb(rng.random(n), rng.uniform(0.1, 0.5, n), rng.uniform(0.15, 0.45, n))
    bg_b = _hsv_to_rgb(rng.random(n), rng.uniform(0.1, 0.5, n), rng.uniform(0.15, 0.45, n))
    bg_dir = rng.uniform(0, 2 * np.pi, n)
    # the main shape (its kind is the label): large, bright, saturated
    main = dict(kind=labels, cx=rng.uniform(11, 21, n), cy=rng.uniform(11, 21, n), r=rng.uniform(7, 11, n),
                rot=rng.uniform(0, 2 * np.pi, n), col=_hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1, n), rng.uniform(0.75, 1, n)))
    # up to two small distractor shapes of any kind, drawn beneath the main one
    n_small = rng.integers(0, 3, n)
    small = [dict(kind=rng.integers(0, len(SHAPES_CLASSES), n), cx=rng.uniform(3, 29, n), cy=rng.uniform(3, 29, n),
                  r=rng.uniform(2, 3.5, n), rot=rng.uniform(0, 2 * np.pi, n),
                  col=_hsv_to_rgb(rng.random(n), rng.uniform(0.5, 1, n), rng.uniform(0.6, 1, n)), on=n_small > j)
             for j in range(2)]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        t = ((xx - 16) * np.cos(bg_dir[i]) + (yy - 16) * np.sin(bg_dir[i])) / 45.0 + 0.5
        img = bg_a[i][:, None, None] * (1 - t) + bg_b[i][:, None, None] * t
        for sh in [*(sm for sm in small if sm["on"][i]), main]:
            c, sn = np.cos(sh["rot"][i]), np.sin(sh["rot"][i])
            dx, dy = xx - sh["cx"][i], yy - sh["cy"][i]
            m = _inside(np.asarray(sh["kind"][i]), c * dx + sn * dy, -sn * dx + c * dy, sh["r"][i])
            img = np.where(m[None], sh["col"][i][:, None, None], img)
        out[i] = img.reshape(3, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))
    return out, labels.astype(np.int64)


@lru_cache(maxsize=None)
def _shapes_split(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _render_shapes(_SHAPES_COUNTS[split], size, _SHAPES_SEEDS[split])
    return torch.from_numpy(x * 2 - 1), torch.from_numpy(y)


def shapes(split: str = "train", size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural RGB shapes: smooth gradient backgrounds, one large coloured shape and up to two small ones.

    Returns ``(images, labels)``: images (N, 3, size, size) float32 in [-1, 1]; labels (N,) int64, the kind
    of the large shape, an index into :data:`SHAPES_CLASSES`. ``split`` is ``"train"`` (5000 images),
    ``"test"`` (1000, drawn from a different seed) or ``"all"`` (train then test). Deterministic: the same
    images on every call and machine. ``size`` 16, 32 or 64 renders the same scenes at that resolution.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("size", size, SHAPES_SIZES)
    if split == "all":
        xs, ys = zip(*(_shapes_split(s, size) for s in ("train", "test")))
        return torch.cat(xs), torch.cat(ys)
    x, y = _shapes_split(split, size)
    return x.clone(), y.clone()


IMAGE_SETS = ("digits", "shapes")


def images(name: str, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The image set ``name`` (``"digits"`` or ``"shapes"``) at ``size`` pixels: what a recipe trains on.

    Shapes below 32 pixels are 2x2 (4x4, ...) average-pooled 32x32 images rather than scenes rendered at that
    size, so a low-resolution base model and the super-resolution stage above it see the same scenes.
    """
    if name == "digits":
        return digits(size, split)
    if name == "shapes":
        x, y = shapes(split, 32)
        if size != 32:
            x = F.avg_pool2d(x, 32 // size)
        return x, y
    raise ValueError(f"unknown image set {name!r}; valid: {', '.join(IMAGE_SETS)}")


# ---------------------------------------------------------------------------------------------------------
# optional: standard data sets from the Hugging Face Hub (needs the network the first time)
# ---------------------------------------------------------------------------------------------------------
# name -> (dataset repo, parquet file per split, image column); plain HTTP through huggingface_hub's cache.
HUB_DATASETS = {
    "mnist": ("ylecun/mnist", {"train": "mnist/train-00000-of-00001.parquet", "test": "mnist/test-00000-of-00001.parquet"}, "image"),
    "cifar10": ("uoft-cs/cifar10", {"train": "plain_text/train-00000-of-00001.parquet", "test": "plain_text/test-00000-of-00001.parquet"}, "img"),
}


def _hub_file(repo: str, filename: str, timeout: float) -> str:
    from huggingface_hub import constants, hf_hub_download

    try:  # a cached copy works offline
        return hf_hub_download(repo, filename, repo_type="dataset", local_files_only=True)
    except Exception:
        pass
    url = f"{constants.ENDPOINT}/datasets/{repo}"
    why = hub_unavailable(timeout)
    if why:
        raise DataUnavailable(
            f"{repo}/{filename} is not in the Hugging Face cache and the Hub ({url}) is not reachable ({why}). "
            f"Connect to the internet (and unset HF_HUB_OFFLINE) to download it once, or use the offline sets "
            f"companion.data.digits() and companion.data.shapes()."
        )
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout * 4)))
    return hf_hub_download(repo, filename, repo_type="dataset")


def hub_dataset(name: str, split: str = "train", *, timeout: float = HUB_TIMEOUT_S) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or CIFAR-10 from the Hugging Face Hub (parquet files, no torchvision, no ``datasets``).

    Returns ``(images, labels)`` like :func:`digits`: images (N, C, H, W) float32 in [-1, 1]
    (MNIST 1x28x28, CIFAR-10 3x32x32), labels int64. Files are cached by ``huggingface_hub``; uncached and
    offline it raises :class:`DataUnavailable` within about ``timeout`` seconds instead of hanging.
    Reading parquet needs ``pyarrow`` (``pip install pyarrow``).
    """
    _check_choice("name", name, tuple(HUB_DATASETS))
    _check_choice("split", split, ("train", "test"))
    repo, files, column = HUB_DATASETS[name]
    path = _hub_file(repo, files[split], timeout)
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataUnavailable(f"reading {path} needs pyarrow: pip install pyarrow") from e
    from PIL import Image

    table = pq.read_table(path, columns=[column, "label"]).to_pydict()
    arrays = [np.asarray(Image.open(io.BytesIO(cell["bytes"])), dtype=np.uint8) for cell in table[column]]
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(table["label"], dtype=torch.int64)
