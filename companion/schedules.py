"""Noise levels: the training schedule, sigma tables and their interpolation, and the eps / x0 / v conversions.

Forward process (DDPM, arXiv 2006.11239): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I).
SNR(t) = abar_t / (1 - abar_t); sigma_t = sqrt((1 - abar_t) / abar_t) is the noise level of the
variance-exploding view the Karras/Euler samplers use (x_t / sqrt(abar_t) = x_0 + sigma_t eps).

Time convention. Samplers pass a training timestep ``t`` (int, or fractional for Karras/exponential sigma
schedules). :class:`SigmaMap` maps it to a noise level exactly as diffusers maps noise levels to timesteps
(``_sigma_to_t``: linear interpolation of log-sigma on the integer training grid), from the scheduler's own
float32 ``alphas_cumprod``. Every module that needs a noise level gets it here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMScheduler

from .device import randn

# The training noise schedule of every bundled diffusion model. The linear schedule is used on purpose:
# with the cosine schedule alphas_cumprod[999] ~ 2e-9 (sigma_max ~ 2e4) and eight diffusers samplers then
# silently return pure noise (see the foundations chapter). tests/test_models.py checks every sampler on it.
TRAIN_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
PARAMETERISATIONS = ("epsilon", "sample", "v_prediction")
# What a companion network may predict: any parameterisation (the models convert to eps before a sampler sees it).
PREDICTIONS = PARAMETERISATIONS


def alphas_cumprod(schedule: str | dict = "linear", num_train_timesteps: int = 1000) -> torch.Tensor:
    """abar_t for t = 0..T-1, computed by diffusers' own DDPMScheduler (float64)."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not valid; choose one of {list(SCHEDULES)}")
        cfg = dict(TRAIN_SCHEDULE, num_train_timesteps=num_train_timesteps, **SCHEDULES[schedule])
    else:
        cfg = dict(schedule)
    return DDPMScheduler.from_config(cfg).alphas_cumprod.double()


def snr(schedule: str | dict = "linear") -> torch.Tensor:
    a = alphas_cumprod(schedule)
    return a / (1 - a)


def sigma_max(schedule: str | dict = "linear") -> float:
    """The largest VE noise level sqrt((1 - abar)/abar) a sampler starts from (huge for the cosine schedule)."""
    a = alphas_cumprod(schedule)[-1]
    return float(((1 - a) / a).sqrt())


def noise(x0: torch.Tensor, t: int, seed: int = 0, schedule: str | dict = "linear") -> torch.Tensor:
    """A sample of q(x_t | x_0) with seeded noise."""
    a = alphas_cumprod(schedule)
    if not 0 <= t < len(a):
        raise ValueError(f"t={t} is out of range; valid: 0..{len(a) - 1}")
    at = a[t].to(x0.dtype)
    return at.sqrt() * x0 + (1 - at).sqrt() * randn(x0.shape, seed, dtype=x0.dtype)


def convert(pred: torch.Tensor, x_t: torch.Tensor, abar: float | torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert a network output between parameterisations (``epsilon``, ``sample`` = x0, ``v_prediction``).

    With a = sqrt(abar), s = sqrt(1 - abar): x_t = a x0 + s eps and v = a eps - s x0 (Salimans & Ho, 2202.00512).
    """
    for name in (src, dst):
        if name not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation {name!r} is not valid; choose one of {PARAMETERISATIONS}")
    abar = torch.as_tensor(abar, dtype=x_t.dtype)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if src == "epsilon":
        eps = pred
        x0 = (x_t - s * eps) / a
    elif src == "sample":
        x0 = pred
        eps = (x_t - a * x0) / s
    else:
        x0 = a * x_t - s * pred
        eps = s * x_t + a * pred
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[dst]


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What a network predicting ``prediction`` is trained to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    (v = alpha eps - sigma x0)."""
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    if prediction == "v_prediction":
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0
    raise ValueError(f"prediction={prediction!r} is not valid; choose one of {', '.join(PARAMETERISATIONS)}")



# ---------------------------------------------------------------------------------------------- noise levels


def abar_from_sigma(sigma):
    """abar = 1 / (1 + sigma^2): the VP signal fraction at VE noise level sigma (float or tensor)."""
    return 1.0 / (1.0 + sigma * sigma)


def train_sigmas(scheduler_config: dict | None = None) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) on the integer training grid, from diffusers' own alphas_cumprod.

    Computed from the same float32 ``alphas_cumprod`` the schedulers hold, then kept in float64.
    """
    cfg = dict(scheduler_config or TRAIN_SCHEDULE)
    abar = DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float64)
    return ((1 - abar) / abar).sqrt()


class SigmaMap:
    """Maps fractional training timesteps to noise levels and back, exactly as diffusers does."""

    def __init__(self, scheduler_config: dict | None = None):
        self.sigmas = train_sigmas(scheduler_config)
        self.log_sigmas = self.sigmas.log()
        self.n = len(self.sigmas)
        self._tables: dict = {}

    def check(self, t: torch.Tensor) -> None:
        """Refuse timesteps outside [0, n-1] (needs the values on the host)."""
        t = torch.as_tensor(t).detach().to("cpu", torch.float64)
        if torch.any(t < 0) or torch.any(t > self.n - 1):
            raise ValueError(f"timestep {t.min().item()}..{t.max().item()} outside the training grid [0, {self.n - 1}]")

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) for t in [0, n-1]: log-sigma interpolated linearly between grid points (the inverse of
        diffusers' ``_sigma_to_t``); integer t gives the grid value exactly."""
        t = torch.as_tensor(t, dtype=torch.float64)
        self.check(t)
        lo = t.floor().clamp(max=self.n - 2).long()
        w = t - lo
        ls = self.log_sigmas.to(t.device)
        return torch.exp((1 - w) * ls[lo] + w * ls[lo + 1])

    def sigma_on(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """sigma(t) computed where ``device`` is, from a table copied there once (float64 where the device has
        it): no host round trip, so the call can be recorded in a CUDA graph. No range check (see :meth:`check`)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        ls = self._tables.get(device)
        if ls is None:
            ls = self._tables[device] = self.log_sigmas.to(device, dtype)
        tt = t.detach().to(device, dtype)
        lo = tt.floor().clamp(max=self.n - 2).long()
        w = tt - lo
        return torch.exp((1 - w) * ls[lo] + w * ls[lo + 1])

    def sqrt_one_minus_abar(self, t) -> float:
        """sqrt(1 - abar) at one (possibly fractional) timestep t."""
        sigma = float(self.sigma(torch.tensor(float(t))))
        return sigma / math.sqrt(1 + sigma**2)

    def t(self, sigma) -> np.ndarray:
        """t(sigma): diffusers' ``_sigma_to_t`` (clamped to the grid)."""
        log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
        ls = self.log_sigmas.numpy()
        dists = log_sigma - ls[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(ls) - 2)
        w = np.clip((ls[low] - log_sigma) / (ls[low] - ls[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)


def sigma_map(model) -> SigmaMap:
    """The :class:`SigmaMap` of ``model``'s training schedule, built once per model (kept on the model)."""
    smap = getattr(model, "_companion_sigma_map", None)
    if smap is None:
        smap = SigmaMap(model.scheduler_config)
        try:
            model._companion_sigma_map = smap
        except AttributeError:
            pass
    return smap


def x0_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = alpha x_t - sigma v (VP scaling: x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0)."""
    return alpha * x_t - sigma * v


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = sigma x_t + alpha v (VP scaling)."""
    return sigma * x_t + alpha * v


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma (VP scaling): an x0-predicting network's output as noise."""
    return (x_t - alpha * x0) / sigma


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, sqrt_one_minus_abar: float) -> torch.Tensor:
    """The denoised estimate x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), x_t in VP scaling."""
    s = sqrt_one_minus_abar
    return (x_t - s * eps) / math.sqrt(1.0 - s * s)
