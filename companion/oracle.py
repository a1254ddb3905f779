"""The exact-score laboratory: denoisers whose noise prediction is known exactly, reference ODE solutions,
and measured convergence orders of samplers.

A network's samples mix two errors: the network's (it only approximates the score) and the sampler's
(it discretises an ODE/SDE). The oracles here remove the first one. :class:`GaussianMixtureOracle` knows the
exact noise prediction of a mixture of isotropic Gaussians; :class:`EmpiricalOracle` is the ideal denoiser
that knows every training image (a mixture of zero-width Gaussians: a softmax-weighted mean of the data).
Both implement the :class:`companion.models.DiffusionModel` interface, so every registry sampler runs on
them unchanged; :func:`companion.reference.solve_ode` integrates the probability-flow ODE on them from the
same initial noise, and :func:`companion.orders.convergence_order` measures a sampler's order against it.

Time convention. Samplers pass a training timestep ``t`` (int, or fractional for Karras/exponential sigma
schedules). It is mapped to a noise level exactly as diffusers maps noise levels to timesteps
(``_sigma_to_t``: linear interpolation of log-sigma on the integer training grid), using the scheduler's own
float32 ``alphas_cumprod``. The oracle is therefore exact for the noise level the sampler assumes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys

import numpy as np
import torch

from .schedules import TRAIN_SCHEDULE, SigmaMap

# ---------------------------------------------------------------------------------------------- oracles


class GaussianMixtureOracle(torch.nn.Module):
    """Exact noise prediction of a mixture of isotropic Gaussians N(mu_k, s_k^2 I), weights w_k.

    At noise level sigma (VP scaling alpha = 1/sqrt(1 + sigma^2)) the marginal of x_t is the mixture of
    N(alpha mu_k, (alpha^2 s_k^2 + 1 - alpha^2) I), so the score and eps = -sqrt(1 - alpha^2) * score are
    closed-form. Computed in float64; returns the dtype of ``x``.

    ``means`` is (K, *sample_shape) or (K, D) with ``sample_shape`` given; ``stds`` (K,) or a scalar (0 allowed:
    a point mass); ``weights`` (K,) (normalised here).
    """

    kind = "oracle"

    def __init__(self, means, stds=0.1, weights=None, *, sample_shape=None, name="gaussian-mixture",
                 scheduler_config: dict | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must be (K, *sample_shape), got shape {tuple(means.shape)}")
        shape = tuple(sample_shape) if sample_shape is not None else tuple(means.shape[1:])
        k = means.shape[0]
        if math.prod(shape) != math.prod(means.shape[1:]):
            raise ValueError(f"sample_shape {shape} does not match means of shape {tuple(means.shape)}")
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if torch.any(stds < 0):
            raise ValueError("stds must be >= 0")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or torch.any(weights <= 0):
            raise ValueError(f"weights must be {k} positive numbers")
        self.register_buffer("means", means.reshape(k, -1))
        self.register_buffer("variances", stds**2)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.sample_shape = shape
        self.image_shape = shape
        self.name = name
        self.scheduler_config = dict(scheduler_config or TRAIN_SCHEDULE)
        self.sigma_map = SigmaMap(self.scheduler_config)
        self.num_classes = None
        self.cond_shape = None
        self.vae = None
        self.card = {"kind": self.kind, "name": name, "components": k, "dim": int(self.means.shape[1])}

    # ------------------------------------------------------------------ DiffusionModel interface
    conditional = False
    is_latent = False

    @property
    def null_class(self):
        raise ValueError(f"oracle {self.name!r} is unconditional: it has no null class")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for buf in (self.means, self.variances, self.log_weights):
            h.update(buf.detach().cpu().numpy().tobytes())
        h.update(json.dumps(self.scheduler_config, sort_keys=True).encode())
        return h.hexdigest()

    def encode(self, images):
        return images

    def decode(self, x):
        return x

    def predict_noise(self, x, t, class_labels=None, cond=None):
        if class_labels is not None or cond is not None:
            raise ValueError(f"oracle {self.name!r} is unconditional: it takes no class labels or cond")
        t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
        sigma = self.sigma_map.sigma(t).to(x.device)
        return self.eps_at_sigma(x, sigma)

    # ------------------------------------------------------------------ exact score
    def posterior_mean(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x_t] at noise level sigma (x in VP scaling)."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(b, 1)
        a2 = 1.0 / (1.0 + sigma**2)  # alpha^2, (B, 1)
        a = a2.sqrt()
        var = a2 * (self.variances[None, :] + sigma**2)  # alpha^2 s_k^2 + (1 - alpha^2), without cancellation at small sigma
        d = xf.shape[1]
        # squared distances |x - a mu_k|^2 via the expansion (cheap for many components)
        x2 = (xf**2).sum(1, keepdim=True)
        m2 = (self.means**2).sum(1)[None, :]
        sq = (x2 - 2 * a * (xf @ self.means.T) + a2 * m2).clamp_min(0)
        logits = self.log_weights[None, :] - 0.5 * sq / var - 0.5 * d * var.log()
        r = (logits - logits.amax(1, keepdim=True)).exp()  # (B, K) responsibilities (torch.softmax is slow in float64 here)
        r = r / r.sum(1, keepdim=True)
        # E[x0 | x_t, k] = mu_k + (a s_k^2 / var_k) (x - a mu_k)
        gain = a * self.variances[None, :] / var  # (B, K)
        mean = r @ self.means + (r * gain).sum(1, keepdim=True) * xf - a * ((r * gain) @ self.means)
        return mean.reshape(x.shape)

    def eps_at_sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact eps at noise level sigma (any sigma >= 0, also between or below the training grid)."""
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1.0 / (1.0 + sig**2).sqrt()
        x64 = x.to(torch.float64)
        x0 = self.posterior_mean(x64, sigma)
        s = sig * a  # sqrt(1 - alpha^2)
        eps = (x64 - a * x0) / s.clamp_min(1e-300)
        return eps.to(x.dtype)

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact samples of the data distribution (for metrics against ground truth)."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=g)
        z = torch.randn((n, self.means.shape[1]), generator=g, dtype=torch.float64)
        x = self.means.cpu()[k] + self.variances.cpu()[k].sqrt()[:, None] * z
        return x.reshape(n, *self.sample_shape).float()


class EmpiricalOracle(GaussianMixtureOracle):
    """The ideal denoiser of a finite data set: E[x0|x_t] is the softmax-weighted mean of the training images.

    A sampler driven by it can only reproduce training images (the "memorising" optimum of the denoising loss).
    ``data`` is (N, *sample_shape), values in the diffusion space (e.g. images in [-1, 1]).
    """

    def __init__(self, data, *, name="empirical", scheduler_config: dict | None = None):
        data = torch.as_tensor(data, dtype=torch.float64)
        super().__init__(data, stds=0.0, name=name, scheduler_config=scheduler_config)
        self.card["kind"] = self.kind
        self.card["images"] = int(data.shape[0])


def toy_mixture(dim_shape=(1, 4, 4), components: int = 4, std: float = 0.15, seed: int = 0) -> GaussianMixtureOracle:
    """A small reproducible mixture in [-1, 1]: random well-separated means, one width, unequal weights."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(dim_shape) if isinstance(dim_shape, (tuple, list)) else (int(dim_shape),)
    d = math.prod(shape)
    means = (torch.rand((components, d), generator=g, dtype=torch.float64) * 1.4 - 0.7)
    weights = torch.linspace(1.0, 2.0, components, dtype=torch.float64)
    return GaussianMixtureOracle(means, stds=std, weights=weights, sample_shape=shape, name=f"mixture{components}-{'x'.join(map(str, shape))}")
