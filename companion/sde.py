"""Stochastic samplers written out: Euler–Maruyama on the reverse VP-SDE, its probability-flow ODE twin, and
predictor–corrector with a Langevin corrector (Song et al., Score SDE, arXiv 2011.13456).

These are not diffusers schedulers, so they are short functions over the :class:`companion.models.DiffusionModel`
interface (``predict_noise``) and a list of noise levels, in the style of k-diffusion. They return the same
:class:`companion.sampling.SampleResult` / :class:`~companion.sampling.RunRecord` as :func:`companion.sample`,
with the network evaluations actually spent (NFE) counted.

The forward VP-SDE is dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw. Between two noise levels it is fully described
by the integral of beta over the step, B = log(abar_t / abar_s) (abar = 1 / (1 + sigma^2)), whatever the time
parametrisation. One reverse step from level s to the lower level t, with the score
grad log p_s(x) = -eps(x, s) / sqrt(1 - abar_s), is

    Euler–Maruyama:     x_t = x_s + B (x_s / 2 + score) + sqrt(B) z,     z ~ N(0, I)
    probability flow:   x_t = x_s + B (x_s / 2 + score / 2)              (the ODE with the same marginals)

The last step, to sigma = 0, is the denoised estimate x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) for both: the
reverse SDE's drift is singular there, and every diffusers sampler ends the same way. The Langevin corrector
runs, at each noise level before the predictor, ``corrector_steps`` updates x += e * score + sqrt(2 e) z with the
step e = 2 * (1 - beta_t) * (snr * |z| / |score|)^2, with batch-mean norms and beta_t the training schedule's
beta at the level's timestep (Score SDE, Algorithm 5).

States are in VP scaling (what the network sees), noise comes from :func:`companion.device.randn` (initial state)
and a separate seeded CPU generator (per-step noise), so a seed gives the same samples on every device.
"""
from __future__ import annotations

import math
import time

import torch

from . import samplers as registry
from .denoiser import Conditioning, Denoiser, SampleResult, check_args, check_seed, model_device, require_diffusion, resolve_labels
from .device import generator as cpu_generator
from .device import pick_device, randn
from .errors import SamplingError
from .schedules import SigmaMap, abar_from_sigma, sigma_map  # noqa: F401  (SigmaMap: the type _training_alpha takes)

SAMPLERS = ("euler_maruyama", "probability_flow", "predictor_corrector")


def noise_levels(model, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of a ``steps``-step chain: ``steps`` training timesteps with diffusers' *trailing*
    spacing (from the last training step down), their noise levels sigma = sqrt((1 - abar) / abar), and a final
    sigma = 0. ``timesteps`` has ``steps`` entries, ``sigmas`` ``steps + 1`` (float64)."""
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
        raise SamplingError(f"steps must be an int in [1, {n_train}] (the model's training steps), got {steps!r}")
    # diffusers' trailing spacing: round(arange(T, 0, -T/N)) - 1
    ts = torch.round(torch.arange(n_train, 0, -n_train / steps, dtype=torch.float64)) - 1
    ts = ts[:steps]
    sigmas = sigma_map(model).sigma(ts)
    return ts, torch.cat([sigmas, sigmas.new_zeros(1)])


def _training_alpha(smap: SigmaMap, t: float) -> float:
    """1 - beta_t of the training schedule at timestep t (Score SDE's Langevin step-size factor)."""
    a_t = abar_from_sigma(float(smap.sigma(torch.tensor(t))))
    a_prev = abar_from_sigma(float(smap.sigma(torch.tensor(t - 1.0)))) if t >= 1 else 1.0
    return a_t / a_prev


def _mean_norm(v: torch.Tensor) -> float:
    """Batch mean of the per-sample norms (Score SDE's choice: per-sample ratios blow up near a mode in low dimension)."""
    return float(v.flatten(1).norm(dim=1).mean())


def _check(sampler, model, batch, snr, corrector_steps, x_T):
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown SDE-chapter sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SamplingError(f"batch must be a positive int, got {batch!r}")
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise SamplingError(f"snr (the Langevin corrector's signal-to-noise ratio) must be a positive number, got {snr!r}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 1:
        raise SamplingError(f"corrector_steps must be a positive int, got {corrector_steps!r}")
    if x_T is not None and tuple(x_T.shape) != (batch, *model.sample_shape):
        raise SamplingError(f"x_T must have shape {(batch, *model.sample_shape)} (batch, *sample_shape), got {tuple(x_T.shape)}")


@torch.no_grad()
def sample_sde(model, sampler: str = "euler_maruyama", steps: int = 100, *, seed: int = 0, batch: int = 16,
               class_labels=None, guidance: float | None = None, snr: float = 0.16, corrector_steps: int = 1,
               x_T: torch.Tensor | None = None, device=None, progress: bool = False, wrap=None) -> SampleResult:
    """Draw ``batch`` samples with ``sampler`` (one of :data:`SAMPLERS`) in ``steps`` noise levels.

    ``euler_maruyama``: the reverse VP-SDE (stochastic, 1 NFE per step). ``probability_flow``: the same
    discretisation of the probability-flow ODE (deterministic, 1 NFE per step). ``predictor_corrector``:
    ``corrector_steps`` Langevin updates (signal-to-noise ratio ``snr``) then an Euler–Maruyama step at each level
    (1 + ``corrector_steps`` NFE per step). ``class_labels`` / ``guidance``: as in :func:`companion.sample`
    (classifier-free guidance counts 2 NFE per evaluation). ``x_T``: the initial state (VP scaling, unit variance
    for a correct prior); default ``randn(seed)``. ``wrap``: as in :func:`companion.sample`.
    """
    require_diffusion(model, "sample_sde")
    _check(sampler, model, batch, snr, corrector_steps, x_T)
    check_args(model, registry.get("ddpm"), steps, guidance, None, class_labels, None, None, batch, None)
    seed = check_seed(seed)
    dev = pick_device(device) if device is not None else model_device(model)
    t_start = time.perf_counter()
    ts, sigmas = noise_levels(model, steps)
    smap = sigma_map(model)
    labels = resolve_labels(model, class_labels, batch, dev)
    x0_noise = randn((batch, *model.sample_shape), seed) if x_T is None else torch.as_tensor(x_T, dtype=torch.float32).cpu()
    x = x0_noise.to(dev, torch.float32)
    g = cpu_generator(seed + 1)  # a separate stream from the initial noise, as in companion.sample
    step_s = []
    denoiser = Denoiser(model, Conditioning(class_labels=labels), guidance=guidance)
    if wrap is not None:
        denoiser.wrap(wrap)

    def eps_at(x, t):
        return denoiser(x, float(t)).to(torch.float32)

    def noise_like(x):
        return randn(x.shape, g, device=x.device)

    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{sampler} {steps} steps", leave=False)
    for i in iterator:
        s0 = time.perf_counter()
        s, s_next, t = float(sigmas[i]), float(sigmas[i + 1]), ts[i]
        a_s = abar_from_sigma(s)
        if sampler == "predictor_corrector":
            alpha_t = _training_alpha(smap, float(t))
            for _ in range(corrector_steps):
                score = -eps_at(x, t) / math.sqrt(1.0 - a_s)
                z = noise_like(x)
                step = 2.0 * alpha_t * (snr * _mean_norm(z) / max(_mean_norm(score), 1e-12)) ** 2
                x = x + step * score + math.sqrt(2.0 * step) * z
        eps = eps_at(x, t)
        if s_next == 0.0:  # the last step: the denoised estimate
            x = (x - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
        else:
            big_b = math.log(abar_from_sigma(s_next) / a_s)  # integral of beta over the step
            score = -eps / math.sqrt(1.0 - a_s)
            if sampler == "probability_flow":
                x = x + big_b * (0.5 * x + 0.5 * score)
            else:
                x = x + big_b * (0.5 * x + score) + math.sqrt(big_b) * noise_like(x)
        denoiser.check_finite(x, sampler, f"after step {i} of {steps} (sigma {s:.4g} -> {s_next:.4g})")
        step_s.append(time.perf_counter() - s0)

    images, samples = denoiser.finish(x)
    wall = time.perf_counter() - t_start
    record = denoiser.record(
        sampler=sampler, steps=steps, wall_s=wall, step_s=step_s, scheduler_class="companion.sde",
        scheduler_config={"sigmas": [float(v) for v in sigmas], "timesteps": [float(v) for v in ts], "snr": snr,
                          "corrector_steps": corrector_steps},
        seed=seed, batch=batch, spacing="trailing", stochastic=sampler != "probability_flow", device=dev)
    return SampleResult(images=images, samples=samples, record=record, x_T=x0_noise,
                        class_labels=None if labels is None else labels.cpu())


def euler_maruyama(model, steps: int = 100, **kwargs) -> SampleResult:
    """Euler–Maruyama on the reverse VP-SDE (see :func:`sample_sde`)."""
    return sample_sde(model, "euler_maruyama", steps, **kwargs)


def probability_flow(model, steps: int = 100, **kwargs) -> SampleResult:
    """Euler on the probability-flow ODE, same discretisation as :func:`euler_maruyama` (see :func:`sample_sde`)."""
    return sample_sde(model, "probability_flow", steps, **kwargs)


def predictor_corrector(model, steps: int = 100, snr: float = 0.16, corrector_steps: int = 1, **kwargs) -> SampleResult:
    """Langevin corrector + Euler–Maruyama predictor at every level (see :func:`sample_sde`)."""
    return sample_sde(model, "predictor_corrector", steps, snr=snr, corrector_steps=corrector_steps, **kwargs)
