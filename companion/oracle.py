"""The exact-score laboratory: denoisers whose noise prediction is known exactly, reference ODE solutions,
and measured convergence orders of samplers.

A network's samples mix two errors: the network's (it only approximates the score) and the sampler's
(it discretises an ODE/SDE). The oracles here remove the first one. :class:`GaussianMixtureOracle` knows the
exact noise prediction of a mixture of isotropic Gaussians; :class:`EmpiricalOracle` is the ideal denoiser
that knows every training image (a mixture of zero-width Gaussians: a softmax-weighted mean of the data).
Both implement the :class:`companion.models.DiffusionModel` interface, so every registry sampler runs on
them unchanged, and :func:`reference_solution` integrates the probability-flow ODE from the same initial
noise with scipy's DOP853 at tight tolerances. :func:`convergence_order` then measures a sampler's error
against that reference *inside* the trajectory and fits the slope of log(error) against log(steps).

Time convention. Samplers pass a training timestep ``t`` (int, or fractional for Karras/exponential sigma
schedules). It is mapped to a noise level exactly as diffusers maps noise levels to timesteps
(``_sigma_to_t``: linear interpolation of log-sigma on the integer training grid), using the scheduler's own
float32 ``alphas_cumprod``. The oracle is therefore exact for the noise level the sampler assumes.

Command line::

    python -m companion.oracle order dpmpp_3m dpmpp_3m_corrected ddim heun
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

from .schedules import TRAIN_SCHEDULE, SigmaMap, train_sigmas  # noqa: F401  (train_sigmas: read here by callers)

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


# ---------------------------------------------------------------------------------------------- reference ODE


def _eps_sigma_fn(model, class_labels=None, guidance=None):
    """eps(x, sigma) for the probability-flow ODE: exact sigma on oracles, t(sigma) on networks."""
    if hasattr(model, "eps_at_sigma"):
        if class_labels is not None or guidance is not None:
            raise ValueError("oracles are unconditional: no class_labels or guidance")
        return model.eps_at_sigma
    smap = SigmaMap(model.scheduler_config)
    if guidance is not None and class_labels is None:
        raise ValueError("guidance needs class_labels")

    def eps(x, sigma):
        t = float(np.asarray(smap.t(float(sigma))).reshape(-1)[0])
        xx = x.to(torch.float32)
        with torch.no_grad():
            if guidance is None:
                e = model.predict_noise(xx, t, class_labels=class_labels)
            else:
                null = torch.full_like(class_labels, model.null_class)
                both = model.predict_noise(torch.cat([xx, xx]), t, class_labels=torch.cat([class_labels, null]))
                ec, eu = both.chunk(2)
                e = eu + guidance * (ec - eu)
        return e.to(x.dtype)

    return eps


def reference_solution(model, x_T: torch.Tensor, t_end=0, *, t_start=None, rtol: float = 1e-10, atol: float = 1e-10,
                       class_labels=None, guidance=None, max_step=np.inf) -> torch.Tensor:
    """Solve the probability-flow ODE from x_T (VP scaling, at timestep ``t_start``, default the last training
    step) to timestep ``t_end`` (fractional allowed) with scipy's DOP853; returns x at ``t_end`` (VP scaling,
    float64, on CPU). ``t_end="clean"`` integrates on to sigma = 0 (the data end, what samplers return).

    The ODE is solved for y = x / alpha in s = log(sigma): dy/ds = sigma * eps(alpha y, sigma), which is smooth
    over the whole range; the last stretch to sigma = 0 is solved in sigma itself. Works on the oracles (exact
    eps at every sigma) and on any DiffusionModel (network called at t(sigma), batched).
    """
    from scipy.integrate import solve_ivp

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
    eps = _eps_sigma_fn(model, class_labels, guidance)
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


# ---------------------------------------------------------------------------------------------- convergence


def _to_float64(scheduler, smap: SigmaMap) -> None:
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
    t = torch.from_numpy(smap.t(sig.numpy())).to(torch.float64)
    on_grid = ((t - t.round()).abs() < 1e-3) & (sig > 0)
    exact = smap.sigmas[t.round().long().clamp(0, smap.n - 1)]
    scheduler.sigmas = torch.where(on_grid, exact, sig)
    if hasattr(scheduler, "sigmas_interpol"):  # KDPM2: log-midpoints between consecutive levels
        s = scheduler.sigmas
        interp = s.log().lerp(s.roll(1).log(), 0.5).exp()
        interp = torch.cat([interp[:1], interp[1:]])
        old = scheduler.sigmas_interpol
        scheduler.sigmas_interpol = torch.where(torch.isfinite(interp) & (old > 0), interp, old)


class _Float64Torch:
    """``torch`` as seen by a scheduler module during a measurement: ``torch.float32`` reads as float64.

    ``DPMSolverMultistepScheduler.step`` hard-codes ``sample.to(torch.float32)``; at 250+ steps float32 rounding
    (~1e-7 per step) floors third-order errors. Only the measurement loop below uses this, inside a context.
    """

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(self._real, name)


@contextlib.contextmanager
def _float64_arithmetic(scheduler):
    mods = {sys.modules[k.__module__] for k in type(scheduler).__mro__ if k.__module__.startswith("diffusers.schedulers")}
    saved = {m: m.torch for m in mods if getattr(m, "torch", None) is torch}
    try:
        for m in saved:
            m.torch = _Float64Torch(torch)
        yield
    finally:
        for m, real in saved.items():
            m.torch = real


def state_at(model, sampler: str, steps: int, x_T: torch.Tensor, t_stop: int, spacing: str = "trailing",
             float64: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``sampler`` for ``steps`` steps from the noise x_T and return (its own initial state, its state when
    it reaches timestep ``t_stop`` at the start of a step), both in VP scaling (what the network sees).

    For two-stage solvers the state is a full-step state, not a stage. The initial state is returned because
    sigma-parametrised schedulers start from x_T * sigma_max rather than x_T * sqrt(sigma_max^2 + 1): a 2e-5
    relative difference that a reference must share to measure discretisation error alone.
    """
    from . import samplers

    spec = samplers.get(sampler)
    if spec.stochastic:
        raise ValueError(f"{sampler!r} is stochastic: convergence to the ODE solution is defined for deterministic samplers")
    sched = samplers.build_scheduler(spec, model.scheduler_config, spacing=spacing, steps=steps)
    sched.set_timesteps(steps)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        _to_float64(sched, SigmaMap(model.scheduler_config))
    x = x_T.to(dtype) * float(sched.init_noise_sigma)
    start = None
    with _float64_arithmetic(sched) if float64 else contextlib.nullcontext():
        for t in sched.timesteps:
            first = getattr(sched, "state_in_first_order", True)
            xin = sched.scale_model_input(x, t)
            if start is None:
                start = (float(t), xin.to(torch.float64))
            if first and abs(float(t) - t_stop) < 1e-6:
                return start, xin.to(torch.float64)
            eps = model.predict_noise(xin, t).to(dtype)
            x = sched.step(eps, t, x).prev_sample
    grid = [float(t) for t in sched.timesteps]
    raise ValueError(f"{sampler} with {steps} {spacing} steps never reaches t={t_stop}; its timesteps: {grid[:6]}...{grid[-3:]}"
                     f" (use trailing spacing and step counts that divide {model.num_train_timesteps})")


def convergence_order(sampler: str, model=None, steps=(200, 250, 500, 1000), t_stop: int = 199, seed: int = 0,
                      batch: int = 64, spacing: str = "trailing", rtol: float = 1e-10, atol: float = 1e-10) -> dict:
    """Measured order of accuracy of a deterministic sampler on an exact-score model.

    Error = median over the batch of the per-sample RMS distance between the sampler's state at timestep
    ``t_stop`` and a DOP853 reference from the sampler's own initial state; measured inside the trajectory
    because the last step to sigma = 0 (a one-shot jump to the denoised estimate) dominates final-output errors.
    The order is minus the least-squares slope of log(error) against log(steps). Returns steps, errors, order
    and the settings. Default steps: N >= 200 keeps the multistep warm-up and the pre-asymptotic range out of
    the fit (there stock DPM-Solver++ 3M's slope passes through 3 on its way down to 2); N divides 1000 so that
    trailing steps land on t_stop; float64 arithmetic keeps rounding below the smallest error.
    """
    from .device import randn

    model = model if model is not None else toy_mixture((1, 4, 4))
    steps = [int(n) for n in steps]
    if len(steps) < 2:
        raise ValueError("convergence_order needs at least two step counts")
    x_T = randn((batch, *model.sample_shape), seed, dtype=torch.float32).to(torch.float64)
    refs: dict = {}
    errors = []
    for n in steps:
        (t0, x0), x = state_at(model, sampler, n, x_T, t_stop, spacing=spacing)
        key = (t0, hashlib.sha256(x0.numpy().tobytes()).hexdigest())
        if key not in refs:
            refs[key] = reference_solution(model, x0, t_end=t_stop, t_start=t0, rtol=rtol, atol=atol)
        per_sample = ((x - refs[key]) ** 2).reshape(batch, -1).mean(1).sqrt()
        errors.append(float(per_sample.median()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return {"sampler": sampler, "steps": steps, "errors": errors, "order": float(-slope), "t_stop": t_stop,
            "seed": seed, "batch": batch, "spacing": spacing, "model": getattr(model, "name", type(model).__name__)}


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m companion.oracle", description="Exact-score laboratory")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("order", help="measured convergence order of deterministic samplers on a Gaussian mixture")
    o.add_argument("samplers", nargs="+")
    o.add_argument("--steps", default="200,250,500,1000", help="comma-separated step counts (divide 1000)")
    o.add_argument("--t-stop", type=int, default=199)
    o.add_argument("--dim", default="1,4,4", help="sample shape of the mixture, e.g. 2 or 1,8,8")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--batch", type=int, default=64)
    o.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    model = toy_mixture(tuple(int(s) for s in a.dim.split(",")), seed=a.seed)
    steps = [int(s) for s in a.steps.split(",")]
    rows = []
    for name in a.samplers:
        r = convergence_order(name, model=model, steps=steps, t_stop=a.t_stop, seed=a.seed, batch=a.batch)
        rows.append(r)
        if not a.json:
            errs = "  ".join(f"N={n}: {e:.3e}" for n, e in zip(r["steps"], r["errors"]))
            print(f"{name:22s} order {r['order']:.2f}   {errs}", flush=True)
    if a.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
