"""Straight paths: rectified flow (flow matching with the linear path) beside diffusion, with exact ground truth.

A rectified-flow model (:class:`companion.models.FlowModel`, recipe ``digits-flow``) learns the velocity
v(x_t, t) = E[noise - x0 | x_t] of the linear path x_t = (1 - t) x0 + t noise (Liu et al. 2209.03003; Lipman et
al. 2210.02747) and samples by integrating dx/dt = v from t = 1 (noise) to t = 0 (data).

Exact fields. For a Gaussian mixture (:class:`companion.oracle.GaussianMixtureOracle`) x_t given component k is
N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I), so the velocity is closed-form (:class:`FlowOracle`, exact at every
t in [0, 1], both ends included). The diffusion probability-flow ODE is written as a flow on the same clock
(t = 1 noise, t = 0 data) by :func:`vp_velocity`: the continuous-time VP process of the linear beta schedule
(beta from 0.1 to 20, the limit of the companion's 1000-step training schedule), dx/dt = alpha' E[x0|x] + s' E[noise|x].

What is measured here:

* :func:`flow_orders`: the convergence order of the flow samplers (diffusers' FlowMatch Euler / Heun) on the exact
  field, against a DOP853 solution from the same noise, fitted and judged with :mod:`companion.orders`;
* :func:`straightness`: Liu et al.'s straightness S = int_0^1 E ||(x(1) - x(0)) - v(x(t), t)||^2 dt of ODE
  trajectories (0 for straight paths run at constant speed), their excess length (path length / chord - 1) and
  total turning angle (the integral of curvature along the path), for exact fields (:func:`exact_trajectories`) and
  for networks (:func:`network_straightness`, from a sampler's own trajectory);
* :func:`diffusion_as_flow_gap`: that the exact VP probability-flow ODE and the exact rectified flow carry the same
  noise to the same samples (they are one transport on another clock and zoom);
* :func:`equal_nfe` / :func:`equal_nfe_table`: a flow model against a diffusion model at equal NFE (FD, verdicts);
  :func:`equal_nfe_runs` any models so (the reflow student against its flow teacher);
* :func:`digits_flow_quality`: the quality recorded in the flow model's card.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
from scipy.integrate import solve_ivp

from . import metrics
from . import samplers as registry
from .denoiser import Denoiser, require_diffusion
from .device import randn
from .models import FLOW_SCHEDULE
from .oracle import GaussianMixtureOracle, toy_mixture
from .orders import NOMINAL, fit_order, verdict
from .pipelines import check_flow_sampler, flow_scheduler
from .quality import digits_class_quality
from .sampling import SamplingError, sample, scheduler_loop
from .verdicts import judge

# ---------------------------------------------------------------------------------------------- exact fields


def _mixture_terms(mix: GaussianMixtureOracle, xf: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """For x = a x0 + b noise with x0 ~ the mixture: the components' responsibilities r (B, K) and the per-component
    variance of x, var (B, K) = a^2 s_k^2 + b^2. a, b are (B, 1) float64."""
    var = a**2 * mix.variances[None, :] + b**2  # (B, K)
    d = xf.shape[1]
    x2 = (xf**2).sum(1, keepdim=True)
    m2 = (mix.means**2).sum(1)[None, :]
    sq = (x2 - 2 * a * (xf @ mix.means.T) + a**2 * m2).clamp_min(0)  # |x - a mu_k|^2
    logits = mix.log_weights[None, :] - 0.5 * sq / var - 0.5 * d * var.log()
    r = (logits - logits.amax(1, keepdim=True)).exp()
    return r / r.sum(1, keepdim=True), var


def posterior_means(mix: GaussianMixtureOracle, x: torch.Tensor, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x0 | x], E[noise | x] / b) for x = a x0 + b noise, x0 from the mixture, noise ~ N(0, I); a, b scalars or (B,).

    Given component k, (x0, noise, x) are jointly Gaussian: E[x0 | x, k] = mu_k + a s_k^2 / var_k (x - a mu_k) and
    E[noise | x, k] = b / var_k (x - a mu_k) with var_k = a^2 s_k^2 + b^2; mixing over k with the responsibilities
    gives both exactly (float64). The second is returned divided by b so that it stays finite where b = 0 (the
    data end), where velocities multiply it by b' ~ 1 / b."""
    n = x.shape[0]
    xf = x.reshape(n, -1).to(torch.float64)
    a = torch.as_tensor(a, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(n, 1)
    b = torch.as_tensor(b, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(n, 1)
    r, var = _mixture_terms(mix, xf, a, b)
    g0 = r * a * mix.variances[None, :] / var  # r_k a s_k^2 / var_k
    gz = r / var  # r_k / var_k
    # sum_k c_k (x - a mu_k) = (sum_k c_k) x - a (c @ mu)
    x0 = r @ mix.means + g0.sum(1, keepdim=True) * xf - a * (g0 @ mix.means)
    z_over_b = gz.sum(1, keepdim=True) * xf - a * (gz @ mix.means)
    return x0.reshape(x.shape), z_over_b.reshape(x.shape)


def flow_velocity(mix: GaussianMixtureOracle, x: torch.Tensor, t) -> torch.Tensor:
    """Exact velocity E[noise - x0 | x_t = x] of the linear path x_t = (1 - t) x0 + t noise (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    x0, z_over_b = posterior_means(mix, x, 1 - t, t)
    return t.reshape((-1,) + (1,) * (x.ndim - 1)) * z_over_b - x0


# The continuous-time VP process of the linear beta schedule (Song et al. 2011.13456): beta(t) = 0.1 + 19.9 t;
# alpha(t) = exp(-int_0^t beta / 2); its alpha(1)^2 = 4.3e-5 matches the 1000-step schedule's last alphas_cumprod.
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def vp_alpha(t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-0.25 * t**2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * t * VP_BETA_MIN)


def vp_velocity(mix: GaussianMixtureOracle, x: torch.Tensor, t) -> torch.Tensor:
    """Exact probability-flow ODE of the VP diffusion as a flow on t in [0, 1]: x_t = alpha(t) x0 + s(t) noise,
    s = sqrt(1 - alpha^2), dx/dt = alpha'(t) E[x0 | x] + s'(t) E[noise | x] (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    a = vp_alpha(t)
    s = (1 - a**2).sqrt()
    da = -0.5 * (VP_BETA_MIN + t * (VP_BETA_MAX - VP_BETA_MIN)) * a
    x0, z_over_s = posterior_means(mix, x, a, s)
    shape = (-1,) + (1,) * (x.ndim - 1)
    # s' E[noise | x] = (-a a' / s) (s z_over_s): finite at t = 0, where s = 0 and s' is infinite
    return da.reshape(shape) * x0 - (a * da).reshape(shape) * z_over_s


class FlowOracle(torch.nn.Module):
    """The exact rectified flow of a Gaussian mixture with the :class:`companion.models.FlowModel` interface:
    :meth:`predict_noise` returns the exact velocity at timestep t * 1000, so :func:`companion.sampling.sample`
    runs the flow samplers on it as on a trained flow model (and refuses the diffusion-only ones)."""

    kind = "flow-oracle"
    prediction = "flow"
    conditional = False
    is_latent = False

    # what it shares with the mixture it wraps (not the diffusion-specific calls: eps, posterior mean)
    SHARED = frozenset({"null_class", "device", "encode", "decode", "sample_data", "num_train_timesteps"})

    def __init__(self, mixture: GaussianMixtureOracle | None = None, *, name: str | None = None):
        super().__init__()
        self.mixture = mixture if mixture is not None else toy_mixture((1, 4, 4))
        self.sample_shape = self.image_shape = self.mixture.sample_shape
        self.name = name or f"flow-{self.mixture.name}"
        self.scheduler_config = dict(FLOW_SCHEDULE)
        self.num_classes = self.cond_shape = self.vae = None
        self.card = dict(self.mixture.card, kind=self.kind, name=self.name)
        if self.mixture.num_train_timesteps != FLOW_SCHEDULE["num_train_timesteps"]:
            raise ValueError(f"the mixture's schedule has {self.mixture.num_train_timesteps} timesteps; the flow clock "
                             f"maps t to t * {FLOW_SCHEDULE['num_train_timesteps']}")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in FlowOracle.SHARED:
                return getattr(self._modules["mixture"], name)
            raise

    @property
    def sha256(self) -> str:
        return self.mixture.sha256 + "-flow"

    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """Exact velocity at flow time t in [0, 1] (float64)."""
        return flow_velocity(self.mixture, x, t)

    def predict_noise(self, x, t, class_labels=None, cond=None):
        if class_labels is not None or cond is not None:
            raise ValueError(f"oracle {self.name!r} is unconditional: it takes no class labels or cond")
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device) / self.num_train_timesteps
        return self.velocity(x, t).to(x.dtype)


def flow_ode(field, x1: torch.Tensor, t_end: float = 0.0, *, t_start: float = 1.0, rtol: float = 1e-10,
             atol: float = 1e-10) -> torch.Tensor:
    """Solve dx/dt = field(x, t) from x(t_start) = ``x1`` to t = ``t_end`` with scipy's DOP853 (float64)."""
    shape = x1.shape

    def rhs(t, y):
        return field(torch.from_numpy(y).reshape(shape), t).reshape(-1).numpy()

    sol = solve_ivp(rhs, (float(t_start), float(t_end)), x1.detach().cpu().to(torch.float64).reshape(-1).numpy(),
                    method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"flow ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


# ---------------------------------------------------------------------------------------------- orders

FLOW_ORDER_SAMPLERS = ("euler", "heun")
FLOW_ORDER_STEPS = (8, 16, 32, 64)
FLOW_ORDER_TOLERANCE = 0.3


def flow_run(model, sampler: str, steps: int, x_T: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run flow ``sampler`` (its diffusers flow-matching scheduler) for ``steps`` steps from noise ``x_T`` on an
    unconditional flow model through :func:`companion.sampling.scheduler_loop`: (the final state, the flow time
    it ends at, read from the scheduler, so that an error is measured at the time a sampler actually reaches)."""
    spec = registry.get(sampler)
    if getattr(model, "prediction", None) != "flow":
        raise SamplingError(f"flow_run integrates a flow-matching model's velocity; {getattr(model, 'name', 'model')!r} "
                            f"is a diffusion model: measure its order with companion.orders.convergence_order "
                            f"(samplers: {', '.join(NOMINAL)}), or pass a FlowOracle / flow model")
    sched = flow_scheduler(spec, model, int(steps), torch.device("cpu"))
    with torch.no_grad():
        x, _, _ = scheduler_loop(sched, Denoiser(model), x_T.to(torch.float32), check=False)
    return x.to(torch.float64), float(sched.sigmas[sched.step_index])


def flow_orders(samplers: Sequence[str] = FLOW_ORDER_SAMPLERS, model: FlowOracle | None = None,
                steps: Sequence[int] = FLOW_ORDER_STEPS, *, batch: int = 32, seed: int = 0) -> pd.DataFrame:
    """Error of every (flow sampler, steps) run on the exact rectified flow: median per-sample RMS distance of the
    final state to a DOP853 solution (rtol = atol = 1e-10) from the same noise to the same end time. One row per
    run: sampler, name, steps, nfe, end time, error. :func:`flow_order_table` fits and judges the orders."""
    model = model if model is not None else FlowOracle()
    x_T = randn((batch, *model.sample_shape), seed, dtype=torch.float32)
    refs: dict[float, torch.Tensor] = {}
    rows = []
    for key in samplers:
        spec = registry.get(key)
        check_flow_sampler(spec, model)
        for n in steps:
            x, t_end = flow_run(model, key, n, x_T)
            if t_end not in refs:
                refs[t_end] = flow_ode(model.velocity, x_T, t_end)
            err = float((x - refs[t_end]).pow(2).flatten(1).mean(1).sqrt().median())
            rows.append({"sampler": key, "name": f"FlowMatch {spec.name}", "steps": int(n), "nfe": spec.expected_nfe(int(n)),
                         "t_end": t_end, "error": err})
    return pd.DataFrame(rows)


def flow_order_table(errors: pd.DataFrame, tolerance: float = FLOW_ORDER_TOLERANCE) -> pd.DataFrame:
    """One row per sampler: nominal order (:data:`companion.orders.NOMINAL`), measured order, verdict."""
    rows = []
    for key, g in errors.groupby("sampler", sort=False):
        order, basis = NOMINAL[key]
        measured = fit_order(g["steps"], g["error"])
        rows.append({"sampler": key, "name": g["name"].iloc[0], "nominal order": order, "measured order": round(measured, 3),
                     "verdict": verdict(measured, order, tolerance), "basis of the nominal order": basis,
                     "steps": f"{int(g['steps'].min())}-{int(g['steps'].max())}"})
    return pd.DataFrame(rows).set_index("sampler")


# ---------------------------------------------------------------------------------------------- straightness


def straightness(times: torch.Tensor, states: torch.Tensor, velocities: torch.Tensor | None = None) -> dict:
    """Straightness and curvature of ODE trajectories sampled at ``times`` (T,), from t = 1 (noise) down to t = 0.

    ``states`` (T, B, ...) are the positions. ``velocities`` (T, B, ...) dx/dt at the nodes, when known exactly;
    otherwise each segment's mean velocity (finite differences) is used. Returns per-dimension means over the batch:

    * ``straightness``: Liu et al.'s S = int E ||(x(1) - x(0)) - v(x(t), t)||^2 dt / D (0: straight, constant speed);
      since int v dt is the chord x(1) - x(0), S is the variance of the velocity over time, and it splits exactly
      into ``straightness_bend`` (the velocity's part across the chord: the path bends) and ``straightness_speed``
      (its part along the chord minus the chord: the path is run at uneven speed);
    * ``relative_straightness``: S divided by E ||x(1) - x(0)||^2 / D (a scale-free share);
    * ``excess_length``: path length / chord length - 1 (0: straight; independent of the clock);
    * ``turning_deg``: total turning angle along the path in degrees (the integral of curvature; 0: straight).
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    x = states.to(torch.float64).flatten(2)  # (T, B, D)
    d = x.shape[-1]
    chord = x[0] - x[-1]  # x(1) - x(0): noise end minus data end, the direction of v = noise - x0
    dt = times[:-1] - times[1:]  # > 0
    seg = x[:-1] - x[1:]  # (T-1, B, D), pointing towards the noise end like v
    c2 = chord.pow(2).sum(-1)
    u = chord / c2.sqrt()[:, None].clamp_min(1e-300)
    v = velocities.to(torch.float64).flatten(2) if velocities is not None else seg / dt[:, None, None]
    dev = (chord[None] - v).pow(2).sum(-1)  # (T or T-1, B)
    bend = (v - (v * u[None]).sum(-1, keepdim=True) * u[None]).pow(2).sum(-1)
    if velocities is not None:  # trapezoid over the nodes

        def integrate(f):
            return 0.5 * ((f[:-1] + f[1:]) * dt[:, None]).sum(0)
    else:  # one mean velocity per segment

        def integrate(f):
            return (f * dt[:, None]).sum(0)
    s, s_bend = integrate(dev), integrate(bend)
    length = seg.norm(dim=-1).sum(0)
    unit = seg / seg.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = (unit[:-1] * unit[1:]).sum(-1).clamp(-1, 1)
    turning = torch.rad2deg(torch.acos(cos)).sum(0)
    return {"straightness": float(s.mean() / d), "straightness_bend": float(s_bend.mean() / d),
            "straightness_speed": float((s - s_bend).mean() / d), "relative_straightness": float((s / c2).mean()),
            "excess_length": float((length / c2.sqrt() - 1).mean()), "turning_deg": float(turning.mean()),
            "n": int(x.shape[1]), "nodes": int(x.shape[0])}


FIELDS = ("rectified flow", "VP diffusion (probability-flow ODE)")


def exact_trajectories(mixture: GaussianMixtureOracle, field: str, x1: torch.Tensor, nodes: int = 257
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(times, states, exact velocities) of the exact ODE of ``field`` (one of :data:`FIELDS`) from x(1) = x1 on a
    uniform grid of ``nodes`` times from 1 to 0, integrated with classical RK4 in float64 between the nodes (the
    fields are smooth on [0, 1]; 256 steps agree with DOP853 to ~1e-9 on the toy mixture)."""
    fields = {FIELDS[0]: flow_velocity, FIELDS[1]: vp_velocity}
    if field not in fields:
        raise ValueError(f"unknown field {field!r}; valid: {', '.join(FIELDS)}")
    f = fields[field]
    times = torch.linspace(1.0, 0.0, nodes, dtype=torch.float64)
    x = x1.to(torch.float64) * (1.0 if field == FIELDS[0] else float((1 - vp_alpha(1.0) ** 2).sqrt()))
    xs, vs = [x], [f(mixture, x, times[0])]
    for i in range(nodes - 1):
        t, h = times[i], times[i + 1] - times[i]
        k1 = vs[-1]
        k2 = f(mixture, x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(mixture, x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(mixture, x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(x)
        vs.append(f(mixture, x, times[i + 1]))
    return times, torch.stack(xs), torch.stack(vs)


def exact_straightness(mixture: GaussianMixtureOracle | None = None, *, batch: int = 256, seed: int = 0,
                       nodes: int = 257) -> pd.DataFrame:
    """:func:`straightness` of the exact rectified flow and of the exact VP probability-flow ODE from the same noise
    on the same clock, one row per field."""
    mixture = mixture if mixture is not None else toy_mixture((1, 4, 4))
    x1 = randn((batch, *mixture.sample_shape), seed, dtype=torch.float32).to(torch.float64)
    rows = []
    for field in FIELDS:
        times, xs, vs = exact_trajectories(mixture, field, x1, nodes)
        rows.append({"field": field, **straightness(times, xs, vs)})
    return pd.DataFrame(rows).set_index("field")


def diffusion_as_flow_gap(mixture: GaussianMixtureOracle | None = None, *, batch: int = 32, seed: int = 0,
                          rtol: float = 1e-10) -> float:
    """How far apart the samples of the exact VP probability-flow ODE and the exact rectified flow land from the same
    starting state (median per-sample RMS distance; both with DOP853).

    Both are Gaussian paths of the same data: x_vp = (x0 + sigma noise) / sqrt(1 + sigma^2) and x_flow = (x0 + sigma
    noise) / (1 + sigma), the flow at time t = sigma / (1 + sigma). So the VP start x_vp(1) (sigma = s/alpha ~ 152) is
    the flow state x_vp sqrt(1 + sigma^2) / (1 + sigma) at that time, and if the two ODEs are one transport seen
    through another clock and a time-dependent zoom, they land on the same samples: the gap is rounding."""
    mixture = mixture if mixture is not None else toy_mixture((1, 4, 4))
    x1 = randn((batch, *mixture.sample_shape), seed, dtype=torch.float32).to(torch.float64)
    a1 = float(vp_alpha(1.0))
    s1 = math.sqrt(1 - a1**2)
    x_vp1 = s1 * x1
    vp_end = flow_ode(lambda x, t: vp_velocity(mixture, x, t), x_vp1, 0.0, rtol=rtol, atol=rtol)
    sigma = s1 / a1
    x_flow = x_vp1 * math.sqrt(1 + sigma**2) / (1 + sigma)
    flow_end = flow_ode(lambda x, t: flow_velocity(mixture, x, t), x_flow, 0.0, t_start=sigma / (1 + sigma), rtol=rtol, atol=rtol)
    return float((vp_end - flow_end).pow(2).flatten(1).mean(1).sqrt().median())


def network_trajectories(model, sampler: str, steps: int, *, n: int = 64, seed: int = 0, guidance: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(times, states) of a deterministic sampler's own trajectory on a trained model, on the flow clock t in [0, 1]
    (t = 1 noise): a flow model's timesteps are t * 1000; a diffusion model's timestep k is t = (k + 1) / 1000
    (its states in VP scaling, as its network sees them). Conditional models get balanced class labels."""
    spec = registry.get(sampler)
    if spec.stochastic:
        raise ValueError(f"{sampler!r} is stochastic: straightness is a property of ODE trajectories; "
                         f"use a deterministic sampler")
    labels = torch.arange(n) % model.num_classes if getattr(model, "num_classes", None) else None
    res = sample(model, sampler, steps, seed=seed, batch=n, class_labels=labels, guidance=guidance, return_trajectory=True)
    flow = getattr(model, "prediction", None) == "flow"
    n_train = model.num_train_timesteps
    times = [0.0 if t < 0 else (t / n_train if flow else (t + 1) / n_train) for t, _ in res.trajectory]
    return torch.tensor(times, dtype=torch.float64), torch.stack([x for _, x in res.trajectory])


def network_straightness(models: dict, *, steps: int = 32, n: int = 64, seed: int = 0) -> pd.DataFrame:
    """:func:`straightness` of trained models' own trajectories from the same noise, one row per model: a flow model
    with FlowMatch Euler, a diffusion model with DDIM (Euler on its probability-flow ODE), ``steps`` steps each
    (segment velocities by finite differences: the trajectory's own straightness, not the exact field's)."""
    rows = []
    for label, model in models.items():
        sampler = "euler" if getattr(model, "prediction", None) == "flow" else "ddim"
        times, xs = network_trajectories(model, sampler, steps, n=n, seed=seed)
        rows.append({"model": label, "sampler": f"{registry.get(sampler).name}, {steps} steps", **straightness(times, xs)})
    return pd.DataFrame(rows).set_index("model")


# ---------------------------------------------------------------------------------------------- flow vs diffusion

EQUAL_NFE_STEPS = (2, 4, 8)


def flow_grid(model, sampler: str, steps: int) -> list[float]:
    """The sigma (= t) grid a flow sampler runs on ``model`` at ``steps`` steps, ending in 0, as diffusers builds it.

    diffusers' FlowMatch schedulers space their timesteps from sigma = 1 to 1 / num_train_timesteps and then step
    to 0, so at k steps the last call covers only the final 0.1 % of the path: k calls, about k - 1 useful steps."""
    sched = flow_scheduler(registry.get(sampler), model, int(steps), torch.device("cpu"))
    return [round(float(s), 6) for s in sched.sigmas]


def first_order_sampling(model) -> dict:
    """``sample()`` arguments of the first-order solver of a model's own ODE, one network call per step: FlowMatch
    Euler on a flow model, DDIM with trailing spacing on a diffusion model."""
    if getattr(model, "prediction", None) == "flow":
        return {"sampler": "euler"}
    return {"sampler": "ddim", "spacing": "trailing"}


def equal_nfe_runs(models: dict, steps: Sequence[int] = EQUAL_NFE_STEPS, *, n: int = 500, seed: int = 0,
                   guidance: float | None = None) -> dict:
    """Frechet distance (features-digits, bootstrap interval) of each model in ``{kind: model}`` with
    :func:`first_order_sampling` at each step count, from the same noise and balanced class labels:
    ``{(kind, steps): (Measurement, result)}``."""
    metrics.require_samples(n, "fd")
    labels = torch.arange(n) % 10
    out = {}
    for k in steps:
        for kind, model in models.items():
            res = sample(model, steps=int(k), seed=seed, batch=n, class_labels=labels, guidance=guidance,
                         **first_order_sampling(model))
            out[(kind, int(k))] = (metrics.frechet_distance(res.images.clamp(-1, 1), labels=labels, seed=seed), res)
    return out


def equal_nfe(flow_model, diffusion_model, steps: Sequence[int] = EQUAL_NFE_STEPS, *, n: int = 500, seed: int = 0,
              guidance: float | None = None) -> dict:
    """:func:`equal_nfe_runs` of a flow model (kind "flow", FlowMatch Euler) and a diffusion model (kind "diffusion",
    DDIM with trailing spacing: both first-order, one network call per step)."""
    if getattr(flow_model, "prediction", None) != "flow":
        raise SamplingError(f"flow_model {getattr(flow_model, 'name', '?')!r} is not a flow-matching model")
    require_diffusion(diffusion_model, "equal_nfe's diffusion_model")
    return equal_nfe_runs({"flow": flow_model, "diffusion": diffusion_model}, steps, n=n, seed=seed, guidance=guidance)


def equal_nfe_table(runs: dict, rule=None) -> pd.DataFrame:
    """One row per step count: NFE of each side (from the run records), FD of each with its interval and, with a
    :class:`companion.verdicts.Rule` (the first kind judged against the second), the verdict's outcome."""
    kinds = list(dict.fromkeys(kind for kind, _ in runs))
    if len(kinds) != 2:
        raise ValueError(f"equal_nfe_table compares two kinds of run, got {kinds}")
    a, b = kinds
    rows = []
    for k in sorted({k for _, k in runs}):
        (fd_a, res_a), (fd_b, res_b) = runs[(a, k)], runs[(b, k)]
        row = {"steps": k, f"NFE {a} / {b}": f"{res_a.record.nfe} / {res_b.record.nfe}",
               f"FD {a} [95 %]": f"{fd_a.value:.2f} [{fd_a.low:.2f}, {fd_a.high:.2f}]",
               f"FD {b} [95 %]": f"{fd_b.value:.2f} [{fd_b.low:.2f}, {fd_b.high:.2f}]"}
        if rule is not None:
            row["verdict"] = judge(rule, fd_a, fd_b).outcome
        rows.append(row)
    return pd.DataFrame(rows).set_index("steps")


# ---------------------------------------------------------------------------------------------- the card

FLOW_EVAL_SAMPLER = "euler"  # diffusers' FlowMatchEulerDiscreteScheduler on a flow model
FLOW_EVAL_STEPS = 50


@torch.no_grad()
def flow_samples(model, n: int, *, sampler: str = FLOW_EVAL_SAMPLER, steps: int = FLOW_EVAL_STEPS,
                 guidance: float | None = None, class_labels: torch.Tensor | None = None, seed: int = 0,
                 batch: int = 250) -> torch.Tensor:
    """``n`` samples of a flow model with a flow sampler, in chunks of ``batch`` (chunk i from seed ``seed + i``)."""
    return torch.cat([sample(model, sampler, steps, seed=seed + i, batch=min(batch, n - j), guidance=guidance,
                             class_labels=None if class_labels is None else class_labels[j : j + batch]).images
                      for i, j in enumerate(range(0, n, batch))])


def digits_flow_quality(model, progress, guidances=(1.0, 2.0, 3.0)) -> dict:
    """The card measurement of a class-conditional flow model on digits, as digits-cond's
    (:func:`companion.quality.digits_class_quality`), from FlowMatch Euler samples, with the out-of-range share."""
    labels = torch.arange(10).repeat_interleave(50)
    return digits_class_quality(lambda g: flow_samples(model, len(labels), guidance=g, class_labels=labels, seed=1), labels,
                                f"FlowMatch Euler ({FLOW_EVAL_SAMPLER}), {FLOW_EVAL_STEPS} steps", guidances, out_of_range=True)
