"""Self-checks for the chapters' exercises: each prints one line, ``PASS`` or ``NOT YET``, with what was expected
and what was measured, and returns whether it passed.

A self-check judges either the reader's own answer (a value the exercise asks them to choose or predict, stored in
a variable the check reads) or an effect measured in the run, with a stated margin.

* Verdicts: :func:`check` (any comparison), :func:`unanswered` (the reader's variable is still ``None``),
  :func:`check_answer` (a number against the measured one), :func:`check_smallest` ("the fewest steps such that").
* Measurements several chapters share: :func:`median_seconds` and :func:`wait_for_panel` (timing that does not
  compete with a panel's background thread), :func:`distance_to_reference` (a sampler panel's quality for one
  configuration), :func:`reference_gap` (the panels' 200-step UniPC reference against the tables' DOP853 one),
  :func:`readable_fraction` (how readable noised digits are), :func:`conv_flops` (FLOPs of named convolutions),
  :func:`ratio_bounds` and :func:`difference_interval` (comparing two measurements with intervals).
"""
from __future__ import annotations

import math
import numbers
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from . import metrics as M
from . import schedules, verdicts
from .bench import class_labels_for, example_inputs, initial_noise
from .errors import SamplingError
from .orders import network_reference
from .reference import ReferenceDistance, reference
from .sampling import sample

PASS, NOT_YET = "PASS", "NOT YET"


def check(name: str, passed, measured: str, expected: str) -> bool:
    """Print ``"<name>: PASS — measured ...; expected ..."`` (or ``NOT YET``) and return ``passed`` as a bool.

    ``passed``: a Python, numpy or 0-d torch boolean (anything else is refused: a number or ``None`` would hide a
    check that compares nothing). ``measured`` and ``expected``: what was seen and what the check asked for, in
    words a reader can act on.
    """
    if torch.is_tensor(passed):
        if passed.numel() != 1 or passed.dtype != torch.bool:
            raise TypeError(f"passed must be one boolean, got a tensor of dtype {passed.dtype} and shape {tuple(passed.shape)}")
        passed = bool(passed.item())
    elif isinstance(passed, np.ndarray) and passed.shape == () and passed.dtype == bool:
        passed = bool(passed)
    elif not isinstance(passed, (bool, np.bool_)):
        raise TypeError(f"passed must be a boolean (the outcome of a comparison), got {type(passed).__name__} {passed!r}")
    for label, text in (("name", name), ("measured", measured), ("expected", expected)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{label} must be a non-empty string saying what the check is about, got {text!r}")
    verdict = PASS if passed else NOT_YET
    print(f"{name}: {verdict} — measured {measured}; expected {expected}")
    return bool(passed)


def unanswered(name: str, variable: str, expected: str) -> bool:
    """Print ``"<name>: NOT YET — `variable` is still None: ..."`` for an answer the reader has not written yet, and
    return False."""
    for label, text in (("name", name), ("variable", variable), ("expected", expected)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{label} must be a non-empty string, got {text!r}")
    print(f"{name}: {NOT_YET} — `{variable}` is still None: write your answer there and run the cell again "
          f"(expected: {expected})")
    return False


def check_answer(name: str, answer, correct, *, variable: str, tolerance: float = 0.0, unit: str = "") -> bool:
    """Judge a reader's numeric answer (stored in ``variable``) against the value measured in the run.

    ``answer`` ``None`` means "not answered yet": NOT YET, naming the variable to set. Otherwise PASS when
    ``|answer - correct| <= tolerance`` (``tolerance`` 0: exactly). The correct value is shown only when the answer
    passes, so a wrong guess is told its direction instead.
    """
    if not isinstance(variable, str) or not variable.strip():
        raise ValueError(f"variable must name the variable the reader sets, got {variable!r}")
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not isinstance(correct, numbers.Real) or isinstance(correct, bool):
        raise TypeError(f"correct must be a number (the measured value), got {type(correct).__name__} {correct!r}")
    suffix = f" {unit}" if unit else ""
    within = f" within {tolerance:g}{suffix}" if tolerance else ""
    if answer is None:
        return unanswered(name, variable, f"a number, compared with this run's measurement{within}")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real) or not math.isfinite(float(answer)):
        raise TypeError(f"{variable} must be a finite number, got {type(answer).__name__} {answer!r}")
    ok = abs(float(answer) - float(correct)) <= tolerance
    if ok:
        return check(name, True, f"{correct:g}{suffix} in this run", f"your answer {answer:g}{suffix}{within}")
    direction = "too high" if answer > correct else "too low"
    return check(name, False, f"a different value in this run: your answer {answer:g}{suffix} is {direction}",
                 f"your answer in `{variable}` to match the measurement{within}")


def within_factor(measured: float, expected: float, factor: float) -> bool:
    """Whether ``measured`` lies within a factor ``factor`` (> 1) of ``expected``: expected / factor <= measured <=
    expected * factor. Both must be positive."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    if not (measured > 0 and expected > 0):
        raise ValueError(f"measured and expected must be positive to compare as a ratio, got {measured!r} and {expected!r}")
    return expected / factor <= measured <= expected * factor


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (the first call of a sampler
    pays for building its scheduler and warming caches; the median ignores one disturbed repeat)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wait_for_panel(panel, timeout: float = 120.0) -> None:
    """Block until ``panel`` (a sampling panel of :mod:`companion.widgets`) has no run in progress or queued, so a
    self-check that times its own runs does not share the CPU with the panel's background thread. Raises
    ``TimeoutError`` after ``timeout`` seconds."""
    if not panel.wait(timeout):
        raise TimeoutError(f"the panel was still running after {timeout:g} s; let it finish (or stop moving its controls) "
                           "and run this cell again")


def reference_gap(model, n: int = 8, seed: int = 0, *, rtol: float = 1e-4, steps: int = 200):
    """How far the panels' quick reference (``steps`` steps of UniPC) lies from the tables' DOP853 reference
    (rtol ``rtol``) from the same ``n`` initial noises and balanced class labels: a
    :class:`companion.metrics.Measurement` of the mean per-sample RMS distance, with its bootstrap interval.

    Both solutions come from the shared reference cache, so a chapter that already computed them pays nothing.
    """
    x_T = initial_noise(model, n, seed)
    quick = reference(model, x_T, method="sampler", sampler="unipc", steps=steps,
                      class_labels=class_labels_for(model, n))
    exact = network_reference(model, n, seed, rtol=rtol)
    return M.ode_distance(quick.float(), exact.float(), sampler=f"unipc-{steps}", seed=seed)


def check_smallest(name: str, answer, measure: Callable[[int], float], target: float, *, variable: str,
                   what: str = "distance", target_text: str = "the target") -> bool:
    """Judge a reader's "smallest number of steps whose ``what`` lies below ``target``" (stored in ``variable``).

    ``measure(steps)`` returns the measured value for a step count (lower is better). PASS when ``answer`` steps lie
    below the target and ``answer - 1`` steps do not (or are not a valid step count for the sampler). NOT YET says
    which way to move: more steps when the answer is not below the target, fewer when one step less is also below.
    """
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or answer < 1:
        raise ValueError(f"{variable} must be a positive int (a number of steps), got {answer!r}")
    answer = int(answer)
    at = float(measure(answer))
    if not at < target:
        return check(name, False, f"{what} {at:.4g} at {answer} steps, not below {target_text} ({target:.4g})",
                     f"the smallest step count below {target_text}: raise `{variable}`")
    try:
        below = float(measure(answer - 1)) if answer > 1 else None
    except SamplingError:  # one step less is not a valid step count for this sampler
        below = None
    if below is not None and below < target:
        return check(name, False, f"{what} {at:.4g} at {answer} steps and {below:.4g} at {answer - 1}, both below "
                     f"{target_text} ({target:.4g})", f"the smallest such step count: lower `{variable}`")
    before = f", {below:.4g} at {answer - 1}" if below is not None else ""
    return check(name, True, f"{what} {at:.4g} at {answer} steps{before}; {target_text}: {target:.4g}",
                 f"the smallest step count below {target_text}")


def distance_to_reference(model, sampler: str, steps: int, *, batch: int = 8, seed: int = 0, guidance=None,
                          spacing: str | None = None, teacher=None) -> float | None:
    """The quality a sampler panel plots for one configuration: RMS distance of a run's samples to the converged
    reference (200 UniPC steps, of ``teacher`` when given) from the same noise, with balanced class labels (a panel
    showing all classes). References come from the shared cache, so a configuration the panel already drew costs
    only the run itself. None for a stochastic sampler without a teacher (it does not follow the ODE)."""
    res = sample(model, sampler=sampler, steps=int(steps), seed=seed, batch=batch,
                 class_labels=class_labels_for(model, batch), guidance=guidance, spacing=spacing)
    return ReferenceDistance(teacher)(model, res)


def spacing_gap(model, sampler: str, spacing: str, baseline: str, **kwargs) -> Callable[[int], float]:
    """``steps -> distance_to_reference(spacing) - distance_to_reference(baseline)`` for one sampler: below 0 where
    ``spacing`` lands closer to the converged reference than ``baseline`` at that step count (the measure
    :func:`check_smallest` judges). ``kwargs`` go to :func:`distance_to_reference` (batch, seed, guidance)."""
    def gap(steps: int) -> float:
        return (distance_to_reference(model, sampler, steps, spacing=spacing, **kwargs)
                - distance_to_reference(model, sampler, steps, spacing=baseline, **kwargs))
    return gap


def readable_fraction(images: torch.Tensor, labels: torch.Tensor, t: int, *, schedule: str = "linear", seed: int = 0,
                      classifier=None) -> float:
    """Fraction of ``images`` that a classifier still assigns to their ``labels`` after the forward process has
    noised them to timestep ``t`` (seeded noise): how readable the digits are at ``t``.

    ``classifier``: a noise-aware classifier ``clf(x_t, t) -> logits`` (e.g. ``digits-noisy-clf``); by default the
    bundled feature network's classifier head, trained on clean digits, reads ``x_t / sqrt(abar_t)`` (the image
    at its original contrast, with noise of standard deviation ``sigma_t``).
    """
    x_t = schedules.noise(images, int(t), seed=seed, schedule=schedule)
    with torch.no_grad():
        if classifier is None:
            abar = float(schedules.alphas_cumprod(schedule)[int(t)])
            return float(M.class_accuracy(x_t / math.sqrt(abar), labels).value)
        logits = classifier(x_t, torch.full((len(x_t),), int(t)))
    return float((logits.argmax(-1) == torch.as_tensor(labels)).double().mean())


@torch.no_grad()
def conv_flops(model, names) -> dict[str, int]:
    """FLOPs of the named convolutions of ``model``'s UNet in one evaluation for one sample, counted the way torch's
    ``FlopCounterMode`` counts a convolution: 2 k_h k_w (C_in / groups) C_out H_out W_out (output size from a
    forward pass). ``names``: module paths as in ``model.unet.named_modules()``, e.g. ``"conv_in"``; a name that is
    not a convolution is refused with the list of those that are."""
    net = getattr(model, "unet", None)
    if net is None:
        raise TypeError(f"{getattr(model, 'name', model)!r} has no UNet whose convolutions could be counted")
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(net.named_modules())
    convs = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d))
    bad = [n for n in names if n not in convs]
    if bad:
        raise ValueError(f"{bad} are not convolutions of {getattr(model, 'name', 'this model')}; its convolutions: {', '.join(convs)}")
    shapes: dict[str, tuple] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n in names]
    try:
        x, t, kw = example_inputs(model, 1)
        model.predict_noise(x, t, **kw)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        m = modules[n]
        _, c_out, h, w = shapes[n]
        out[n] = 2 * m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups) * c_out * h * w
    return out


def ratio_bounds(a, b) -> tuple[float, float, float]:
    """``(a / b, low, high)`` for two measurements given as :class:`companion.metrics.Measurement` or
    ``(value, low, high)``: the ratio of the values, and the range of ratios their intervals allow together (every
    a' / b' with a' and b' in their intervals; ``-inf``/``inf`` where ``b``'s interval reaches 0). A conservative
    range: it takes both intervals at their extremes at once. ``b``'s value must be positive (a ratio to a
    quantity at or below 0, e.g. a bias-corrected FD of a near-perfect model, means nothing)."""
    av, al, ah = M.interval(a)
    bv, bl, bh = M.interval(b)
    if not (al <= av <= ah and bl <= bv <= bh):
        raise ValueError(f"each value must lie inside its interval, got a={a!r}, b={b!r}")
    if not bv > 0:
        raise ValueError(f"the ratio to b={bv:.4g} is not defined: b's value must be positive")
    if bl > 0:
        ends = [al / bl, al / bh, ah / bl, ah / bh]
        return av / bv, min(ends), max(ends)
    # b' can reach 0 (and below, where bl < 0): the ratio is unbounded on the side a' can take that sign
    low = -math.inf if (al < 0 or bl < 0) else al / bh
    high = math.inf if (ah > 0 or bl < 0) else ah / bh
    return av / bv, low, high


def difference_interval(a, b) -> tuple[float, float, float]:
    """``(a - b, low, high)`` for two independent measurements (:class:`companion.metrics.Measurement` or
    ``(value, low, high)``): :func:`companion.verdicts.difference`'s MOVER interval (Zou & Donner 2008), so
    asymmetric intervals stay asymmetric. Two Measurements must be comparable (metric, feature space, n)."""
    if not (isinstance(a, M.Measurement) and isinstance(b, M.Measurement)):
        a, b = (M.Measurement("value", *M.interval(x), n=0) for x in (a, b))
    for x in (a, b):
        if not x.low <= x.value <= x.high:
            raise ValueError(f"each value must lie inside its interval, got {x!r}")
    d = verdicts.difference(a, b)
    return d.value, d.low, d.high


def versus(a, b) -> str:
    """One line comparing measurement ``a`` with ``b`` (each a Measurement or ``(value, low, high)``, lower is
    better, e.g. FD): the difference with its interval, and the ratio with the range the two intervals allow where
    b's interval lies above 0 (a ratio to a value that may be 0 means nothing, and the line says so)."""
    d, dl, dh = difference_interval(a, b)
    text = f"difference {d:+.2f} [{dl:+.2f}, {dh:+.2f}]"
    _, bl, bh = M.interval(b)
    if bl <= 0:
        return text + f"; no ratio: the reference's interval [{bl:.2f}, {bh:.2f}] reaches 0"
    r, lo, hi = ratio_bounds(a, b)
    return text + f"; ratio {r:.2f}x (ratios the two 95 % intervals allow: {lo:.2f} to {hi:.2f})"
