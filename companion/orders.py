"""Measured convergence orders and step-schedule comparisons: the tables and figures of the solver and
step-schedule chapters.

Everything here is measured, never typed in:

* :func:`convergence_order` measures one sampler's order inside the trajectory (:func:`state_at` against the
  reference ODE solution of :mod:`companion.reference`); :func:`measure_orders` runs it for several deterministic samplers on an
  exact-score Gaussian mixture and returns the error of every run (sampler, steps, NFE, error);
  :func:`order_table` fits the orders and sets them beside the order each method is designed to have
  (:data:`NOMINAL`), with a plain verdict; :func:`order_figure` draws error against NFE on log-log axes with the
  nominal slopes as dashed reference lines.
* :func:`solver_consequence` measures what the order means on a trained network: Frechet distance (enough samples
  for an interval) and the distance to a high-accuracy probability-flow ODE solution from the same noise
  (:func:`network_reference`, scipy DOP853 through :mod:`companion.reference`).
* :func:`schedule_trap_table` measures which samplers survive a model trained with the cosine schedule.
* :func:`step_grid` / :func:`grids_table` / :func:`grid_figure` show the noise levels each step spacing visits;
  :func:`spacing_errors` measures the final-output error of sampler x spacing x steps on the oracle, and
  :func:`ablation_errors` the same for scheduler options the registry fixes (``lower_order_final``), which is where
  few-step sampling breaks.

Errors on the oracle are medians over the batch of per-sample RMS distances (a few trajectories near a basin
boundary would dominate a mean); errors on a network are means with bootstrap intervals
(:func:`companion.metrics.ode_distance`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from . import metrics as M
from . import oracle as O
from . import samplers as S
from .bench import class_labels_for, initial_noise
from .denoiser import Denoiser
from .device import randn
from .reference import reference
from .sampling import SamplingError, float64_arithmetic, float64_tables, sample, scheduler_loop
from .schedules import SCHEDULES, TRAIN_SCHEDULE, SigmaMap

# The order of accuracy each deterministic sampler is designed to have (global error ~ h^p), and why. This is the
# claim to test; the registry's ``order`` field records what the companion measured and derived.
NOMINAL: dict[str, tuple[int, str]] = {
    "ddim": (1, "DDIM (eta=0) is Euler's method on the probability-flow ODE (2010.02502)"),
    "euler": (1, "Euler's method (2206.00364); the same path as DDIM"),
    "heun": (2, "Heun's second-order Runge-Kutta (2206.00364)"),
    "dpm2": (2, "DPM-Solver-2 midpoint step in sigma (2206.00364 / k-diffusion)"),
    "lms": (4, "four-step linear multistep (Adams-Bashforth) in sigma"),
    "pndm": (4, "classical RK4 warm-up + 4-step Adams-Bashforth weights (2202.09778)"),
    "plms": (4, "4-step Adams-Bashforth weights (2202.09778)"),
    "dpmpp_2m": (2, "DPM-Solver++(2M), second-order multistep (2211.01095)"),
    "dpmpp_3m": (3, "DPM-Solver++(3M), third-order multistep (2211.01095)"),
    "dpmpp_3m_corrected": (3, "DPM-Solver++(3M) with the f'' coefficient doubled (docs/dpmpp-3m-order.md)"),
    "unipc": (3, "UniPC: solver order 2 + corrector = order 3 (2302.04867)"),
    "unipc_3": (4, "UniPC: solver order 3 + corrector = order 4 (2302.04867)"),
    "deis": (3, "DEIS exponential Adams-Bashforth on 3 points (2204.13902)"),
    "dpm_solver_1": (1, "DPM-Solver-1 (2206.00927)"),
    "dpm_solver_2": (2, "DPM-Solver-2 (2206.00927)"),
    "dpm_solver_3": (3, "DPM-Solver-3 (2206.00927)"),
}

# Samplers whose order the chapter measures (single-step DPM-Solver has no trailing spacing: its steps never land
# on the measuring timestep; Euler follows DDIM's path exactly).
ORDER_SAMPLERS = ("ddim", "heun", "plms", "lms", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_corrected", "unipc", "deis")
ORDER_STEPS = (100, 125, 200, 250)  # divide 1000 (trailing steps land on t_stop); N >= 100: past multistep warm-up
ORDER_TOLERANCE = 0.5  # half an order: pre-asymptotic fits over N = 100-250 wander by ~0.3 with the batch


def nominal_order(key: str) -> int:
    """The order sampler ``key`` is designed to have; samplers without one (stochastic) raise ``ValueError``."""
    spec = S.get(key)
    if spec.key not in NOMINAL:
        has = ", ".join(NOMINAL)
        raise ValueError(f"sampler {key!r} has no nominal ODE order (stochastic samplers have none); samplers with one: {has}")
    return NOMINAL[spec.key][0]


# ---------------------------------------------------------------------------------------------- orders


def measure_orders(samplers: Sequence[str] = ORDER_SAMPLERS, model=None, steps: Sequence[int] = ORDER_STEPS, *,
                   t_stop: int = 199, batch: int = 32, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Error of every (sampler, steps) run inside the trajectory on an exact-score model (default: the 16-d toy
    mixture), one row each: sampler, name, steps, nfe (network evaluations of the full run), error.

    The error is :func:`convergence_order`'s: median per-sample RMS distance at timestep
    ``t_stop`` to a DOP853 solution (rtol = atol = 1e-10) from the sampler's own initial state, trailing spacing,
    scheduler arithmetic in float64.
    """
    from tqdm.auto import tqdm

    samplers = list(samplers)
    for key in samplers:
        nominal_order(key)  # unknown or stochastic samplers fail before any work
    model = model if model is not None else O.toy_mixture((1, 4, 4))
    rows = []
    for key in tqdm(samplers, desc="convergence orders", disable=not progress):
        r = convergence_order(key, model=model, steps=steps, t_stop=t_stop, seed=seed, batch=batch)
        spec = S.get(key)
        for n, err in zip(r["steps"], r["errors"]):
            rows.append({"sampler": key, "name": spec.name, "steps": n, "nfe": spec.expected_nfe(n), "error": err})
    return pd.DataFrame(rows)


def fit_order(steps: Sequence[float], errors: Sequence[float]) -> float:
    """Minus the least-squares slope of log(error) against log(steps)."""
    steps, errors = np.asarray(steps, dtype=float), np.asarray(errors, dtype=float)
    if len(steps) < 2 or np.any(errors <= 0) or not np.all(np.isfinite(errors)):
        raise ValueError(f"need >= 2 positive, finite errors to fit an order, got {errors.tolist()}")
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def verdict(measured: float, nominal: float, tolerance: float = ORDER_TOLERANCE) -> str:
    """'as designed' within ``tolerance``, else 'LOWER than designed' / 'higher than designed'."""
    if measured < nominal - tolerance:
        return "LOWER than designed"
    if measured > nominal + tolerance:
        return "higher than designed"
    return "as designed"


def order_table(errors: pd.DataFrame, tolerance: float = ORDER_TOLERANCE) -> pd.DataFrame:
    """One row per sampler: nominal order and its basis, measured order (fit over all step counts), verdict."""
    rows = []
    for key, g in errors.groupby("sampler", sort=False):
        order, basis = NOMINAL[key]
        measured = fit_order(g["steps"], g["error"])
        rows.append({"sampler": key, "name": g["name"].iloc[0], "nominal order": order, "measured order": measured,
                     "verdict": verdict(measured, order, tolerance), "basis of the nominal order": basis,
                     "steps": f"{int(g['steps'].min())}-{int(g['steps'].max())}"})
    return pd.DataFrame(rows).set_index("sampler")


def order_figure(errors: pd.DataFrame, title: str = "Error inside the trajectory vs network evaluations (exact score)"):
    """Log-log error vs NFE per sampler (markers and line) with the nominal slope as a dashed line of the same
    colour through the sampler's cheapest run: where the markers fall away from their dashed line, the sampler
    converges more slowly than designed."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    palette = qualitative.Plotly + qualitative.D3
    for i, (key, g) in enumerate(errors.groupby("sampler", sort=False)):
        g = g.sort_values("nfe")
        color = palette[i % len(palette)]
        p = NOMINAL[key][0]
        measured = fit_order(g["steps"], g["error"])
        name = f"{g['name'].iloc[0]} (measured {measured:.1f})"
        fig.add_trace(go.Scatter(x=g["nfe"], y=g["error"], mode="lines+markers", name=name, legendgroup=key,
                                 line=dict(color=color), marker=dict(color=color),
                                 hovertemplate="NFE %{x}<br>error %{y:.3g}<extra>" + key + "</extra>"))
        x0, y0 = float(g["nfe"].iloc[0]), float(g["error"].iloc[0])
        xs = np.array([x0, float(g["nfe"].iloc[-1])])
        fig.add_trace(go.Scatter(x=xs, y=y0 * (xs / x0) ** (-p), mode="lines", name=f"slope -{p} (nominal)",
                                 legendgroup=key, showlegend=False, line=dict(color=color, dash="dash", width=1),
                                 hovertemplate=f"nominal order {p}<extra>{key}</extra>"))
    fig.update_xaxes(type="log", title="network evaluations per sample (NFE)")
    fig.update_yaxes(type="log", exponentformat="power", title="median RMS error at t = 199 (vs DOP853)")
    fig.update_layout(title=title, template="plotly_white", legend_title_text="sampler (dashed: nominal slope)")
    return fig


# ---------------------------------------------------------------------------------------------- on a network

def network_reference(model, n: int, seed: int = 0, *, rtol: float = 1e-4, guidance=None) -> torch.Tensor:
    """High-accuracy probability-flow ODE solution (DOP853, to sigma = 0) from the first ``n`` initial noises that
    :func:`companion.sampling.sample` draws for ``seed``, with balanced class labels for a conditional model.
    Cached by :mod:`companion.reference` (the model's weights as they are, the noise, labels, guidance, rtol).

    On the bundled digits model DOP853 needs ~600 network evaluations at rtol 1e-3 and ~1100 at 1e-4 (the network
    sees t(sigma), which is piecewise linear in log sigma); rtol 1e-4 moves the solution by ~5e-4 RMS from the
    rtol 1e-5 one, well below the 10-50-step errors it is compared with.
    """
    if n < M.MIN_SAMPLES["ode_distance"]:
        raise ValueError(f"n={n}: the ODE distance needs at least {M.MIN_SAMPLES['ode_distance']} samples")
    x_T = initial_noise(model, n, seed)
    labels = class_labels_for(model, n)
    return reference(model, x_T, class_labels=labels, guidance=guidance, rtol=rtol, atol=rtol).float()


def solver_consequence(model, samplers: Sequence[str], steps: Sequence[int] = (10, 20, 50), *, n_fd: int | None = 128,
                       n_ode: int = 8, seed: int = 0, rtol: float = 1e-4, spacing: str | None = None,
                       guidance=None, progress: bool = True) -> pd.DataFrame:
    """Sample ``max(n_fd, n_ode)`` images per (sampler, steps) from one seed and measure them: Frechet distance in the
    bundled feature space over all ``n_fd`` (skipped when ``n_fd`` is None) and the distance of the first ``n_ode``
    to :func:`network_reference`. One row per run, with ``_low``/``_high`` 95 % bootstrap bounds and ``_n``.

    Every sampler gets the same initial noise and the same balanced class labels, so differences are the solver's.
    """
    from tqdm.auto import tqdm

    samplers = list(samplers)
    for key in samplers:
        if S.get(key).stochastic:
            raise ValueError(f"{key!r} is stochastic: it does not approximate the ODE solution the table measures against")
    if n_fd is not None:
        M.require_samples(n_fd, "fd")
    batch = max(n_fd or 0, n_ode)
    ref = network_reference(model, n_ode, seed, rtol=rtol, guidance=guidance)
    labels = class_labels_for(model, batch)
    rows = []
    grid = [(k, n) for k in samplers for n in steps]
    for key, n in tqdm(grid, desc="solvers on the network", disable=not progress):
        res = sample(model, key, int(n), guidance=guidance, spacing=spacing, seed=seed, batch=batch, class_labels=labels)
        rec = res.record
        row = {"sampler": key, "name": S.get(key).name, "spacing": rec.spacing, "steps": int(n), "nfe": rec.nfe,
               "wall_s": rec.wall_s}
        found = {"ode_distance": M.ode_distance(res.samples[:n_ode], ref, sampler=key, seed=seed)}
        if n_fd is not None:
            # class-balanced samples are a stratified design: FD's bias correction and interval keep the strata
            found["fd"] = M.frechet_distance(res.images[:n_fd], seed=seed, labels=None if labels is None else labels[:n_fd])
        row.update(M.as_columns(found))
        rows.append(row)
    return pd.DataFrame(rows)


def interval_text(df: pd.DataFrame, metric: str, digits: int = 3) -> pd.Series:
    """'value [low, high]' strings of a metric's columns, rounded to ``digits`` significant digits."""
    def fmt(v):
        return f"{v:.{digits}g}"

    return df.apply(lambda r: f"{fmt(r[metric])} [{fmt(r[metric + '_low'])}, {fmt(r[metric + '_high'])}]", axis=1)


# ---------------------------------------------------------------------------------------------- step grids


def step_grid(sampler: str, spacing: str, steps: int, scheduler_config: dict | None = None) -> pd.DataFrame:
    """The noise levels a sampler visits with a spacing: one row per step start ``i`` (timestep ``t``, VE noise
    level ``sigma``, ``log_snr`` = -2 log sigma) and a last row for where the last step lands (sigma = 0 at the data
    end: ``log_snr`` inf). Two-stage samplers list each full step once."""
    cfg = scheduler_config or TRAIN_SCHEDULE
    sched = S.build_scheduler(sampler, cfg, spacing=spacing)
    sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps]
    dedup = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]  # PNDM/Heun repeat a timestep per stage
    sig = getattr(sched, "sigmas", None)
    if torch.is_tensor(sig) and len(sig) == len(dedup) + 1 and len(ts) == len(dedup):
        sigmas = [float(s) for s in sig]
    else:
        smap = SigmaMap(cfg)
        sigmas = [float(smap.sigma(torch.tensor(t))) for t in dedup] + [0.0]
    ts_out = dedup + [float("nan")]
    with np.errstate(divide="ignore"):
        log_snr = [-2 * math.log(s) if s > 0 else math.inf for s in sigmas]
    return pd.DataFrame({"sampler": sampler, "spacing": spacing, "steps": steps, "i": range(len(sigmas)),
                         "t": ts_out, "sigma": sigmas, "log_snr": log_snr})


def grids_table(sampler: str = "dpmpp_2m", spacings: Iterable[str] | None = None, steps: int = 10,
                scheduler_config: dict | None = None) -> pd.DataFrame:
    """:func:`step_grid` for every spacing the sampler supports (or those given), stacked."""
    spec = S.get(sampler)
    spacings = list(spacings or spec.spacings)
    return pd.concat([step_grid(sampler, sp, steps, scheduler_config) for sp in spacings], ignore_index=True)


def grid_figure(grids: pd.DataFrame, title: str | None = None):
    """sigma_i against step index i (log y) for each spacing; the final jump to sigma = 0 is marked on the x axis."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for sp, g in grids.groupby("spacing", sort=False):
        pos = g[g["sigma"] > 0]
        fig.add_trace(go.Scatter(x=pos["i"], y=pos["sigma"], mode="lines+markers", name=sp,
                                 text=[f"t={t:g}" for t in pos["t"]],
                                 hovertemplate="step %{x}<br>sigma %{y:.4g}<br>%{text}<extra>" + sp + "</extra>"))
    s = grids["sampler"].iloc[0]
    n = int(grids["steps"].iloc[0])
    fig.update_yaxes(type="log", title="noise level sigma_i (log scale; the last step goes to 0)", exponentformat="power")
    fig.update_xaxes(title="step i", dtick=1)
    fig.update_layout(title=title or f"Where {n} steps of {S.get(s).name} evaluate the network, per spacing",
                      template="plotly_white", legend_title_text="spacing")
    return fig


# ---------------------------------------------------------------------------------------------- few steps


def _per_sample_rms(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1).sqrt()


def oracle_reference(model, x_T: torch.Tensor) -> torch.Tensor:
    """The exact ODE solution at the data end from unit-variance noise ``x_T`` at the last training timestep
    (DOP853, rtol = atol = 1e-10); cached per model and noise. Every spacing is measured against this one
    solution: a spacing that does not start at the last timestep (``leading``) pays for it."""
    return reference(model, x_T.double())


def _finite_median(per: torch.Tensor) -> float:
    return float(per.median()) if torch.isfinite(per).all() else math.inf


def spacing_errors(samplers: Sequence[str], spacings: Sequence[str], steps: Sequence[int], model=None, *,
                   batch: int = 32, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Final-output error of every sampler x spacing x steps on an exact-score model (default: the 16-d toy mixture):
    median per-sample RMS distance to :func:`oracle_reference` from the same noise. One row per run with NFE;
    a spacing the sampler does not offer gives no row (see ``companion.glossary()``'s spacings column); a run
    that diverges has error ``inf`` and its error message in ``note``."""
    from tqdm.auto import tqdm

    model = model if model is not None else O.toy_mixture((1, 4, 4))
    x_T = initial_noise(model, batch, seed)
    ref = oracle_reference(model, x_T)
    grid = [(k, sp, n) for k in samplers for sp in spacings for n in steps if sp in S.get(k).spacings]
    rows = []
    for key, sp, n in tqdm(grid, desc="spacings on the oracle", disable=not progress):
        spec = S.get(key)
        note = ""
        try:
            res = sample(model, key, int(n), spacing=sp, seed=seed, batch=batch)
            err, nfe = _finite_median(_per_sample_rms(res.samples, ref)), res.record.nfe
        except SamplingError as e:
            err, nfe, note = math.inf, spec.expected_nfe(int(n)), str(e).split(";")[0]
        rows.append({"sampler": key, "name": spec.name, "spacing": sp, "steps": int(n), "nfe": nfe, "error": err, "note": note})
    return pd.DataFrame(rows)


def run_scheduler(model, scheduler, x_T: torch.Tensor) -> torch.Tensor:
    """:func:`companion.sampling.scheduler_loop` around a ready scheduler (``set_timesteps`` done) on an
    unconditional model: the final output, non-finite values allowed (an ablation may diverge: that is its result).
    For ablations of scheduler options the registry fixes; everything else uses :func:`companion.sampling.sample`."""
    x = x_T.to(torch.float32) * float(scheduler.init_noise_sigma)
    with torch.no_grad():
        x, _, _ = scheduler_loop(scheduler, Denoiser(model), x, check=False)
    return x


def ablation_errors(samplers: Sequence[str], options: dict, steps: Sequence[int], model=None, *, spacing: str | None = None,
                    batch: int = 32, seed: int = 0) -> pd.DataFrame:
    """Final-output error on the oracle with the registry's scheduler and with ``options`` changed
    (e.g. ``{"lower_order_final": False}``): one row per sampler x setting x steps; non-finite output is error inf.
    Options the scheduler does not have are refused."""
    model = model if model is not None else O.toy_mixture((1, 4, 4))
    x_T = initial_noise(model, batch, seed)
    ref = oracle_reference(model, x_T)
    label = ", ".join(f"{k}={v}" for k, v in options.items())
    rows = []
    for key in samplers:
        base = S.build_scheduler(key, model.scheduler_config, spacing=spacing)
        missing = [k for k in options if k not in base.config]
        if missing:
            raise ValueError(f"{key} ({type(base).__name__}) has no option(s) {missing}; its options: {', '.join(sorted(base.config))}")
        for setting, sched_cfg in (("registry", {}), (label, options)):
            for n in steps:
                sched = type(base).from_config(base.config, **sched_cfg)
                sched.set_timesteps(int(n))
                with np.errstate(all="ignore"):
                    x = run_scheduler(model, sched, x_T)
                rows.append({"sampler": key, "name": S.get(key).name, "setting": setting, "steps": int(n),
                             "error": _finite_median(_per_sample_rms(x, ref))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- the schedule trap


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
    g = torch.Generator().manual_seed(0)
    means = torch.rand((4, 16), generator=g, dtype=torch.float64) * 1.2 - 0.6
    oracles = {name: O.GaussianMixtureOracle(means, stds=0.1, sample_shape=(1, 4, 4), name=f"mixture-{name}",
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
        default = S.REGISTRY[s].default_spacing
        rows.append({
            "sampler": S.REGISTRY[s].name,
            "default spacing": default,
            "linear schedule": verdict(oracles["linear"], s, None),
            "cosine schedule": verdict(oracles["cosine"], s, None),
            "cosine + leading": verdict(oracles["cosine"], s, "leading") if "leading" in S.REGISTRY[s].spacings else "n/a",
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- convergence inside the trajectory


def state_at(model, sampler: str, steps: int, x_T: torch.Tensor, t_stop: int, spacing: str = "trailing",
             float64: bool = True) -> tuple[tuple[float, torch.Tensor], torch.Tensor]:
    """Run ``sampler`` for ``steps`` steps from the noise x_T and return (its own initial state, its state when
    it reaches timestep ``t_stop`` at the start of a step), both in VP scaling (what the network sees).

    For two-stage solvers the state is a full-step state, not a stage. The initial state is returned because
    sigma-parametrised schedulers start from x_T * sigma_max rather than x_T * sqrt(sigma_max^2 + 1): a 2e-5
    relative difference that a reference must share to measure discretisation error alone.
    """
    spec = S.get(sampler)
    if spec.stochastic:
        raise ValueError(f"{sampler!r} is stochastic: convergence to the ODE solution is defined for deterministic samplers")
    sched = S.build_scheduler(spec, model.scheduler_config, spacing=spacing, steps=steps)
    sched.set_timesteps(steps)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        float64_tables(sched, SigmaMap(model.scheduler_config))
    x = x_T.to(dtype) * float(sched.init_noise_sigma)
    seen = {}

    def watch(info):
        seen.setdefault("start", (float(info["t"]), info["x_in"].to(torch.float64)))
        return info["first_order"] and abs(float(info["t"]) - t_stop) < 1e-6

    with float64_arithmetic() if float64 else contextlib.nullcontext():
        _, _, stopped = scheduler_loop(sched, Denoiser(model), x, callback=watch, check=False, eps_dtype=dtype)
    if stopped is not None:
        return seen["start"], stopped["x_in"].to(torch.float64)
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
    model = model if model is not None else O.toy_mixture((1, 4, 4))
    steps = [int(n) for n in steps]
    if len(steps) < 2:
        raise ValueError("convergence_order needs at least two step counts")
    x_T = randn((batch, *model.sample_shape), seed, dtype=torch.float32).to(torch.float64)
    errors = []
    for n in steps:
        (t0, x0), x = state_at(model, sampler, n, x_T, t_stop, spacing=spacing)
        ref = reference(model, x0, t_start=t0, t_end=t_stop, rtol=rtol, atol=atol)
        per_sample = ((x - ref) ** 2).reshape(batch, -1).mean(1).sqrt()
        errors.append(float(per_sample.median()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return {"sampler": sampler, "steps": steps, "errors": errors, "order": float(-slope), "t_stop": t_stop,
            "seed": seed, "batch": batch, "spacing": spacing, "model": getattr(model, "name", type(model).__name__)}
