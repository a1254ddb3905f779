"""The sampler registry: every sampler the companion offers, as data.

Each :class:`SamplerSpec` names a sampler the way users know it (paper, arXiv id, diffusers class, the
AUTOMATIC1111 / ComfyUI name), says what it is (order of accuracy, deterministic or stochastic, network
evaluations per step), and how to build it: ``from_config(model.scheduler_config, **overrides)`` plus the
options of the requested step spacing. Spacings a scheduler cannot do are refused with an error instead of
being ignored. :func:`glossary` returns the table the notebooks show.

Two schedulers here extend diffusers' (subclasses, not forks):

* :class:`DPMSolverMultistep3MCorrected` fixes the third-order multistep DPM-Solver++ update (its ``f''`` term is
  halved in diffusers, which makes "3M" a second-order method; derivation in the class docstring).
* :class:`LMSDiscreteExact` integrates the linear-multistep Lagrange polynomials exactly (numpy polynomials)
  instead of with ``scipy.integrate.quad`` at every step, which was the largest solver overhead of all samplers
  and only accurate to ``epsrel=1e-4``.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from .errors import SamplerError  # noqa: F401  (raised here; defined with the others)

SPACINGS = ("leading", "linspace", "trailing", "karras", "exponential")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
ALL = SPACINGS
NO_SIGMAS = TIMESTEP_SPACINGS



# ---------------------------------------------------------------------------------------------- schedulers


class DPMSolverMultistep3MCorrected(DPMSolverMultistepScheduler):
    r"""DPM-Solver++ 3M whose third-order multistep update has the correct second-derivative coefficient.

    Derivation (data prediction, ODE). With lambda = log(alpha/sigma), h = lambda_t - lambda_s0 and the data
    prediction f(lambda) = x0_theta(x_lambda), the exponential-integrator form of the probability-flow ODE is

        x_t = (sigma_t / sigma_s0) x_s0 + alpha_t \int_0^h e^{-(h-u)} f(lambda_s0 + u) du.

    Expand f(lambda_s0 + u) = f + u f' + u^2/2 f'' + O(u^3) and integrate term by term:

        \int_0^h e^{-(h-u)} du         = 1 - e^{-h}                   = -phi_1 ,          phi_1 = e^{-h} - 1
        \int_0^h e^{-(h-u)} u du       = h - 1 + e^{-h}               =  h phi_2 ,        phi_2 = phi_1/h + 1
        \int_0^h e^{-(h-u)} u^2/2 du   = h^2/2 - h + 1 - e^{-h}       = -h^2 phi_3 ,      phi_3 = phi_2/h - 1/2

    so x_t = (sigma_t/sigma_s0) x_s0 - alpha_t phi_1 f + alpha_t phi_2 (h f') - alpha_t phi_3 (h^2 f'') + O(h^4).

    The multistep update estimates the derivatives from the last three outputs m0, m1, m2 at lambda_s0,
    lambda_s1 = lambda_s0 - h_0, lambda_s2 = lambda_s1 - h_1 (r0 = h_0/h, r1 = h_1/h):

        D1_0 = (m0 - m1)/r0 = h f' - h h_0 f''/2 + O(h^3)
        D1_1 = (m1 - m2)/r1 = h f' - h (h_0 + h_1/2) f'' + O(h^3)
        D1   = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) = h f' + O(h^3)
        D2   = (D1_0 - D1_1)/(r0 + r1)           = h^2 f''/2 + O(h^3)

    D2 is *half* of h^2 f''. The exact term -alpha_t phi_3 (h^2 f'') therefore equals -2 alpha_t phi_3 D2.
    diffusers (and the reference implementation it follows) uses -alpha_t phi_3 D2: the f'' term is halved,
    the local error is O(h^3) and the method is globally second order (measured: 2.0). This class uses
    -2 alpha_t phi_3 D2 (local error O(h^4), global order 3). The single-step third-order DPM-Solver update
    differs: it divides its second difference by h^2 with the factor 2 included.

    Only the ``dpmsolver++`` (ODE) third-order step changes; every other path is diffusers' own.
    """

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if self.config.algorithm_type != "dpmsolver++":
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise, **kwargs)
        i = self.step_index
        sigma_t, sigma_s0, sigma_s1, sigma_s2 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigma_s0)
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(sigma_s1)
        alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(sigma_s2)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        lambda_s2 = torch.log(alpha_s2) - torch.log(sigma_s2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 f''/2
        phi_1 = torch.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return (sigma_t / sigma_s0) * sample - alpha_t * phi_1 * m0 + alpha_t * phi_2 * d1 - 2.0 * alpha_t * phi_3 * d2


class LMSDiscreteExact(LMSDiscreteScheduler):
    """diffusers' LMS with its Lagrange-basis integrals computed exactly (numpy polynomials, no quadrature),
    all of them once in ``set_timesteps`` (for the default order 4 that ``step`` uses)."""

    def set_timesteps(self, *args, **kwargs):
        in_init = not hasattr(self, "derivatives")  # __init__ sets a 1000-step grid nobody samples with
        super().set_timesteps(*args, **kwargs)
        self._coeffs = {}
        if in_init:
            return
        for t in range(len(self.timesteps)):
            order = min(t + 1, 4)
            for k in range(order):
                self._coeffs[(order, t, k)] = self._integrate(order, t, k)

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        cached = getattr(self, "_coeffs", {}).get((order, t, current_order))
        return cached if cached is not None else self._integrate(order, t, current_order)

    def _integrate(self, order: int, t: int, current_order: int) -> float:
        s = [float(self.sigmas[t - k]) for k in range(order)]
        poly = np.poly1d([1.0])
        for k in range(order):
            if k != current_order:
                poly *= np.poly1d([1.0, -s[k]]) / (s[current_order] - s[k])
        antider = poly.integ()
        return float(antider(float(self.sigmas[t + 1])) - antider(float(self.sigmas[t])))


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec:
    key: str
    name: str
    paper: str
    arxiv: str | None
    scheduler: type
    overrides: dict = field(default_factory=dict)
    a1111: str | None = None
    comfyui: str | None = None
    order: int | None = None  # global order of accuracy of the ODE solver (None: stochastic, not an ODE order)
    stochastic: bool = False
    nfe_per_step: int = 1
    spacings: tuple = ALL
    has_eta: bool = False
    note: str = ""
    min_steps: int = 1
    spacing_default: str | None = None  # for schedulers whose timestep placement is not a timestep_spacing option
    max_steps: int | None = None  # None: up to the model's training steps
    steps_reason: str = ""  # why min_steps / max_steps are what they are (said in the refusal)
    # On a flow-matching model (velocity on the linear path, companion.models.FlowModel) the same key runs diffusers'
    # dedicated flow-matching scheduler: its class and the name readers know it by (SD3 / rectified-flow tooling).
    flow_scheduler: str | None = None
    flow_name: str | None = None

    def expected_nfe(self, steps: int) -> int:
        """Network evaluations per sample for ``steps`` steps (without guidance)."""
        if self.key == "pndm":
            return steps + 9  # 3 Runge-Kutta warm-up steps of 4 evaluations each
        if self.key == "plms":
            return steps + 1 if steps > 1 else steps  # the first step is a 2-evaluation predictor-corrector
        if self.nfe_per_step == 2:
            return 2 * steps - 1  # the last step to sigma = 0 is a single Euler step
        return steps

    @property
    def default_spacing(self) -> str:
        """The scheduler's own default (what diffusers' pipelines use when nothing is said)."""
        if self.spacing_default is not None:
            return self.spacing_default
        param = inspect.signature(self.scheduler.__init__).parameters.get("timestep_spacing")
        return param.default if param is not None else "linspace"

    @property
    def diffusers_class(self) -> str:
        return self.scheduler.__name__


def _spec(**kw) -> SamplerSpec:
    return SamplerSpec(**kw)


_MULTI = dict(lower_order_final=True)  # below 15 steps the high-order final steps are unstable (platform facts)

_SPECS = [
    _spec(key="ddpm", name="DDPM (ancestral)", paper="Ho et al., Denoising Diffusion Probabilistic Models", arxiv="2006.11239",
          scheduler=DDPMScheduler, comfyui="ddpm", stochastic=True, spacings=NO_SIGMAS,
          note="the reverse Markov chain; with fewer steps than training steps it skips along the same betas"),
    _spec(key="ddim", name="DDIM", paper="Song et al., Denoising Diffusion Implicit Models", arxiv="2010.02502",
          scheduler=DDIMScheduler, a1111="DDIM", comfyui="ddim", order=1, spacings=NO_SIGMAS,
          has_eta=True, note="eta=0: deterministic (first-order ODE solver, same path as Euler); eta=1: DDPM-like"),
    _spec(key="pndm", name="PNDM", paper="Liu et al., Pseudo Numerical Methods for Diffusion Models on Manifolds", arxiv="2202.09778",
          scheduler=PNDMScheduler, overrides=dict(skip_prk_steps=False), order=2, spacings=NO_SIGMAS, min_steps=4,
          steps_reason="its Runge-Kutta warm-up alone takes 3; use 'plms' for fewer steps",
          note="3 Runge-Kutta warm-up steps (4 NFE each), then 4-step Adams-Bashforth on the pseudo-numerical step; "
               "the weights assume a grid uniform in sigma, which it is not: order 2, not 4"),
    _spec(key="plms", name="PLMS", paper="Liu et al., Pseudo Numerical Methods for Diffusion Models on Manifolds", arxiv="2202.09778",
          scheduler=PNDMScheduler, overrides=dict(skip_prk_steps=True), a1111="PLMS", order=2, spacings=NO_SIGMAS,
          note="PNDM without the Runge-Kutta warm-up (the Stable Diffusion default of 2022); order 2 for the same reason"),
    _spec(key="lms", name="LMS (linear multistep, order 4)", paper="Karras et al., Elucidating the Design Space (sigma ODE); k-diffusion LMS", arxiv="2206.00364",
          scheduler=LMSDiscreteExact, a1111="LMS", comfyui="lms", order=4,
          note="Adams-Bashforth on the sigma-parametrised ODE; coefficients integrated exactly here"),
    _spec(key="euler", name="Euler", paper="Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models", arxiv="2206.00364",
          scheduler=EulerDiscreteScheduler, a1111="Euler", comfyui="euler", order=1,
          flow_scheduler="FlowMatchEulerDiscreteScheduler", flow_name="Flow Matching Euler (rectified flow, SD3's default)"),
    _spec(key="euler_a", name="Euler ancestral", paper="Karras et al. / k-diffusion (ancestral sampling)", arxiv="2206.00364",
          scheduler=EulerAncestralDiscreteScheduler, a1111="Euler a", comfyui="euler_ancestral", stochastic=True, spacings=NO_SIGMAS),
    _spec(key="heun", name="Heun", paper="Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models", arxiv="2206.00364",
          scheduler=HeunDiscreteScheduler, a1111="Heun", comfyui="heun", order=2, nfe_per_step=2,
          flow_scheduler="FlowMatchHeunDiscreteScheduler", flow_name="Flow Matching Heun"),
    _spec(key="dpm2", name="DPM2", paper="Karras et al. / k-diffusion (DPM-Solver-2 in sigma)", arxiv="2206.00364",
          scheduler=KDPM2DiscreteScheduler, a1111="DPM2", comfyui="dpm_2", order=2, nfe_per_step=2),
    _spec(key="dpm2_a", name="DPM2 ancestral", paper="Karras et al. / k-diffusion (DPM-Solver-2, ancestral)", arxiv="2206.00364",
          scheduler=KDPM2AncestralDiscreteScheduler, a1111="DPM2 a", comfyui="dpm_2_ancestral", stochastic=True, nfe_per_step=2,
          min_steps=3, steps_reason="at 2 steps diffusers' KDPM2 ancestral scheduler returns NaN from its first step "
                                    "(seen on an exact-score model, so not a model's divergence)"),
    *[
        _spec(key=f"dpm_solver_{k}", name=f"DPM-Solver-{k} (single-step)", paper="Lu et al., DPM-Solver / DPM-Solver++ (single-step)",
              arxiv="2206.00927", scheduler=DPMSolverSinglestepScheduler,
              overrides=dict(solver_order=k, algorithm_type="dpmsolver++", lower_order_final=True), order=k,
              spacings=("linspace", "karras", "exponential"),
              note="steps counts network evaluations: diffusers spends them in groups of k single-step updates; "
                   "no timestep_spacing option in diffusers (linspace only)")
        for k in (1, 2, 3)
    ],
    _spec(key="dpmpp_2m", name="DPM-Solver++ 2M", paper="Lu et al., DPM-Solver++", arxiv="2211.01095",
          scheduler=DPMSolverMultistepScheduler, overrides=dict(solver_order=2, algorithm_type="dpmsolver++", **_MULTI),
          a1111="DPM++ 2M", comfyui="dpmpp_2m", order=2),
    _spec(key="dpmpp_3m", name="DPM-Solver++ 3M (diffusers)", paper="Lu et al., DPM-Solver++", arxiv="2211.01095",
          scheduler=DPMSolverMultistepScheduler, overrides=dict(solver_order=3, algorithm_type="dpmsolver++", **_MULTI),
          a1111=None, comfyui=None, order=2,
          note="nominally third order, but the multistep update halves the f'' term: measured and derived order 2 "
               "(see dpmpp_3m_corrected and docs/dpmpp-3m-order.md)"),
    _spec(key="dpmpp_3m_corrected", name="DPM-Solver++ 3M (corrected)", paper="Lu et al., DPM-Solver++ (third-order multistep, f'' coefficient doubled)",
          arxiv="2211.01095", scheduler=DPMSolverMultistep3MCorrected,
          overrides=dict(solver_order=3, algorithm_type="dpmsolver++", **_MULTI), order=3,
          note="differs from dpmpp_3m only in the third-order step: D2 = (D1_0 - D1_1)/(r0 + r1) estimates h^2 f''/2, "
               "so its coefficient must be -2*phi_3 (diffusers uses -phi_3); restores order 3"),
    _spec(key="dpmpp_2m_sde", name="DPM-Solver++ 2M SDE", paper="Lu et al., DPM-Solver++ (SDE variant)", arxiv="2211.01095",
          scheduler=DPMSolverMultistepScheduler, overrides=dict(solver_order=2, algorithm_type="sde-dpmsolver++", **_MULTI),
          a1111="DPM++ 2M SDE", comfyui="dpmpp_2m_sde", stochastic=True),
    _spec(key="dpmpp_3m_sde", name="DPM-Solver++ 3M SDE", paper="Lu et al., DPM-Solver++ (SDE variant)", arxiv="2211.01095",
          scheduler=DPMSolverMultistepScheduler, overrides=dict(solver_order=3, algorithm_type="sde-dpmsolver++", **_MULTI),
          a1111="DPM++ 3M SDE", comfyui="dpmpp_3m_sde", stochastic=True),
    _spec(key="unipc", name="UniPC (bh2, order 2 + corrector)", paper="Zhao et al., UniPC", arxiv="2302.04867",
          scheduler=UniPCMultistepScheduler, overrides=dict(solver_order=2, solver_type="bh2", **_MULTI),
          a1111="UniPC", comfyui="uni_pc_bh2", order=3, note="order = solver order + 1 (the corrector reuses the next evaluation)"),
    _spec(key="unipc_3", name="UniPC (bh2, order 3 + corrector)", paper="Zhao et al., UniPC", arxiv="2302.04867",
          scheduler=UniPCMultistepScheduler, overrides=dict(solver_order=3, solver_type="bh2", **_MULTI),
          order=4, note="order = solver order + 1"),
    _spec(key="lcm", name="LCM (multistep consistency sampling)", paper="Luo et al., Latent Consistency Models; Song et al., Consistency Models",
          arxiv="2310.04378", scheduler=LCMScheduler, a1111="LCM", comfyui="lcm", stochastic=True,
          spacings=("trailing",), spacing_default="trailing", max_steps=50,
          steps_reason="LCM picks its steps from a skipping-step grid of 50 timesteps (original_inference_steps=50)",
          note="for consistency-distilled students: each step maps x_t straight to a clean estimate, then re-noises "
               "it with fresh noise to the next timestep (deterministic at 1 step); timesteps come from LCM's "
               "skipping-step grid 999, 979, ..., 19, picked evenly (close to trailing spacing); on an ordinary "
               "noise-prediction model it is a poor sampler"),
    _spec(key="deis", name="DEIS (3rd-order multistep)", paper="Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator",
          arxiv="2204.13902", scheduler=DEISMultistepScheduler, overrides=dict(solver_order=3, **_MULTI),
          comfyui="deis", order=3),
]

REGISTRY: dict[str, SamplerSpec] = {s.key: s for s in _SPECS}


def names() -> list[str]:
    return list(REGISTRY)


def get(key: str) -> SamplerSpec:
    """The spec of sampler ``key``; an unknown key raises :class:`SamplerError` listing the valid ones."""
    if isinstance(key, SamplerSpec):
        return key
    try:
        return REGISTRY[key]
    except (KeyError, TypeError):
        raise SamplerError(f"unknown sampler {key!r}; valid samplers: {', '.join(REGISTRY)}") from None


def spacing_options(spec: SamplerSpec, spacing: str | None) -> tuple[str, dict]:
    """(effective spacing, scheduler config options) for ``spacing``; refuses spacings the scheduler lacks."""
    spacing = spec.default_spacing if spacing is None else spacing
    if spacing not in SPACINGS:
        raise SamplerError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    if spacing not in spec.spacings:
        raise SamplerError(
            f"sampler {spec.key!r} ({spec.diffusers_class}) cannot use spacing {spacing!r}; it supports: {', '.join(spec.spacings)}"
        )
    if spacing == "karras":
        return spacing, {"use_karras_sigmas": True}
    if spacing == "exponential":
        return spacing, {"use_exponential_sigmas": True}
    if spec.scheduler is DPMSolverSinglestepScheduler:
        return spacing, {}  # linspace is its only timestep placement
    if spec.scheduler is LCMScheduler:
        return spacing, {}  # its own skipping-step grid (see the registry note)
    return spacing, {"timestep_spacing": spacing}


def build_scheduler(spec: SamplerSpec | str, scheduler_config: dict, spacing: str | None = None, steps: int | None = None):
    """A fresh scheduler for ``spec`` from a model's training schedule (``from_config``) with the spacing applied."""
    spec = get(spec)
    _, options = spacing_options(spec, spacing)
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if spec.scheduler is DDIMScheduler:
        # clipping x0 to [-1, 1] is a data-range assumption, not part of the solver; a latent or oracle space breaks it
        cfg["clip_sample"] = False
    return spec.scheduler.from_config(cfg, **spec.overrides, **options)


def glossary() -> "pandas.DataFrame":  # noqa: F821
    """One row per sampler: key, names (paper / diffusers / A1111 / ComfyUI), arXiv id, order, NFE per step,
    deterministic or stochastic, eta, supported spacings, what is special about it and its dedicated flow-matching
    scheduler, if any (what the key runs on a flow-matching model)."""
    import pandas as pd

    rows = []
    for s in REGISTRY.values():
        rows.append({
            "key": s.key,
            "name": s.name,
            "paper": s.paper,
            "arxiv": s.arxiv,
            "diffusers": s.diffusers_class + (f" ({', '.join(f'{k}={v}' for k, v in s.overrides.items())})" if s.overrides else ""),
            "A1111": s.a1111 or "",
            "ComfyUI": s.comfyui or "",
            "order": s.order,
            "stochastic": s.stochastic,
            "NFE/step": s.nfe_per_step,
            "eta": s.has_eta,
            "spacings": ", ".join(s.spacings),
            "default spacing": s.default_spacing,
            "note": s.note,
            "flow-matching form": f"{s.flow_name} ({s.flow_scheduler})" if s.flow_scheduler else "",
        })
    return pd.DataFrame(rows)


def spec_dict(spec: SamplerSpec) -> dict:
    d = asdict(spec)
    d["scheduler"] = spec.diffusers_class
    return d
