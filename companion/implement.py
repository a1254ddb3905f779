"""Implement-it exercises: the reader writes one piece of a method (a DDIM step, the classifier-free guidance
combination, ...) and :func:`grade` compares it with the companion's own implementation on seeded random inputs.

Each exercise in :data:`EXERCISES` names the function the reader writes, its signature, the cases (inputs and the
reference output, computed by the code the chapters run: diffusers' schedulers as :mod:`companion.samplers` builds
them, :class:`companion.denoiser.Denoiser`, :func:`companion.sde.sample_sde`, :func:`companion.distill.pd_target`,
:func:`companion.metrics.plug_in_fd`, :class:`companion.caching.DeepCache`) and the tolerance. :func:`grade` prints
one line, ``PASS`` or ``NOT YET`` (through :func:`companion.exercises.check`): on NOT YET where the function
differs most, by how much, what the reference gives there, and, where the output matches a known mistake (a sign
flipped, a factor off), which one.

In the chapters the solution sits between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` in a cell tagged
``implement-it``; :func:`student_notebook` replaces those lines by a ``raise NotImplementedError(...)`` (``companion
student-notebooks`` writes the student versions), so the stored notebooks, which CI runs, are the solutions.
"""
from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import samplers, sde
from .caching import DeepCache
from .denoiser import Conditioning, Denoiser
from .device import generator, randn
from .distill import pd_target
from .exercises import check
from .metrics import Reference, plug_in_fd
from .models import load
from .oracle import toy_mixture
from .schedules import TRAIN_SCHEDULE

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
TAG = "implement-it"  # the tag of a notebook cell that holds a solution between the markers
SEED = 1234  # the random cases are the same in every run: a PASS or a NOT YET does not depend on luck


@dataclass(frozen=True)
class Case:
    """One input of an exercise with the reference output: ``label`` says where it is (a timestep, a scale)."""

    label: str
    args: tuple
    reference: torch.Tensor


@dataclass(frozen=True)
class Exercise:
    """An implement-it exercise: the function the reader writes, its cases and the tolerance.

    A case passes when every element satisfies ``|yours - reference| <= atol + rtol * |reference|``.
    ``mistakes``: description -> a wrong implementation with the reader's signature (a mistake the feedback names
    when the reader's output matches it).
    """

    key: str  # also the name of the function the reader writes
    chapter: str
    signature: str
    task: str
    reference_name: str
    cases: Callable[[Any], list[Case]]
    mistakes: dict[str, Callable]
    atol: float
    rtol: float
    needs_model: bool = False
    describe: Callable[[float], str] = lambda v: f"{v:.5g}"


def _x(shape, seed: int) -> torch.Tensor:
    return randn(shape, seed)


# ------------------------------------------------------------------------------------------------ DDIM (ch 01)
def _ddim_cases(_model) -> list[Case]:
    """Deterministic DDIM (eta = 0) steps of diffusers' DDIMScheduler as the registry builds it, 10 steps."""
    sched = samplers.build_scheduler("ddim", TRAIN_SCHEDULE)
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod.double()
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    cases = []
    for i, t in enumerate(sched.timesteps.tolist()):
        x_t, eps = _x((4, 1, 8, 8), SEED + 2 * i), _x((4, 1, 8, 8), SEED + 2 * i + 1)
        prev = t - stride
        a_prev = float(abar[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        ref = sched.step(eps, t, x_t, eta=0.0).prev_sample
        cases.append(Case(f"t={t} -> {max(prev, -1)} (abar_t={float(abar[t]):.4g}, abar_prev={a_prev:.4g})",
                          (x_t.clone(), eps.clone(), float(abar[t]), a_prev), ref))
    return cases


def _ddim_x0(x_t, eps, a_t, sign=1.0):
    return (x_t - sign * math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)


DDIM_MISTAKES = {
    "the eps term's sign flipped in x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)":
        lambda x, e, a, ap: math.sqrt(ap) * _ddim_x0(x, e, a, -1.0) + math.sqrt(1 - ap) * e,
    "the direction term sqrt(1 - abar_prev) eps left out":
        lambda x, e, a, ap: math.sqrt(ap) * _ddim_x0(x, e, a),
    "abar used where its square root belongs (x0 scaled by abar_prev, not sqrt(abar_prev))":
        lambda x, e, a, ap: ap * _ddim_x0(x, e, a) + math.sqrt(1 - ap) * e,
    "abar_t and abar_prev swapped":
        lambda x, e, a, ap: math.sqrt(a) * _ddim_x0(x, e, ap) + math.sqrt(1 - a) * e,
}


# ------------------------------------------------------------------------------------------------ CFG (ch 04)
def _cfg_cases(_model) -> list[Case]:
    """The guided eps of :class:`companion.denoiser.Denoiser` (the one network call every sampler uses), with its
    network replaced by fixed conditional and unconditional predictions."""
    stand_in = types.SimpleNamespace(name="cfg-grader", conditional=True, num_classes=10, null_class=10,
                                     predict_noise=None)
    cases = []
    for i, w in enumerate((0.0, 1.0, 1.5, 3.0, 7.5)):
        eps_c, eps_u = _x((3, 1, 8, 8), SEED + 10 * i), _x((3, 1, 8, 8), SEED + 10 * i + 1)
        den = Denoiser(stand_in, Conditioning(class_labels=torch.tensor([1, 2, 3])), guidance=w)
        den.wrap(lambda _net, c=eps_c, u=eps_u: (lambda x, t, **kw: torch.cat([c, u])))
        ref = den.eps(torch.zeros_like(eps_c), 500)
        cases.append(Case(f"w={w:g}", (eps_c.clone(), eps_u.clone(), w), ref))
    return cases


CFG_MISTAKES = {
    "eps_c and eps_u swapped (eps_c + w (eps_u - eps_c))": lambda c, u, w: c + w * (u - c),
    "the other convention, eps_c + w (eps_c - eps_u): that is scale w + 1 here": lambda c, u, w: c + w * (c - u),
    "the base eps_u left out (only w (eps_c - eps_u))": lambda c, u, w: w * (c - u),
}


# ------------------------------------------------------------------------------------- Euler-Maruyama (ch 05)
EM_STEPS = 6


def _em_cases(_model) -> list[Case]:
    """Steps of :func:`companion.sde.sample_sde` (``euler_maruyama``) on a toy mixture, its network replaced by
    seeded random eps; each step's output is the state the next network call receives. The per-step noise z is
    drawn from the same seeded stream the sampler draws from (seed + 1)."""
    oracle = toy_mixture()
    _, sigmas = sde.noise_levels(oracle, EM_STEPS)
    batch = 4
    shape = (batch, *oracle.sample_shape)
    eps = [_x(shape, SEED + 100 + k) for k in range(EM_STEPS)]
    seen: list[torch.Tensor] = []

    def network(x, t, **kw):
        seen.append(x.clone())
        return eps[len(seen) - 1]

    sde.sample_sde(oracle, "euler_maruyama", EM_STEPS, seed=SEED, batch=batch, wrap=lambda _net: network)
    g = generator(SEED + 1)
    cases = []
    for k in range(EM_STEPS - 1):  # the last step, to sigma = 0, is the denoised estimate: not this exercise
        z = randn(shape, g)
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        cases.append(Case(f"step {k}: sigma {s:.4g} -> {s_next:.4g}", (seen[k], eps[k].clone(), s, s_next, z), seen[k + 1]))
    return cases


def _abar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def _em(x, e, s, s_next, z, *, score_sign=1.0, score_factor=1.0, noise=True, noise_power=0.5):
    big_b = math.log(_abar(s_next) / _abar(s))
    score = -score_sign * e / math.sqrt(1 - _abar(s))
    out = x + big_b * (0.5 * x + score_factor * score)
    return out + big_b ** noise_power * z if noise else out


EM_MISTAKES = {
    "the score's sign flipped (score = +eps / sqrt(1 - abar))": lambda *a: _em(*a, score_sign=-1.0),
    "no noise term: that is the probability-flow step's drift with the SDE's full score": lambda *a: _em(*a, noise=False),
    "the probability-flow drift (score / 2) with the SDE's noise": lambda *a: _em(*a, score_factor=0.5),
    "the noise scaled by B instead of sqrt(B)": lambda *a: _em(*a, noise_power=1.0),
}


# ----------------------------------------------------------------------------------- DPM-Solver++ 2M (ch 06)
def _dpm_cases(_model) -> list[Case]:
    """Second-order updates of diffusers' DPMSolverMultistepScheduler as the registry builds ``dpmpp_2m``
    (10 steps, steps 1-6: the first step and the last ones are first order), fed seeded random eps."""
    sched = samplers.build_scheduler("dpmpp_2m", TRAIN_SCHEDULE)
    sched.set_timesteps(10)
    sig = sched.sigmas.double()
    abar = [float(_abar(float(s))) if float(s) > 0 else 1.0 for s in sig]
    x = _x((4, 1, 8, 8), SEED + 200)
    states, x0s, cases = [x], [], []
    for k, t in enumerate(sched.timesteps[:7]):
        eps = _x((4, 1, 8, 8), SEED + 201 + k)
        x0s.append((states[k] - math.sqrt(1 - abar[k]) * eps) / math.sqrt(abar[k]))
        states.append(sched.step(eps, t, states[k]).prev_sample)
        if k >= 1:
            cases.append(Case(f"step {k}: abar {abar[k - 1]:.4g}, {abar[k]:.4g} -> {abar[k + 1]:.4g}",
                              (states[k].clone(), x0s[k].clone(), x0s[k - 1].clone(), abar[k - 1], abar[k], abar[k + 1]),
                              states[k + 1]))
    return cases


def _dpm(x, d_now, d_prev, a_prev, a_now, a_next, *, second=True, d1_sign=1.0, r_inverse=False):
    lam = [0.5 * math.log(a / (1 - a)) for a in (a_prev, a_now, a_next)]
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    r = h / h_prev if r_inverse else h_prev / h
    alpha_next, sigma_next, sigma_now = math.sqrt(a_next), math.sqrt(1 - a_next), math.sqrt(1 - a_now)
    d = d_now + (0.5 * d1_sign * (d_now - d_prev) / r if second else 0.0)
    return (sigma_next / sigma_now) * x - alpha_next * math.expm1(-h) * d


DPM_MISTAKES = {
    "the first-order (DDIM) update: D = x0_now without the correction from x0_prev": lambda *a: _dpm(*a, second=False),
    "the correction's sign flipped (D = x0_now - (x0_now - x0_prev) / (2 r))": lambda *a: _dpm(*a, d1_sign=-1.0),
    "r inverted (r = h / h_prev instead of h_prev / h)": lambda *a: _dpm(*a, r_inverse=True),
}


# ------------------------------------------------------------------------- progressive distillation (ch 09)
def _pd_cases(_model) -> list[Case]:
    """:func:`companion.distill.pd_target` on the trailing Euler grid a 4-step student halves (8 teacher steps)."""
    sched = samplers.build_scheduler("euler", TRAIN_SCHEDULE, spacing="trailing")
    sched.set_timesteps(8)
    sig = sched.sigmas.double()
    cases = []
    for i in range(0, 8, 2):
        s0, s2 = float(sig[i]), float(sig[i + 2])
        x0 = torch.rand((4, 1, 8, 8), generator=generator(SEED + 300 + i)) * 2 - 1
        x_ve = x0 + s0 * _x(x0.shape, SEED + 310 + i)
        x_end = x_ve + (s2 - s0) * _x(x0.shape, SEED + 320 + i)  # where two teacher steps might land
        cases.append(Case(f"sigma {s0:.4g} -> {s2:.4g}", (x_ve, x_end, s0, s2), pd_target(x_ve, x_end, s0, s2)))
    return cases


PD_MISTAKES = {
    "the sign of the correction flipped (x_ve + s0 (x_end - x_ve) / (s_end - s0))":
        lambda x, e, s0, s2: x + s0 * (e - x) / (s2 - s0),
    "the step's landing point x_end itself, not the x0 that makes one step land there": lambda x, e, s0, s2: e,
    "s_end where s0 belongs (x_ve - s_end (x_end - x_ve) / (s_end - s0))":
        lambda x, e, s0, s2: x - s2 * (e - x) / (s2 - s0),
}


# ---------------------------------------------------------------------------------- Frechet distance (ch 02)
def _fd_cases(_model) -> list[Case]:
    """:func:`companion.metrics.plug_in_fd` (the uncorrected FD, torchmetrics' number) of two random feature sets."""
    cases = []
    for i, (shift, scale) in enumerate(((0.0, 1.0), (0.5, 1.0), (1.0, 2.0))):
        d = 6
        mix = torch.randn((d, d), generator=generator(SEED + 400 + i), dtype=torch.float64) * 0.4 + torch.eye(d, dtype=torch.float64)
        b = torch.randn((300, d), generator=generator(SEED + 410 + i), dtype=torch.float64)
        a = scale * torch.randn((200, d), generator=generator(SEED + 420 + i), dtype=torch.float64) @ mix + shift
        ref = torch.tensor(plug_in_fd(a, Reference("implement-it", "random", b, None)), dtype=torch.float64)
        cases.append(Case(f"features {i}: mean shift {shift:g}, scale {scale:g}, d={d}, n=200 vs 300", (a.clone(), b.clone()), ref))
    return cases


def _fd(a, b, *, mean=True, factor=2.0, ddof=1):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T, correction=ddof), torch.cov(b.T, correction=ddof)
    eig = torch.linalg.eigvals(ca @ cb).real.clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).square().sum() * float(mean) + ca.trace() + cb.trace() - factor * eig


FD_MISTAKES = {
    "the mean term |mu_a - mu_b|^2 left out": lambda a, b: _fd(a, b, mean=False),
    "the factor 2 of the cross term left out (tr(C_a) + tr(C_b) - tr((C_a C_b)^1/2))": lambda a, b: _fd(a, b, factor=1.0),
    "covariances divided by n instead of n - 1": lambda a, b: _fd(a, b, ddof=0),
}


# --------------------------------------------------------------------------------- DeepCache reuse (ch 11)
CACHE_BATCHES = (2, 2, 2, 2, 3, 3, 3, 2)  # batch size of each call of one run: a change makes the kept features stale


def _cache_cases(model) -> list[Case]:
    """Which calls of :class:`companion.caching.DeepCache` run the full UNet (seen by a hook on its deepest down
    block, which only a full call runs), for intervals 1-4 over a run of calls whose batch size changes twice."""
    cases = []
    deepest = DeepCache(model, 1).unet.down_blocks[-1]
    for interval in (1, 2, 3, 4):
        cache = DeepCache(model, interval)
        net = cache(model.predict_noise)
        ran: list[bool] = []
        hook = deepest.register_forward_hook(lambda *_: ran.__setitem__(-1, True))
        try:
            with torch.no_grad():
                for k, b in enumerate(CACHE_BATCHES):
                    ran.append(False)
                    net(_x((b, *model.sample_shape), SEED + 500 + k), 500 - 50 * k, class_labels=torch.arange(b) % 10)
        finally:
            hook.remove()
        for k, b in enumerate(CACHE_BATCHES):
            changed = k > 0 and b != CACHE_BATCHES[k - 1]
            cases.append(Case(f"call {k} with interval {interval} (batch size changed: {'yes' if changed else 'no'})",
                              (k, interval, changed), torch.tensor(float(ran[k]))))
    return cases


CACHE_MISTAKES = {
    "a full call when call % interval == interval - 1 (the last call of each block, not the first)":
        lambda k, n, c: c or k % n == n - 1,
    "a batch-size change ignored (the kept features no longer fit the batch)": lambda k, n, c: k % n == 0,
    "a full call on every call": lambda k, n, c: True,
}


def _full_or_reuse(v: float) -> str:
    return "full UNet" if v >= 0.5 else "reuse the kept deep features"


EXERCISES: dict[str, Exercise] = {e.key: e for e in (
    Exercise("ddim_step", "01_foundations", "(x_t, eps, abar_t, abar_prev) -> x_prev",
             "one deterministic DDIM step (eta = 0): x0 from eps, then x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps",
             "DDIM step (diffusers' DDIMScheduler.step, eta=0)", _ddim_cases, DDIM_MISTAKES, atol=1e-4, rtol=1e-4),
    Exercise("cfg", "04_guidance", "(eps_c, eps_u, w) -> eps",
             "the classifier-free guidance combination of the conditional and unconditional predictions at scale w",
             "guided eps (companion.denoiser.Denoiser)", _cfg_cases, CFG_MISTAKES, atol=1e-5, rtol=1e-5),
    Exercise("em_step", "05_sde_vs_ode", "(x, eps, sigma, sigma_next, z) -> x_next",
             "one Euler-Maruyama step of the reverse VP-SDE from noise level sigma to sigma_next > 0 with noise z",
             "Euler-Maruyama step (companion.sde.sample_sde)", _em_cases, EM_MISTAKES, atol=1e-4, rtol=1e-4),
    Exercise("dpmpp_2m_update", "06_fast_solvers", "(x, x0_now, x0_prev, abar_prev, abar_now, abar_next) -> x_next",
             "one second-order DPM-Solver++ 2M update from the current level to the next, using the previous level's x0",
             "DPM-Solver++ 2M update (diffusers' DPMSolverMultistepScheduler.step)", _dpm_cases, DPM_MISTAKES,
             atol=1e-4, rtol=1e-4),
    Exercise("pd_target", "09_distillation", "(x_ve, x_end, s0, s_end) -> x0_target",
             "the progressive-distillation target: the x0 whose one Euler step from (x_ve, s0) lands on x_end at s_end",
             "target (companion.distill.pd_target)", _pd_cases, PD_MISTAKES, atol=1e-5, rtol=1e-5),
    Exercise("frechet_distance", "02_latent_diffusion", "(feats_a, feats_b) -> float",
             "the (plug-in) Frechet distance between two feature sets (N, d): means, covariances, matrix square root",
             "FD (companion.metrics.plug_in_fd)", _fd_cases, FD_MISTAKES, atol=1e-6, rtol=1e-4),
    Exercise("deepcache_full_call", "11_feature_caching", "(call, interval, batch_changed) -> bool",
             "DeepCache's reuse rule: does call number `call` (from 0) of a run run the full UNet (True) or reuse the "
             "kept deep features (False)?", "rule (companion.caching.DeepCache on a bundled UNet)", _cache_cases,
             CACHE_MISTAKES, atol=0.0, rtol=0.0, needs_model=True, describe=_full_or_reuse),
)}


def cases(key: str, model=None) -> list[Case]:
    """The random cases (inputs and reference outputs) of exercise ``key``; ``model``: a bundled UNet model, for the
    exercises that need one (loaded as ``digits-cond`` when not given)."""
    ex = exercise(key)
    if ex.needs_model and model is None:
        model = load("digits-cond")
    return ex.cases(model)


def exercise(key: str) -> Exercise:
    if key not in EXERCISES:
        raise ValueError(f"unknown implement-it exercise {key!r}; valid: {', '.join(EXERCISES)}")
    return EXERCISES[key]


def _as_tensor(out, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(out, bool):
        out = float(out)
    t = torch.as_tensor(out).detach().to("cpu", torch.float64)
    return t.reshape(()) if t.numel() == 1 and ref.numel() == 1 else t


def _call(fn, args):
    # the reader's function gets copies: one that changes its inputs in place must not change the next check
    return fn(*copy.deepcopy(args))


def grade(key: str, fn, *, model=None) -> bool:
    """Run the reader's ``fn`` on exercise ``key``'s cases and print PASS or NOT YET with what differs.

    NOT YET when ``fn`` raises (``NotImplementedError``: not written yet), returns None or a wrong shape, or differs
    from the reference beyond the tolerance in any case. Returns whether it passed.
    """
    ex = exercise(key)
    name = f"implement {ex.key}"
    want = f"`{ex.key}{ex.signature}`: {ex.task}"
    if not callable(fn):
        raise TypeError(f"grade needs the function you wrote, got {type(fn).__name__} {fn!r}")
    all_cases = cases(key, model)
    outs, worst = [], None
    for case in all_cases:
        try:
            out = _call(fn, case.args)
        except NotImplementedError:
            return check(name, False, f"`{ex.key}` is not written yet (it raised NotImplementedError)",
                         f"{want}; replace the `raise` line with your code")
        except Exception as e:  # the reader's bug: say what and where, and let them fix it
            return check(name, False, f"`{ex.key}` raised {type(e).__name__}: {e} (case {case.label})", want)
        if out is None:
            return check(name, False, f"`{ex.key}` returned None (case {case.label})", f"{want}; did you forget `return`?")
        try:
            got = _as_tensor(out, case.reference)
        except (TypeError, ValueError, RuntimeError) as e:
            return check(name, False, f"an output that is not a number or tensor ({type(out).__name__}: {e})", want)
        ref = case.reference.detach().to(torch.float64)
        if got.shape != ref.shape:
            return check(name, False, f"output of shape {tuple(got.shape)} (case {case.label})",
                         f"shape {tuple(ref.shape)}, like the reference's")
        outs.append(got)
        excess = ((got - ref).abs() - (ex.atol + ex.rtol * ref.abs()))
        if not torch.isfinite(got).all():
            excess = torch.where(torch.isfinite(got), excess, torch.full_like(excess, math.inf))
        if worst is None or float(excess.max()) > worst[0]:
            idx = int(excess.flatten().argmax())
            worst = (float(excess.max()), case, idx, float(got.flatten()[idx]), float(ref.flatten()[idx]),
                     float((got - ref).abs().max()))
    failed = [c for c, o in zip(all_cases, outs) if not _close(o, c.reference, ex)]
    tol = "exactly" if ex.atol == 0 and ex.rtol == 0 else f"within {ex.atol:g} + {ex.rtol:g} |reference| per element"
    if not failed:
        biggest = max(float((o - c.reference.double()).abs().max()) for c, o in zip(all_cases, outs))
        return check(name, True, f"max |yours - reference| = {biggest:.2g} over {len(all_cases)} random cases",
                     f"the companion's {ex.reference_name}, {tol}")
    _, case, idx, yours, theirs, diff = worst
    where = f" (element {idx})" if case.reference.numel() > 1 else ""
    text = (f"differs in {len(failed)} of {len(all_cases)} cases; worst at {case.label}{where}: yours "
            f"{ex.describe(yours)}, the reference {ex.describe(theirs)}")
    if case.reference.numel() > 1 or ex.atol or ex.rtol:
        text += f" (max |yours - reference| {diff:.3g} in that case)"
    hint = _diagnose(ex, all_cases, outs)
    if hint:
        text += f"; your output matches {hint}"
    return check(name, False, text, f"the companion's {ex.reference_name}, {tol}")


def _close(out: torch.Tensor, ref: torch.Tensor, ex: Exercise) -> bool:
    ref = ref.double()
    return bool(torch.isfinite(out).all() and ((out - ref).abs() <= ex.atol + ex.rtol * ref.abs()).all())


def _diagnose(ex: Exercise, all_cases: list[Case], outs: list[torch.Tensor]) -> str | None:
    """The known mistake the reader's outputs agree with in every case, if any."""
    for text, wrong in ex.mistakes.items():
        try:
            if all(_close(o, _as_tensor(_call(wrong, c.args), c.reference), ex) for c, o in zip(all_cases, outs)):
                return text
        except Exception:  # a mistake that cannot run on these inputs is simply not this one
            continue
    return None


# --------------------------------------------------------------------------------------- student notebooks
def _strip_source(source: str, key: str) -> str:
    """A cell's source with each BEGIN/END SOLUTION block replaced by a ``raise NotImplementedError``."""
    out, inside, indent = [], False, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"cell of exercise {key!r}: {BEGIN} inside another solution block")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("exercise: write this part, then run the cell")  # your code here')
        elif stripped == END:
            if not inside:
                raise ValueError(f"cell of exercise {key!r}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"cell of exercise {key!r}: {BEGIN} without {END}")
    return "\n".join(out)


def solution_lines(nb) -> list[str]:
    """The non-blank lines between the solution markers of every ``implement-it`` cell of notebook ``nb``."""
    lines = []
    for cell in nb.cells:
        if TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        inside = False
        for line in cell.source.splitlines():
            s = line.strip()
            if s in (BEGIN, END):
                inside = s == BEGIN
            elif inside and s:
                lines.append(s)
    return lines


def student_notebook(nb):
    """A copy of notebook ``nb`` (nbformat) with every solution block replaced by a stub and all outputs cleared.
    Refuses an ``implement-it`` cell without a solution block (it would hand out nothing to write)."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if TAG in cell.get("metadata", {}).get("tags", []):
            if BEGIN not in cell.source:
                raise ValueError(f"cell {i} is tagged {TAG!r} but has no {BEGIN} ... {END} block")
            cell.source = _strip_source(cell.source, f"cell {i}")
        elif BEGIN in cell.source:
            raise ValueError(f"cell {i} holds a {BEGIN} block but is not tagged {TAG!r}: tag it so its solution is stripped")
    return nb
