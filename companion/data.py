"""Data sets that work offline: handwritten digits (scikit-learn), 2-D toys with known densities, and more.

Images are float32 tensors of shape (N, C, H, W) with values in [-1, 1]; labels are int64 tensors.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

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
    ``split`` is ``"train"`` (1437 images), ``"test"`` (360, fixed, stratified) or ``"all"``.
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
