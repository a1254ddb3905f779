"""Partial sampling: start the reverse process from a partly noised image, or stop it early.

* **Start late** (SDEdit, arXiv 2108.01073; truncated diffusion, arXiv 2202.09671; early-stopped DDPM,
  arXiv 2205.12524): take an image from somewhere cheaper than the full chain (a real image, a coarse or blurred
  one, or a sample of a cheap generative model such as :class:`GaussianPrior`), noise it to timestep ``t_start``
  with the forward process q(x_t | x_0), and run only the part of the reverse chain below ``t_start``.
* **Stop early**: end the chain at timestep ``stop_at`` and return the network's denoised estimate
  x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) instead of taking the remaining steps.

:func:`sample_from` uses the sampler registry's diffusers schedulers the way diffusers' image-to-image pipelines
do: ``set_timesteps`` on a longer chain, keep its last ``steps`` steps (``set_begin_index``) and noise the start
image to the first kept timestep with the scheduler's own ``add_noise``. It returns a :class:`PartialResult`: a
:class:`companion.sampling.SampleResult` whose record counts the network evaluations actually spent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import samplers as registry
from .denoiser import Conditioning, Denoiser, SampleResult, check_args, check_seed, model_device, require_diffusion, resolve_labels
from .device import generator as cpu_generator
from .device import pick_device, randn
from .errors import SamplingError
from .sampling import scheduler_loop, step_kwargs_for
from .schedules import sigma_map, x0_from_eps


@dataclass
class PartialResult(SampleResult):
    t_start: float | None = None  # the timestep the chain started from (None: pure noise at the last training step)
    t_end: float | None = None  # the timestep of the last network evaluation (the chain stopped there when stop_at is set)
    x_start_noised: torch.Tensor | None = None  # the noised start image, VP scaling (None for a pure-noise start)


def truncated_timesteps(model, sampler: str, steps: int, t_start: float | None, spacing: str = "trailing"):
    """(scheduler, the timesteps of the partial chain, begin index): ``steps`` steps that start at or below
    ``t_start``. The scheduler is set up on the shortest full chain whose steps below ``t_start`` number at least
    ``steps`` (as diffusers' img2img pipelines do with ``strength``); ``t_start=None`` gives the full chain."""
    spec = registry.get(sampler)
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
        raise SamplingError(f"steps must be an int in [1, {n_train}], got {steps!r}")
    if t_start is not None and not (isinstance(t_start, (int, float)) and 0 <= t_start <= n_train - 1):
        raise SamplingError(f"t_start must be a timestep in [0, {n_train - 1}] or None (start from pure noise), got {t_start!r}")
    if t_start is not None and steps > int(t_start) + 1:
        raise SamplingError(f"{sampler} cannot take {steps} steps below t_start={t_start}: at most {int(t_start) + 1} training steps lie there")
    for n_full in range(steps, n_train + 1):
        sched = registry.build_scheduler(spec, model.scheduler_config, spacing=spacing)
        sched.set_timesteps(n_full)
        order = int(getattr(sched, "order", 1))
        begin = (n_full - steps) * order
        if t_start is None or float(sched.timesteps[begin]) <= t_start:
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(begin)
            return sched, sched.timesteps[begin:], begin
    raise SamplingError(f"{sampler} cannot take {steps} steps below t_start={t_start}: at most {int(t_start) + 1} training steps lie there")


@torch.no_grad()
def sample_from(model, x_start: torch.Tensor | None, t_start: float | None, sampler: str = "ddim", steps: int = 10, *,
                seed: int = 0, batch: int | None = None, class_labels=None, guidance: float | None = None,
                eta: float | None = None, stop_at: float | None = None, spacing: str = "trailing",
                device=None, wrap=None) -> PartialResult:
    """Run the reverse chain from ``x_start`` noised to ``t_start``, in ``steps`` steps of ``sampler``.

    ``x_start``: clean images (B, *image_shape) in [-1, 1] (encoded first for latent models), or ``None`` with
    ``t_start=None`` to start from pure noise (the full chain; then ``batch`` is required). The forward noise is
    drawn with ``seed``; a stochastic sampler's own noise with ``seed + 1``, as in :func:`companion.sample`.
    ``stop_at``: a timestep; the chain ends at the first step at or below it and returns the denoised estimate
    there (the remaining steps are not run). ``class_labels`` / ``guidance`` / ``eta`` / ``wrap`` as in
    :func:`companion.sample`.
    """
    require_diffusion(model, "sample_from (partial sampling)")
    spec = registry.get(sampler)
    if (x_start is None) != (t_start is None):
        raise SamplingError("give both x_start and t_start (start from a noised image) or neither (start from pure noise)")
    if x_start is not None:
        x_start = torch.as_tensor(x_start, dtype=torch.float32)
        if tuple(x_start.shape[1:]) != tuple(model.image_shape):
            raise SamplingError(f"x_start must have shape (B, {', '.join(map(str, model.image_shape))}), got {tuple(x_start.shape)}")
        if batch is not None and batch != x_start.shape[0]:
            raise SamplingError(f"batch={batch} but x_start holds {x_start.shape[0]} images")
        batch = x_start.shape[0]
    elif batch is None:
        raise SamplingError("batch is required when starting from pure noise (x_start=None)")
    check_args(model, spec, steps, guidance, eta, class_labels, None, None, batch, None)
    seed = check_seed(seed)
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if stop_at is not None and not (isinstance(stop_at, (int, float)) and 0 <= stop_at <= n_train - 1):
        raise SamplingError(f"stop_at must be a timestep in [0, {n_train - 1}] or None (run the chain to the end), got {stop_at!r}")
    dev = pick_device(device) if device is not None else model_device(model)
    t0 = time.perf_counter()

    sched, timesteps, _ = truncated_timesteps(model, sampler, steps, t_start, spacing)
    timesteps = timesteps.to(dev)
    labels = resolve_labels(model, class_labels, batch, dev)
    noise = randn((batch, *model.sample_shape), seed, device=dev)
    x_noised = None
    if x_start is None:
        x = noise * sched.init_noise_sigma
    else:
        x0 = model.encode(x_start.to(dev))
        x = sched.add_noise(x0, noise, timesteps[:1])
        x_noised = sched.scale_model_input(x.clone(), timesteps[0]).cpu()
    denoiser = Denoiser(model, Conditioning(class_labels=labels), guidance=guidance)
    if wrap is not None:
        denoiser.wrap(wrap)

    def stop(info):  # stop early: the denoised estimate at the first step at or below stop_at
        return stop_at is not None and float(info["t"]) <= stop_at

    x, step_s, stopped = scheduler_loop(sched, denoiser, x, timesteps=timesteps, step_kwargs=step_kwargs_for(sched, seed, eta),
                                        callback=stop, what=spec.key)
    if stopped is not None:
        t_end = float(stopped["t"])
        x = x0_from_eps(stopped["eps"], stopped["x_in"], sigma_map(model).sqrt_one_minus_abar(t_end))
    else:
        t_end = float(timesteps[-1]) if len(timesteps) else None
    images, samples = denoiser.finish(x)
    wall = time.perf_counter() - t0
    record = denoiser.record(sampler=spec.key, steps=len(step_s), wall_s=wall, step_s=step_s,
                             scheduler_class=type(sched).__name__, scheduler_config=dict(sched.config), seed=seed,
                             batch=batch, spacing=spacing, stochastic=spec.stochastic or (spec.has_eta and bool(eta)),
                             eta=eta, device=dev)
    return PartialResult(images=images, samples=samples, record=record, x_T=None if x_start is not None else noise.cpu(),
                         class_labels=None if labels is None else labels.cpu(),
                         t_start=None if x_start is None else float(timesteps[0]), t_end=t_end, x_start_noised=x_noised)


class GaussianPrior:
    """A cheap generative model of images: per class, the mean plus a Gaussian in the top ``rank`` principal
    directions (and an isotropic remainder). It stands in for the quick generator (a VAE or GAN) whose samples
    truncated / early-stopped diffusion noises and refines: sampling it costs no network evaluation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rank: int = 8):
        images = torch.as_tensor(images, dtype=torch.float64)
        labels = torch.as_tensor(labels).long()
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and {len(labels)} labels")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        self.image_shape = tuple(images.shape[1:])
        self.classes = sorted(int(c) for c in labels.unique())
        self.rank = rank
        self.means, self.bases, self.scales, self.rest = {}, {}, {}, {}
        for c in self.classes:
            x = images[labels == c].flatten(1)
            if len(x) <= rank:
                raise ValueError(f"class {c} has {len(x)} images: need more than rank={rank}")
            mu = x.mean(0)
            u, s, vt = torch.linalg.svd(x - mu, full_matrices=False)
            sd = s / math.sqrt(len(x) - 1)
            self.means[c], self.bases[c], self.scales[c] = mu, vt[:rank], sd[:rank]
            self.rest[c] = float(sd[rank:].pow(2).sum() / x.shape[1]) ** 0.5  # isotropic std of what the rank leaves out

    def sample(self, labels, seed: int = 0) -> torch.Tensor:
        """One image per label (float32, clamped to [-1, 1])."""
        labels = torch.as_tensor(labels).long().flatten()
        bad = sorted(set(labels.tolist()) - set(self.classes))
        if bad:
            raise ValueError(f"labels {bad} were not in the data the prior was fitted on; classes: {self.classes}")
        g = cpu_generator(seed)
        out = []
        for c in labels.tolist():
            z = torch.randn(self.rank, generator=g, dtype=torch.float64)
            r = torch.randn(self.means[c].shape, generator=g, dtype=torch.float64)
            out.append(self.means[c] + (z * self.scales[c]) @ self.bases[c] + self.rest[c] * r)
        return torch.stack(out).reshape(len(labels), *self.image_shape).clamp(-1, 1).float()


def blur(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """A coarse version of ``images``: average-pooled by ``factor`` and scaled back up (bilinear)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or images.shape[-1] % factor:
        raise ValueError(f"factor must be a positive int dividing the image size {images.shape[-1]}, got {factor!r}")
    small = F.avg_pool2d(images, factor)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
