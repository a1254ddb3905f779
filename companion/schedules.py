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


class _RelativeError(torch.nn.Module):
    """A denoiser whose noise prediction is off by a relative ``error`` (eps_hat = (1 + error) eps): a stand-in
    for a trained network's imperfection, applied to an exact oracle so the error's size is known."""

    def __init__(self, oracle, error: float):
        super().__init__()
        self.oracle, self.error = oracle, float(error)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.oracle, name)

    def predict_noise(self, x, t, class_labels=None, cond=None):
        return (1.0 + self.error) * self.oracle.predict_noise(x, t, class_labels, cond)


def schedule_trap_table(samplers=("ddim", "euler", "heun", "dpmpp_2m", "unipc", "deis"), steps: int = 20, seed: int = 0,
                        batch: int = 128, eps_error: float = 0.0):
    """Measure which samplers survive a model trained with the cosine schedule.

    An exact-score Gaussian mixture is configured with the linear and the cosine training schedule; each sampler
    runs with its default step spacing and with ``leading`` spacing. ``eps_error`` makes the denoiser's noise
    prediction off by that relative amount, like a trained network: an error in eps becomes an error of
    sigma * eps_error in the predicted clean image, and sigma_max is ~2e4 under the cosine schedule.
    A run is "ok" when the samples land on the data (|x| <= 1.5: the mixture lives in [-1, 1]); otherwise the
    table gives the order of magnitude of the largest value, or the error the sampler raised.
    """
    import math

    import pandas as pd

    from .oracle import GaussianMixtureOracle
    from .samplers import REGISTRY
    from .sampling import sample

    g = torch.Generator().manual_seed(0)
    means = torch.rand((4, 16), generator=g, dtype=torch.float64) * 1.2 - 0.6
    oracles = {name: GaussianMixtureOracle(means, stds=0.1, sample_shape=(1, 4, 4), name=f"mixture-{name}",
                                           scheduler_config=dict(TRAIN_SCHEDULE, **SCHEDULES[name]))
               for name in ("linear", "cosine")}

    def verdict(oracle, sampler, spacing):
        if eps_error:
            oracle = _RelativeError(oracle, eps_error)
        try:
            x = sample(oracle, sampler=sampler, steps=steps, spacing=spacing, seed=seed, batch=batch).samples
        except Exception as e:  # a refusal or a detected divergence is an honest outcome to show
            return f"error: {type(e).__name__}"
        m = float(x.abs().max())
        if not math.isfinite(m):
            return "non-finite"
        return "ok" if m <= 1.5 else f"off the data (max |x| ~ 1e{int(math.floor(math.log10(m)))})"

    rows = []
    for s in samplers:
        default = REGISTRY[s].default_spacing
        rows.append({
            "sampler": REGISTRY[s].name,
            "default spacing": default,
            "linear schedule": verdict(oracles["linear"], s, None),
            "cosine schedule": verdict(oracles["cosine"], s, None),
            "cosine + leading": verdict(oracles["cosine"], s, "leading") if "leading" in REGISTRY[s].spacings else "n/a",
        })
    return pd.DataFrame(rows)
