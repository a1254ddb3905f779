"""Reference solutions: where a sampler *should* have landed from the same noise, computed once and cached once.

A deterministic sampler approximates the probability-flow ODE. Measuring how well needs that ODE's solution from
the sampler's own initial noise x_T, and every measurement in the companion uses the one service here:

* :func:`solve_ode` integrates the ODE with scipy's DOP853 at a chosen tolerance (tables, sweeps, the order lab);
* :func:`converged_sample` runs a high-order solver for many steps (a panel's quick reference: seconds where
  DOP853 needs hundreds of network calls);
* :class:`ReferenceSolutions` caches both, in memory and optionally on disk (safetensors), under a key that holds
  everything that changes the answer: the weights as they are in memory, the speed wrapper, the schedule, the
  noise, labels, guidance, the method and its tolerance, and the library and package versions;
* :class:`ReferenceDistance` is the per-run quality a panel shows: RMS distance of a run's samples to the
  reference from the same noise — of the model itself, or of a teacher (a distilled student aims at its
  teacher's ODE solution).

The ODE is solved for y = x / alpha in s = log(sigma): dy/ds = sigma * eps(alpha y, sigma), smooth over the whole
range; the last stretch to sigma = 0 is the denoised-estimate jump every sampler makes. On the exact-score oracles
eps is exact at every sigma; on a network it is evaluated at t(sigma) through a :class:`companion.denoiser.Denoiser`
(so classifier-free guidance is applied exactly as the samplers apply it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp
from safetensors.torch import load_file, save_file

from . import samplers as registry
from .denoiser import Conditioning, Denoiser, require_diffusion
from .errors import CacheWarning
from .sampling import sample
from .schedules import SigmaMap
from .provenance import model_fingerprint, tensor_digest, versions  # noqa: F401  (model_fingerprint: part of this API)

METHODS = ("dop853", "sampler")

# ---------------------------------------------------------------------------------------------- the ODE


def eps_sigma_fn(model, class_labels=None, guidance=None):
    """eps(x, sigma) for the probability-flow ODE: exact sigma on oracles, t(sigma) through a denoiser on networks."""
    if hasattr(model, "eps_at_sigma"):
        if class_labels is not None or guidance is not None:
            raise ValueError("oracles are unconditional: no class_labels or guidance")
        return model.eps_at_sigma
    smap = SigmaMap(model.scheduler_config)
    if guidance is not None and class_labels is None:
        raise ValueError("guidance needs class_labels")
    denoiser = Denoiser(model, Conditioning(class_labels=class_labels), guidance=guidance)

    def eps(x, sigma):
        t = float(np.asarray(smap.t(float(sigma))).reshape(-1)[0])
        with torch.no_grad():
            e = denoiser(x.to(torch.float32), t)
        return e.to(x.dtype)

    return eps


def solve_ode(model, x_T: torch.Tensor, t_end=0, *, t_start=None, rtol: float = 1e-10, atol: float = 1e-10,
              class_labels=None, guidance=None, max_step=np.inf) -> torch.Tensor:
    """Solve the probability-flow ODE from x_T (VP scaling, at timestep ``t_start``, default the last training
    step) to timestep ``t_end`` (fractional allowed) with scipy's DOP853; returns x at ``t_end`` (VP scaling,
    float64, on CPU). ``t_end="clean"`` integrates on to sigma = 0 (the data end, what samplers return).
    Uncached: use :func:`reference` for a cached solution.
    """
    require_diffusion(model, "solve_ode (the probability-flow ODE of a VP diffusion)")
    smap = SigmaMap(model.scheduler_config)
    t_start = smap.n - 1 if t_start is None else t_start
    s0 = float(smap.sigma(torch.tensor(float(t_start))))
    clean = isinstance(t_end, str)
    if clean and t_end != "clean":
        raise ValueError(f"t_end must be a timestep in [0, {smap.n - 1}] or 'clean', got {t_end!r}")
    s1 = float(smap.sigma(torch.tensor(0.0 if clean else float(t_end))))
    exact = hasattr(model, "eps_at_sigma")
    if clean and exact:
        s1 = 1e-7  # the oracle is exact at every sigma: follow the ODE almost to 0, then take the (O(sigma)) last jump
    if s1 > s0:
        raise ValueError(f"t_end={t_end} lies before t_start={t_start}: the ODE runs from noise to data")
    eps = eps_sigma_fn(model, class_labels, guidance)
    shape = x_T.shape
    y0 = (x_T.detach().cpu().to(torch.float64) * math.sqrt(1 + s0**2)).reshape(-1).numpy()

    def rhs_log(s, y):
        sig = math.exp(s)
        yt = torch.from_numpy(y).reshape(shape)
        x = yt / math.sqrt(1 + sig**2)
        return (sig * eps(x, torch.tensor(sig, dtype=torch.float64))).reshape(-1).to(torch.float64).numpy()

    sol = solve_ivp(rhs_log, (math.log(s0), math.log(s1)), y0, method="DOP853", rtol=rtol, atol=atol, max_step=max_step)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    y = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    sig_end = s1
    if clean:
        # x0 = y - sigma * eps(y, sigma): below the last training level a network is only defined at t = 0, so this is
        # the same final jump every sampler makes; for an oracle sigma = 1e-7 makes it exact to O(1e-7).
        y = y - s1 * eps(y / math.sqrt(1 + s1**2), torch.tensor(s1, dtype=torch.float64)).to(torch.float64)
        sig_end = 0.0
    return y / math.sqrt(1 + sig_end**2)


def converged_sample(model, x_T: torch.Tensor, *, sampler: str = "unipc", steps: int = 200, class_labels=None,
                     guidance=None, cond=None, prompt=None, negative_prompt=None) -> torch.Tensor:
    """A ``steps``-step run of a high-order deterministic ``sampler`` from ``x_T``: the final samples (float32).

    On the bundled digits model 200 UniPC steps move by < 0.01 RMS from 100 steps, an order below the 10-50-step
    errors they are compared with, in seconds where DOP853 needs hundreds of network calls even at rtol 1e-3.

    A text-to-image pipeline gets its ``prompt`` / ``negative_prompt`` and the trailing grid, which starts at the
    last training timestep at any step count (a pipeline's own "leading" grid does not, and is refused at 200 steps)."""
    if registry.get(sampler).stochastic:
        raise ValueError(f"reference sampler {sampler!r} is stochastic: a reference must follow the ODE")
    text = {}
    if getattr(model, "text_conditional", False):
        text = {k: v for k, v in (("prompt", prompt), ("negative_prompt", negative_prompt)) if v is not None}
        if not getattr(model, "prediction", "") == "flow":
            text["spacing"] = "trailing"
    elif prompt is not None or negative_prompt is not None:
        raise ValueError(f"a prompt was given for {getattr(model, 'name', 'model')!r}, which takes no text")
    return sample(model, sampler=sampler, steps=steps, seed=0, batch=x_T.shape[0], class_labels=class_labels,
                  guidance=guidance, cond=cond, x_T=x_T, **text).samples


# ---------------------------------------------------------------------------------------------- the cache


def reference_key(model, x_T: torch.Tensor, **settings) -> str:
    """The cache key of a reference: everything that changes the answer."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update(tensor_digest(x_T).encode())
    for k, v in sorted(settings.items()):
        h.update(k.encode())
        h.update((tensor_digest(v) if torch.is_tensor(v) else json.dumps(v, sort_keys=True, default=str)).encode())
    h.update(json.dumps(versions(), sort_keys=True).encode())
    return h.hexdigest()


class ReferenceSolutions:
    """Reference solutions cached in memory (least recently used first out) and, with ``folder``, on disk."""

    def __init__(self, folder: str | Path | None = None, max_items: int = 256):
        self.folder = Path(folder) if folder is not None else None
        self.max_items = int(max_items)
        self._memory: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.computed = 0  # how many solutions this cache had to compute (tests and benchmarks read it)

    def get(self, model, x_T: torch.Tensor, *, method: str = "dop853", class_labels=None, guidance=None, cond=None,
            t_start=None, t_end="clean", rtol: float = 1e-10, atol: float | None = None, sampler: str = "unipc",
            steps: int = 200, folder: str | Path | None = None, prompt=None, negative_prompt=None) -> torch.Tensor:
        """The reference from ``x_T``: ``method="dop853"`` (:func:`solve_ode`, float64, at ``t_end``) or
        ``method="sampler"`` (:func:`converged_sample`, float32, at the data end). ``folder`` overrides the disk
        folder for this call (e.g. a sweep's cache folder)."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not valid; choose one of {METHODS}")
        atol = rtol if atol is None else atol
        labels = None if class_labels is None else torch.as_tensor(class_labels).long().cpu()
        if method == "dop853":
            if cond is not None:
                raise ValueError("the DOP853 reference does not take a conditioning image; use method='sampler'")
            settings = dict(method=method, t_start=t_start, t_end=t_end, rtol=rtol, atol=atol)
        else:
            settings = dict(method=method, sampler=sampler, steps=int(steps))
        settings.update(class_labels=labels, guidance=None if guidance is None else float(guidance),
                        cond=None if cond is None else torch.as_tensor(cond))
        text = {k: v for k, v in (("prompt", prompt), ("negative_prompt", negative_prompt)) if v is not None}
        if text and method == "dop853":
            raise ValueError("the DOP853 reference carries no text conditioning; use method='sampler'")
        settings.update(text)  # only when given: the keys of the other references stay what they were
        key = reference_key(model, x_T, **settings)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        disk = Path(folder) if folder is not None else self.folder
        path = disk / f"ref-{key}.safetensors" if disk is not None else None
        ref = self._load(path, tuple(x_T.shape)) if path is not None else None
        if ref is None:
            if method == "dop853":
                ref = solve_ode(model, x_T, t_end, t_start=t_start, rtol=rtol, atol=atol, class_labels=labels, guidance=guidance)
            else:
                ref = converged_sample(model, x_T, sampler=sampler, steps=steps, class_labels=labels, guidance=guidance, cond=cond,
                                       **text)
            self.computed += 1
            if path is not None:
                self._save(path, ref)
        self._memory[key] = ref
        if len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return ref

    @staticmethod
    def _load(path: Path, shape: tuple) -> torch.Tensor | None:
        if not path.exists():
            return None
        try:
            ref = load_file(str(path))["x0"]
            if tuple(ref.shape) != shape:
                raise ValueError(f"shape {tuple(ref.shape)} != {shape}")
            return ref
        except Exception as e:  # safetensors raises its own error types for damaged files
            warnings.warn(f"corrupted cache entry {path} ({type(e).__name__}: {e}); recomputing it", CacheWarning, stacklevel=4)
            return None

    @staticmethod
    def _save(path: Path, ref: torch.Tensor) -> None:
        """Keep a solution on disk; a folder that cannot be written warns (the solution is returned all the same)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per process and thread
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"x0": ref.contiguous()}, str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except OSError as e:
            warnings.warn(f"could not write reference {path} ({type(e).__name__}: {e}); it is kept in memory only",
                          CacheWarning, stacklevel=4)

    def clear(self) -> None:
        self._memory.clear()


SOLUTIONS = ReferenceSolutions()  # the process-wide cache every measurement shares


def reference(model, x_T: torch.Tensor, **kwargs) -> torch.Tensor:
    """:meth:`ReferenceSolutions.get` on the process-wide cache."""
    return SOLUTIONS.get(model, x_T, **kwargs)


def reference_for(result, model, **kwargs) -> torch.Tensor:
    """The reference from a sampling result's own initial noise, class labels and guidance."""
    x_T = getattr(result, "x_T", None)
    if x_T is None:
        raise ValueError("this sample() result does not carry its initial noise (x_T); cannot solve the reference ODE")
    rec = result.record
    kw = dict(guidance=getattr(rec, "guidance", None), class_labels=getattr(result, "class_labels", None))
    kw.update(kwargs)
    return reference(model, x_T, **kw)


# ---------------------------------------------------------------------------------------------- a run's distance


class ReferenceDistance:
    """Per-run quality: RMS distance of a run's samples to a converged solution of the probability-flow ODE from
    the same noise (lower is better).

    Separates deterministic solvers where sample-based metrics on a small batch cannot. The reference is a
    ``reference_steps``-step run of ``reference_sampler`` (see :func:`converged_sample`), of ``teacher`` when one is
    given (a distilled student aims at its teacher's ODE solution from the same x_T; multistep consistency
    sampling re-noises between steps, so it is not expected to reach zero), else of the model itself — then
    stochastic samplers, which do not follow the ODE, get no value. References come from the shared cache.
    """

    def __init__(self, teacher=None, reference_sampler: str = "unipc", reference_steps: int = 200, cache: ReferenceSolutions | None = None):
        self.teacher, self.reference_sampler, self.reference_steps = teacher, reference_sampler, int(reference_steps)
        self.cache = cache if cache is not None else SOLUTIONS
        name = registry.get(reference_sampler).name.split(" (")[0]
        whose = "the teacher's " if teacher is not None else ""
        self.label = f"distance to {whose}{reference_steps}-step {name} (RMS, lower is better)"

    def __call__(self, model, result, sample_kwargs: dict | None = None) -> float | None:
        rec = result.record
        if self.teacher is None and rec.stochastic:
            return None
        cond = (sample_kwargs or {}).get("cond")
        ref = self.cache.get(self.teacher if self.teacher is not None else model, result.x_T, method="sampler",
                             sampler=self.reference_sampler, steps=self.reference_steps, class_labels=result.class_labels,
                             guidance=rec.guidance, cond=cond)
        return float((result.samples.float() - ref.float()).pow(2).mean().sqrt())
