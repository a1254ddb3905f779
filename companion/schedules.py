"""Noise schedules of the forward process, and the eps / x0 / v parameterisations.

Forward process (DDPM, arXiv 2006.11239): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I).
SNR(t) = abar_t / (1 - abar_t); sigma_t = sqrt((1 - abar_t) / abar_t) is the noise level of the
variance-exploding view the Karras/Euler samplers use (x_t / sqrt(abar_t) = x_0 + sigma_t eps).
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .device import randn
from .models import TRAIN_SCHEDULE

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
PARAMETERISATIONS = ("epsilon", "sample", "v_prediction")


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
