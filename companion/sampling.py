"""One call for every sampler: ``sample(model, sampler, steps, ...)``, with guidance and a run record.

The loop is diffusers' own (``set_timesteps``, ``scale_model_input``, network, ``step``) around a scheduler
built from the model's training schedule by the registry (:mod:`companion.samplers`). It adds what a reader
comparing samplers needs: the network evaluations actually spent (both halves of classifier-free guidance
count), wall time split into network time and solver overhead, per-step times, peak memory and the exact
scheduler configuration. Initial noise comes from :func:`companion.device.randn` and a stochastic sampler's
noise from a seeded CPU generator, so a seed gives the same images on every device.
"""
from __future__ import annotations

import copy
import inspect
import json
from collections import OrderedDict
from collections.abc import Mapping
import math
import numbers
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import samplers as registry
from .device import generator as cpu_generator
from .device import pick_device, randn
from .errors import SamplingError  # noqa: F401  (raised here; defined with the others)



@dataclass
class RunRecord:
    """What one :func:`sample` call did and cost.

    ``nfe``: network evaluations per sample (a classifier-free-guided call counts 2: its two halves).
    ``classifier_evals``: noise-aware classifier gradient evaluations per sample (classifier guidance).
    ``wall_s``: the whole call (noise, scheduler set-up, loop, decoding); ``network_s``: inside the diffusion
    network (and the guidance classifier); ``overhead_s`` = wall - network: everything else (the solver).
    ``step_s``: wall time of each loop iteration. ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated``
    during the call; on CPU the growth of the process's peak resident set size (``ru_maxrss``) during the call,
    which is 0 when the run stayed below an earlier peak — ``peak_mem_kind`` says which.
    """

    sampler: str
    steps: int
    nfe: int
    wall_s: float
    network_s: float
    overhead_s: float
    step_s: list
    peak_mem_bytes: int
    peak_mem_kind: str
    scheduler_class: str
    scheduler_config: dict
    seed: int
    batch: int
    guidance: float | None
    eta: float | None
    spacing: str
    stochastic: bool
    classifier_scale: float | None = None
    classifier_evals: int = 0
    device: str = "cpu"
    model: str = ""
    speed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class SampleResult:
    images: torch.Tensor
    samples: torch.Tensor
    record: RunRecord
    trajectory: list | None = field(default=None)
    x_T: torch.Tensor | None = None  # the initial noise (unit variance, VP scaling, CPU): the reference ODE's start
    class_labels: torch.Tensor | None = None  # the labels sampled with (None for unconditional runs)


# ---------------------------------------------------------------------------------------------- helpers


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sqrt_one_minus_abar(model, t) -> float:
    """sqrt(1 - abar) at (possibly fractional) timestep t, with the oracle's exact sigma(t) map."""
    from .oracle import SigmaMap

    smap = getattr(model, "_companion_sigma_map", None)
    if smap is None:
        smap = SigmaMap(model.scheduler_config)
        try:
            model._companion_sigma_map = smap
        except AttributeError:
            pass
    sigma = float(smap.sigma(torch.tensor(float(t))))
    return sigma / math.sqrt(1 + sigma**2)


def _check_args(model, spec, steps, guidance, eta, class_labels, classifier, classifier_scale, batch, cond):
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= n_train:
        raise SamplingError(f"steps must be an int in [1, {n_train}] (the model's training steps), got {steps!r}")
    if steps < spec.min_steps:
        raise SamplingError(f"sampler {spec.key!r} needs at least {spec.min_steps} steps (got {steps}): "
                            f"its Runge-Kutta warm-up alone takes 3; use 'plms' for fewer steps")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise SamplingError(f"batch must be a positive int, got {batch!r}")
    if guidance is not None:
        if not getattr(model, "conditional", False):
            raise SamplingError(
                f"guidance={guidance} needs a class-conditional model; {getattr(model, 'name', 'this model')!r} is unconditional "
                "(use guidance=None, or classifier guidance with classifier=...)"
            )
        if not math.isfinite(float(guidance)):
            raise SamplingError(f"guidance must be a finite number, got {guidance!r}")
    if eta is not None:
        if not spec.has_eta:
            with_eta = [s.key for s in registry.REGISTRY.values() if s.has_eta]
            raise SamplingError(f"sampler {spec.key!r} has no eta parameter; samplers with eta: {', '.join(with_eta)}")
        if not 0.0 <= float(eta) <= 1.0:
            raise SamplingError(f"eta must lie in [0, 1], got {eta!r}")
    if classifier is None and classifier_scale is not None:
        raise SamplingError("classifier_scale given without classifier=")
    if classifier is not None and class_labels is None:
        raise SamplingError("classifier guidance needs class_labels= (the class each sample is steered towards)")
    if class_labels is not None and not getattr(model, "conditional", False) and classifier is None:
        raise SamplingError(f"model {getattr(model, 'name', '')!r} is unconditional: class_labels need classifier= guidance")
    if getattr(model, "cond_shape", None) is not None and cond is None:
        raise SamplingError(f"model {model.name!r} is a super-resolution stage: pass cond=<low-resolution images of shape {model.cond_shape}>")


def _labels(model, class_labels, batch, device):
    if class_labels is None:
        if not getattr(model, "conditional", False):
            return None
        return (torch.arange(batch) % model.num_classes).to(device)  # one of each class, cycling
    y = torch.as_tensor(class_labels, dtype=torch.long)
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise SamplingError(f"class_labels must be one int or {batch} ints (batch={batch}), got shape {tuple(y.shape)}")
    n = getattr(model, "num_classes", None)
    if n is not None and (y.min() < 0 or y.max() > n):
        raise SamplingError(f"class_labels must lie in [0, {n}] ({n} = no class), got {y.min().item()}..{y.max().item()}")
    return y.to(device)


# ---------------------------------------------------------------------------------------------- the call


@torch.no_grad()
def sample(model, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float | None = None, eta: float | None = None,
           spacing: str | None = None, seed: int = 0, batch: int = 16, class_labels=None, cond=None, classifier=None,
           classifier_scale: float | None = None, return_trajectory: bool = False, device=None,
           progress: bool = False, speed=None) -> SampleResult:
    """Draw ``batch`` samples from ``model`` with ``sampler`` in ``steps`` steps.

    ``model``: any object with the :class:`companion.models.DiffusionModel` interface (pixel, latent — decoded
    at the end — super-resolution with ``cond``, class-conditional, or an exact-score oracle).
    ``guidance``: classifier-free guidance scale w (eps = eps_u + w (eps_c - eps_u)); conditional and
    unconditional halves go through the network in one batched call, which counts as 2 NFE.
    ``classifier``: a noise-aware classifier ``clf(x_t, t) -> logits``; its gradient of log p(y | x_t) steers
    the samples towards ``class_labels`` (eps -= scale * sqrt(1 - abar_t) * grad), with any sampler.
    ``eta``: DDIM's noise level (0 deterministic, 1 DDPM-like); only samplers with an eta accept it.
    ``spacing``: leading / linspace / trailing / karras / exponential (``None``: the scheduler's default);
    spacings a scheduler cannot do are refused.
    ``return_trajectory``: also return ``[(t, x_t), ...]``: the state (VP scaling) at the start of every full
    step, then ``(-1.0, x_0)`` for the final output (-1 marks sigma = 0).
    ``speed``: speed options for the network (:class:`companion.speed.SpeedOptions`, a dict, or a label such as
    ``"bf16+channels_last"``); recorded in ``record.speed``. For repeated calls, build the model once with
    :func:`companion.speed.accelerate` instead (each call here prepares, and possibly compiles, a copy).
    """
    spec = registry.get(sampler)
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        steps = int(steps)
    if isinstance(batch, numbers.Integral) and not isinstance(batch, bool):
        batch = int(batch)
    _check_args(model, spec, steps, guidance, eta, class_labels, classifier, classifier_scale, batch, cond)
    spacing, _ = registry.spacing_options(spec, spacing)
    dev = pick_device(device) if device is not None else _model_device(model)
    if hasattr(model, "to") and _model_device(model) != dev:
        model.to(dev)
    if speed is not None:
        from .speed import SpeedOptions, accelerate

        if isinstance(speed, str):
            speed = SpeedOptions.from_label(speed)
        elif isinstance(speed, Mapping):
            speed = SpeedOptions.from_dict(speed)
        model = accelerate(model, speed, dev)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _peak_rss_bytes()
    t_start = time.perf_counter()

    sched = _prepared_scheduler(spec, model.scheduler_config, spacing, steps, dev)
    labels = _labels(model, class_labels, batch, dev)
    if cond is not None:
        cond = torch.as_tensor(cond, dtype=torch.float32).to(dev)
        if cond.shape[0] != batch:
            raise SamplingError(f"cond holds {cond.shape[0]} images but batch={batch}")
    x_T = randn((batch, *model.sample_shape), seed)
    x = x_T.to(dev) * sched.init_noise_sigma
    step_kwargs = {}
    step_params = inspect.signature(sched.step).parameters
    if "generator" in step_params:
        step_kwargs["generator"] = cpu_generator(seed + 1)  # a separate stream from the initial noise
    if eta is not None:
        step_kwargs["eta"] = float(eta)
    stochastic = spec.stochastic or (spec.has_eta and bool(eta))
    if guidance is not None:
        null = torch.full_like(labels, model.null_class)
        labels2 = torch.cat([labels, null])
        cond2 = torch.cat([cond, cond]) if cond is not None else None
    scale = 1.0 if classifier is not None and classifier_scale is None else classifier_scale
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    network_s = 0.0
    calls = 0
    clf_calls = 0
    step_s = []
    trajectory = [] if return_trajectory else None
    timesteps = sched.timesteps
    iterator = timesteps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc=f"{spec.key} {steps} steps", leave=False)
    for i, t in enumerate(iterator):
        t0 = time.perf_counter()
        xin = sched.scale_model_input(x, t)
        if trajectory is not None and getattr(sched, "state_in_first_order", True):
            trajectory.append((float(t), xin.detach().to("cpu", torch.float32).clone()))
        sync()
        n0 = time.perf_counter()
        if guidance is None:
            eps = model.predict_noise(xin, t, class_labels=labels if model.conditional else None, cond=cond)
            calls += 1
        else:
            both = model.predict_noise(torch.cat([xin, xin]), t, class_labels=labels2, cond=cond2)
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            calls += 2
        if classifier is not None:
            with torch.enable_grad():
                xg = xin.detach().requires_grad_(True)
                tt = torch.as_tensor(t, device=dev).expand(batch)
                logp = torch.log_softmax(classifier(xg, tt), dim=-1)
                grad = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), xg)[0]
            eps = eps - scale * _sqrt_one_minus_abar(model, t) * grad
            clf_calls += 1
        sync()
        network_s += time.perf_counter() - n0
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
        if not torch.isfinite(x).all():
            raise SamplingError(
                f"{spec.key}: non-finite values (NaN/inf) after step {i} of {len(timesteps)} (t={float(t):g}); "
                f"the scheduler configuration was {dict(sched.config)}"
            )
        step_s.append(time.perf_counter() - t0)

    samples = x.to(torch.float32)
    if trajectory is not None:
        trajectory.append((-1.0, samples.detach().cpu().clone()))
    if getattr(model, "is_latent", False):
        n0 = time.perf_counter()
        images = model.decode(samples)
        sync()
        network_s += time.perf_counter() - n0
    else:
        images = samples
    images = images.detach().to("cpu", torch.float32)
    samples = samples.detach().cpu()
    sync()
    wall = time.perf_counter() - t_start
    if on_cuda:
        peak, kind = int(torch.cuda.max_memory_allocated(dev)), "cuda_max_memory_allocated"
    else:
        peak, kind = max(0, _peak_rss_bytes() - rss0), "cpu_peak_rss_growth"
    record = RunRecord(
        sampler=spec.key, steps=steps, nfe=calls, wall_s=wall, network_s=network_s, overhead_s=wall - network_s,
        step_s=step_s, peak_mem_bytes=peak, peak_mem_kind=kind, scheduler_class=type(sched).__name__,
        scheduler_config={k: v for k, v in dict(sched.config).items()}, seed=seed, batch=batch,
        guidance=None if guidance is None else float(guidance), eta=None if eta is None else float(eta),
        spacing=spacing, stochastic=stochastic, classifier_scale=None if classifier is None else float(scale),
        classifier_evals=clf_calls, device=str(dev), model=str(getattr(model, "name", "")),
        speed=_speed_record(model),
    )
    return SampleResult(images=images, samples=samples, record=record, trajectory=trajectory, x_T=x_T,
                        class_labels=None if labels is None else labels.cpu())


def _speed_record(model) -> dict:
    """The speed options a run used (eager fp32 unless the model was accelerated)."""
    from .speed import describe

    return describe(model)


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
        _SCHEDULERS[key] = sched
        if len(_SCHEDULERS) > _SCHEDULER_CACHE_SIZE:
            _SCHEDULERS.popitem(last=False)
    else:
        _SCHEDULERS.move_to_end(key)
    return copy.deepcopy(sched)


def _model_device(model) -> torch.device:
    d = getattr(model, "device", None)
    return torch.device(d) if d is not None else torch.device("cpu")
