"""One call for every sampler: ``sample(model, sampler, steps, ...)``, with guidance and a run record.

The loop is diffusers' own (``set_timesteps``, ``scale_model_input``, network, ``step``) around a scheduler
built from the model's training schedule by the registry (:mod:`companion.samplers`); :func:`scheduler_loop`
is that loop, shared by every path that drives a diffusers scheduler (full chains here, partial chains in
:mod:`companion.partial`, the order lab in :mod:`companion.oracle`). The network is called through a
:class:`companion.denoiser.Denoiser`, which applies guidance, counts the network evaluations actually spent
(both halves of classifier-free guidance count) and times them; the run record adds the wall time split into
network time and solver overhead, per-step times, peak memory and the exact scheduler configuration. Initial
noise comes from :func:`companion.device.randn` and a stochastic sampler's noise from a seeded CPU generator, so a
seed gives the same images on every device.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable

import torch

from . import pipelines
from . import samplers as registry
from .denoiser import (Conditioning, Denoiser, MemoryProbe, RunRecord, SampleResult, as_int, check_args,  # noqa: F401
                       check_seed, model_device, resolve_cond, resolve_labels)
from .device import generator as cpu_generator
from .device import pick_device, randn
from .errors import ModelError, SamplingError  # noqa: F401  (SamplingError: raised by the checks; importable from here)
from .schedules import SigmaMap, sigma_map
from .speed import SpeedOptions, accelerate


# ---------------------------------------------------------------------------------------------- float64 arithmetic


def float64_tables(scheduler, smap: SigmaMap) -> None:
    """Make a scheduler's tables float64 so rounding does not floor high-order error measurements.

    Casting is not enough for noise levels: diffusers computes ``sigmas`` from ``alphas_cumprod`` in float32
    (relative error ~6e-8, which the VE state, up to sigma ~ 157, turns into a 1e-5 error floor). Noise levels
    that sit on the integer training grid are replaced by their float64 values; a two-stage scheduler's
    interpolated levels are recomputed from them with the scheduler's own formula.
    """
    for name, val in list(vars(scheduler).items()):
        if torch.is_tensor(val) and val.is_floating_point():
            setattr(scheduler, name, val.to(torch.float64))
    sig = getattr(scheduler, "sigmas", None)
    if sig is None or not torch.is_tensor(sig):
        return
    t = torch.from_numpy(smap.t(sig.cpu().numpy())).to(torch.float64)
    on_grid = ((t - t.round()).abs() < 1e-3) & (sig.cpu() > 0)
    exact = smap.sigmas[t.round().long().clamp(0, smap.n - 1)]
    scheduler.sigmas = torch.where(on_grid, exact, sig.cpu()).to(sig.device)
    if hasattr(scheduler, "sigmas_interpol"):  # KDPM2: log-midpoints between consecutive levels
        s = scheduler.sigmas
        interp = s.log().lerp(s.roll(1).log(), 0.5).exp()
        interp = torch.cat([interp[:1], interp[1:]])
        old = scheduler.sigmas_interpol
        scheduler.sigmas_interpol = torch.where(torch.isfinite(interp) & (old > 0), interp, old)


_FLOAT64 = threading.local()


class _ThreadAwareTorch:
    """``torch`` as diffusers' scheduler modules see it: ``torch.float32`` reads as float64 *in a thread inside*
    :func:`float64_arithmetic`, and as float32 everywhere else.

    ``DPMSolverMultistepScheduler.step`` (and others) hard-code ``sample.to(torch.float32)``; at 250+ steps float32
    rounding (~1e-7 per step) floors third-order errors. The proxy is installed once and stays: a panel or sweep on
    another thread, running at the same time as a float64 measurement, keeps computing in float32.
    """

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name == "float32" and getattr(_FLOAT64, "on", False):
            return self._real.float64
        return getattr(self._real, name)


def _install_proxy() -> None:
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers.schedulers.") and getattr(mod, "torch", None) is torch:
            mod.torch = _ThreadAwareTorch(torch)


@contextlib.contextmanager
def float64_arithmetic():
    """Within this context, on this thread only, diffusers' schedulers compute in float64."""
    _install_proxy()
    before = getattr(_FLOAT64, "on", False)
    _FLOAT64.on = True
    try:
        yield
    finally:
        _FLOAT64.on = before


# ---------------------------------------------------------------------------------------------- the loop


def step_kwargs_for(sched, seed: int, eta: float | None) -> dict:
    """Keyword arguments of ``sched.step``: a seeded CPU generator (a stream separate from the initial noise) for
    stochastic schedulers, and DDIM's eta."""
    kw = {}
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = cpu_generator(seed + 1)
    if eta is not None:
        kw["eta"] = float(eta)
    return kw


def scheduler_loop(sched, denoiser: Denoiser, x: torch.Tensor, *, timesteps=None, step_kwargs: dict | None = None,
                   callback: Callable[[dict], bool | None] | None = None, check: bool = True, eps_dtype=None,
                   what: str = "", defer_check: bool = False) -> tuple[torch.Tensor, list, dict | None]:
    """diffusers' sampling loop around a ready scheduler (``set_timesteps`` done): for each timestep, scale the
    input, call the denoiser, take the scheduler's step. Returns (final state, per-step wall times, the last
    callback's info if it stopped the chain, else None).

    ``callback(info)`` is called after each network call and before the step, with ``info`` = {i, t, x, x_in, eps,
    first_order} (``first_order``: the scheduler is at a full step, not inside a two-stage step); returning True
    stops the chain there. ``check``: refuse non-finite states after a step (``what`` names the run in the error).
    ``eps_dtype``: cast the prediction (e.g. float64 order measurements on a float32 network). ``defer_check``: keep
    each step's finiteness on the device and read it once after the loop (on a GPU a check per step is a host round
    trip that stalls the queue); the error still names the first step that diverged.
    """
    kw = step_kwargs or {}
    step_s = []
    finite: list[torch.Tensor] = []
    timesteps = sched.timesteps if timesteps is None else timesteps
    for i, t in enumerate(timesteps):
        t0 = time.perf_counter()
        first = getattr(sched, "state_in_first_order", True)
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # flow matching: no scaling
        eps = denoiser(xin, t)
        if eps_dtype is not None:
            eps = eps.to(eps_dtype)
        if callback is not None:
            info = {"i": i, "t": t, "x": x, "x_in": xin, "eps": eps, "first_order": first}
            if callback(info):
                step_s.append(time.perf_counter() - t0)
                return x, step_s, info
        x = sched.step(eps, t, x, **kw).prev_sample
        if check and defer_check:
            finite.append(torch.isfinite(x).all())
        elif check and not torch.isfinite(x).all():
            _diverged(what, i, t, timesteps, sched)
        step_s.append(time.perf_counter() - t0)
    if finite:
        ok = torch.stack(finite).cpu()
        if not ok.all():
            i = int((~ok).nonzero()[0])
            _diverged(what, i, timesteps[i], timesteps, sched)
    return x, step_s, None


def _diverged(what: str, i: int, t, timesteps, sched) -> None:
    """Raise the error of a state that became non-finite after step ``i``."""
    raise SamplingError(f"{what}: non-finite values (NaN/inf) after step {i} of {len(timesteps)} (t={float(t):g}); "
                        f"the scheduler configuration was {dict(sched.config)}")


# ---------------------------------------------------------------------------------------------- the call


@torch.no_grad()
def sample(model, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float | None = None, eta: float | None = None,
           spacing: str | None = None, seed: int = 0, batch: int = 16, class_labels=None, cond=None, classifier=None,
           classifier_scale: float | None = None, return_trajectory: bool = False, device=None,
           progress: bool = False, speed=None, x_T: torch.Tensor | None = None, wrap=None,
           dtype: torch.dtype = torch.float32, prompt=None, negative_prompt=None) -> SampleResult:
    """Draw ``batch`` samples from ``model`` with ``sampler`` in ``steps`` steps.

    ``model``: any object with the :class:`companion.models.DiffusionModel` interface (pixel, latent — decoded
    at the end — super-resolution with ``cond``, class-conditional, an exact-score oracle, or a text-to-image
    pipeline, :class:`companion.pipelines.PipelineModel`).
    ``guidance``: classifier-free guidance scale w (eps = eps_u + w (eps_c - eps_u)); conditional and
    unconditional halves go through the network in one batched call, which counts as 2 NFE. On a network that
    takes its guidance scale as an input (LCM) it is that input instead, and a step stays 1 NFE.
    ``prompt`` / ``negative_prompt``: for a text-conditioned pipeline, one string or ``batch`` strings; encoded
    by the pipeline's own text encoders. Without a prompt a pipeline samples unconditionally (the empty prompt);
    the negative prompt replaces the empty prompt as guidance's unconditional half (needs ``guidance``).
    ``classifier``: a noise-aware classifier ``clf(x_t, t) -> logits``; its gradient of log p(y | x_t) steers
    the samples towards ``class_labels`` (eps -= scale * sqrt(1 - abar_t) * grad), with any sampler.
    ``eta``: DDIM's noise level (0 deterministic, 1 DDPM-like); only samplers with an eta accept it.
    ``spacing``: leading / linspace / trailing / karras / exponential (``None``: the scheduler's default, or the
    pipeline's own where the sampler can do it, e.g. Turbo's trailing); spacings a scheduler cannot do are refused.
    On a flow-matching model the samplers with a flow-matching form run on its shifted sigma grid; others are
    refused with the ones that fit (:func:`companion.pipelines.check_flow_sampler`).
    ``return_trajectory``: also return ``[(t, x_t), ...]``: the state (VP scaling) at the start of every full
    step, then ``(-1.0, x_0)`` for the final output (-1 marks sigma = 0).
    ``speed``: speed options for the network (:class:`companion.speed.SpeedOptions`, a dict, or a label such as
    ``"bf16+channels_last"``); recorded in ``record.speed``. For repeated calls, build the model once with
    :func:`companion.speed.accelerate` instead (each call here prepares, and possibly compiles, a copy).
    A pipeline's precision is chosen when it is loaded (``load(..., torch_dtype=...)``).
    ``x_T``: the initial noise (batch, *sample_shape), unit variance (default: ``randn(seed)``).
    ``wrap``: ``wrap(network) -> network``, applied to the network call (:meth:`companion.denoiser.Denoiser.wrap`):
    the seam where a cache, a quantised network or a pipeline's own network replaces ``model.predict_noise``.
    ``dtype``: ``torch.float64`` runs the solver in float64 — its tables, its state and diffusers' own arithmetic
    (on this thread only) — so that measured orders of high-order solvers are not floored by float32 rounding; the
    network of a trained model still computes in its own precision (exact-score oracles compute in float64).
    """
    spec = registry.get(sampler)
    steps, batch = as_int(steps), as_int(batch)
    seed = check_seed(seed)
    if dtype not in (torch.float32, torch.float64):
        raise SamplingError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    float64 = dtype == torch.float64
    flow = getattr(model, "prediction", None) == "flow"
    if flow:  # before the step checks: an unfit sampler is the first thing to say
        pipelines.check_flow_sampler(spec, model, spacing)
    check_args(model, spec, steps, guidance, eta, class_labels, classifier, classifier_scale, batch, cond,
               prompt=prompt, negative_prompt=negative_prompt)
    _check_pipeline_options(model, flow, speed, float64)
    if flow:
        spacing = "flow"
    else:
        if spacing is None and hasattr(model, "default_spacing"):
            spacing = model.default_spacing(spec)
        spacing, _ = registry.spacing_options(spec, spacing)
    prompts = pipelines.resolve_prompts(prompt, batch)
    negatives = pipelines.resolve_prompts(negative_prompt, batch, "negative_prompt")
    if x_T is not None:
        x_T = torch.as_tensor(x_T, dtype=torch.float32).cpu()
        if tuple(x_T.shape) != (batch, *model.sample_shape):
            raise SamplingError(f"x_T must have shape {(batch, *model.sample_shape)} (batch, *sample_shape), got {tuple(x_T.shape)}")
    dev = pick_device(device) if device is not None else model_device(model)
    if hasattr(model, "to") and model_device(model) != dev:
        model.to(dev)
    if speed is not None:
        if isinstance(speed, str):
            speed = SpeedOptions.from_label(speed)
        elif isinstance(speed, Mapping):
            speed = SpeedOptions.from_dict(speed)
        model = accelerate(model, speed, dev)
    memory = MemoryProbe(dev)
    t_start = time.perf_counter()

    if flow:
        sched = pipelines.flow_scheduler(spec, model, steps, dev)
    else:
        sched = _prepared_scheduler(spec, model.scheduler_config, spacing, steps, dev)
    if float64:
        float64_tables(sched, sigma_map(model))
    labels = resolve_labels(model, class_labels, batch, dev)
    cond = resolve_cond(cond, batch, dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    # on a GPU the loop's network calls are timed by device events and its finiteness read once at the end: no host
    # round trip per step (a synchronisation per call was part of what the GPU benchmark measured as loop overhead)
    events = functools.partial(torch.cuda.Event, enable_timing=True) if cuda else None
    text, cfg, encode_s = _text_conditioning(model, prompts, negatives, guidance, batch, sync)
    if x_T is None:
        x_T = randn((batch, *model.sample_shape), seed)
    sigma0 = getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start at sigma = 1 and have none
    x = x_T.to(dev, dtype) * (float(sigma0) if float64 else sigma0)
    denoiser = Denoiser(model, Conditioning(class_labels=labels, image=cond, **text), guidance=cfg, classifier=classifier,
                        classifier_scale=classifier_scale, sync=sync, events=events)
    denoiser.account(encode_s, "encode")
    if float64 and not hasattr(model, "eps_at_sigma"):  # a trained network computes in its own precision
        denoiser.wrap(lambda network: lambda x, t, **kw: network(x.to(torch.float32), t, **kw).to(torch.float64))
    if wrap is not None:
        denoiser.wrap(wrap)
    trajectory = [] if return_trajectory else None
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm  # optional progress bar: only when asked for

        timesteps = tqdm(timesteps, desc=f"{spec.key} {steps} steps", leave=False)

    def keep(info):
        if info["first_order"]:
            trajectory.append((float(info["t"]), info["x_in"].detach().to("cpu", dtype).clone()))

    with float64_arithmetic() if float64 else contextlib.nullcontext():
        x, step_s, _ = scheduler_loop(sched, denoiser, x, timesteps=timesteps, step_kwargs=step_kwargs_for(sched, seed, eta),
                                      callback=keep if trajectory is not None else None, what=spec.key,
                                      eps_dtype=torch.float64 if float64 else None, defer_check=cuda)
    if trajectory is not None:
        trajectory.append((-1.0, x.to(dtype).detach().cpu().clone()))
    images, samples = denoiser.finish(x, dtype)
    wall = time.perf_counter() - t_start
    embedded = (model.default_guidance if guidance is None else guidance) if getattr(model, "guidance_embedded", False) else None
    record = denoiser.record(
        sampler=spec.key, steps=steps, wall_s=wall, step_s=step_s, scheduler_class=type(sched).__name__,
        scheduler_config=dict(sched.config), seed=seed, batch=batch, spacing=spacing,
        stochastic=spec.stochastic or (spec.has_eta and bool(eta)), eta=eta, device=dev, peak=memory.read(),
        prompt=prompt, negative_prompt=negative_prompt, embedded_guidance=embedded)
    return SampleResult(images=images, samples=samples, record=record, trajectory=trajectory, x_T=x_T,
                        class_labels=None if labels is None else labels.cpu())


def _check_pipeline_options(model, flow: bool, speed, float64: bool) -> None:
    """Refuse what a pipeline model cannot do yet: speed wrappers (they pass no text conditioning to the network) and
    float64 solver tables on a flow-matching schedule (those tables are the variance-preserving ones)."""
    name = getattr(model, "name", "model")
    if speed is not None and getattr(model, "text_conditional", False):
        raise SamplingError(f"speed= cannot wrap text-conditioned model {name!r} (the speed wrapper passes only class "
                            f"labels to the network); choose its precision when loading: load(..., torch_dtype=torch.float16)")
    if float64 and flow:
        raise SamplingError(f"dtype=torch.float64 builds variance-preserving solver tables; {name!r} is a flow-matching "
                            f"model: use dtype=torch.float32")


def _text_conditioning(model, prompts, negatives, guidance, batch: int, sync) -> tuple[dict, float | None, float]:
    """(text fields of the Conditioning, the classifier-free guidance scale, seconds spent in the text encoders).

    A class-conditional network that takes its guidance scale as an input (a guidance-distilled student) gets the
    scale as a call input instead, and no classifier-free guidance runs (one network call per step)."""
    if getattr(model, "guidance_embedded", False) and not getattr(model, "text_conditional", False):
        try:
            w = model.default_guidance if guidance is None else model.check_guidance(guidance)
        except ModelError as e:
            raise SamplingError(str(e)) from None
        return {"extra": {"guidance_scale": w}}, None, 0.0
    if not getattr(model, "text_conditional", False):
        return {}, guidance, 0.0
    t0 = time.perf_counter()
    fields, cfg = model.text_conditioning(prompts if prompts is not None else [""] * batch, negatives, guidance)
    if sync is not None:
        sync()
    return fields, cfg, time.perf_counter() - t0


def cascade(base, sr, base_steps: int, sr_steps: int, *, n: int, seed: int = 0, sampler: str = "ddim",
            **kwargs) -> tuple[SampleResult, SampleResult]:
    """A two-stage (multi-scale) pipeline: ``base`` samples ``n`` low-resolution images in ``base_steps`` steps,
    then the super-resolution stage ``sr`` samples high-resolution ones conditioned on them (clamped to [-1, 1],
    as a saved image would be) in ``sr_steps`` steps, from the next seed. Returns (low, high) results; their
    records add up to the pipeline's cost. ``kwargs`` go to both :func:`sample` calls."""
    low = sample(base, sampler=sampler, steps=base_steps, seed=seed, batch=n, **kwargs)
    high = sample(sr, sampler=sampler, steps=sr_steps, seed=seed + 1, batch=n, cond=low.images.clamp(-1, 1), **kwargs)
    return low, high


_SCHEDULERS: "OrderedDict[tuple, object]" = OrderedDict()
_SCHEDULER_CACHE_SIZE = 64


def _prepared_scheduler(spec, scheduler_config: dict, spacing: str, steps: int, dev: torch.device):
    """A fresh scheduler with its timesteps set: a copy of a cached prepared one.

    ``set_timesteps`` is a fixed cost per call that some schedulers make large (KDPM2 maps every noise level to a
    timestep one by one: ~25 ms per step of a 20-step run on this CPU); a slider re-running the same configuration
    should not pay it again. The copy carries no state from earlier runs (it is taken before any step).
    """
    key = (spec.key, json.dumps(scheduler_config, sort_keys=True, default=str), spacing, steps, str(dev))
    sched = _SCHEDULERS.get(key)
    if sched is None:
        sched = registry.build_scheduler(spec, scheduler_config, spacing=spacing)
        sched.set_timesteps(steps, device=dev)
        check_grid(spec, sched, steps, spacing, int(scheduler_config["num_train_timesteps"]))
        _SCHEDULERS[key] = sched
        if len(_SCHEDULERS) > _SCHEDULER_CACHE_SIZE:
            _SCHEDULERS.popitem(last=False)
    else:
        _SCHEDULERS.move_to_end(key)
    return copy.deepcopy(sched)


def check_grid(spec, sched, steps: int, spacing: str, n_train: int) -> None:
    """Refuse a timestep grid that does not sample what was asked for, before any network call.

    diffusers builds some grids that silently skip most of the chain at high step counts: ``leading`` spacing of
    the DPM-Solver multistep family, UniPC and DEIS starts at t = 900 at 100 steps and at t = 500 at 500 steps
    (``t = (N - 1) * (T // (N + 1))``), and at 1000 steps every timestep is 0; a step count that does not divide T
    does the same to DDIM's and Euler's ``leading`` grid (143 steps start at t = 852); ``linspace`` at T steps
    repeats a timestep. A grid must start within 1.5 step widths of the last training timestep (``leading`` spacing
    starts one step width below it by design) and, on a timestep grid, a single-stage solver never repeats a timestep.
    """
    ts = [float(t) for t in sched.timesteps]
    if not ts:
        raise SamplingError(f"{spec.key} with {steps} {spacing} steps produced no timesteps")
    width = n_train / steps
    if ts[0] < n_train - 1 - 1.5 * width:
        raise SamplingError(
            f"{spec.key} with {steps} {spacing!r} steps starts at t = {ts[0]:g}, {(n_train - 1 - ts[0]) / width:.1f} step widths "
            f"below the last training timestep {n_train - 1}: the chain would skip its noisiest part (a diffusers grid "
            f"quirk at this step count). Use spacing='trailing', or a step count that divides {n_train}")
    # two-stage solvers, and PNDM/PLMS (Runge-Kutta warm-up, 2-evaluation first step) revisit timesteps by design;
    # on sigma grids (karras, exponential) the timesteps are rounded labels of distinct noise levels
    staged = int(getattr(sched, "order", 1)) > 1 or spec.diffusers_class == "PNDMScheduler"
    if spacing in registry.TIMESTEP_SPACINGS and not staged and any(b >= a for a, b in zip(ts, ts[1:])):
        dup = next(a for a, b in zip(ts, ts[1:]) if b >= a)
        raise SamplingError(f"{spec.key} with {steps} {spacing!r} steps repeats timestep {dup:g}: the grid is not strictly "
                            f"decreasing at this step count; use spacing='trailing' or fewer steps")
