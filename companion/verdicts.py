"""Verdicts as tests stated before the run.

A chapter's claim ("the latent model keeps the pixel model's quality", "guidance raises fidelity") is decided by a
:class:`Rule` written down before anything is sampled: the quantity, the direction that is better, the kind of
test and its margin, and the sample size it is judged at. :func:`judge` then reads the measurements and returns a
:class:`Verdict` with one of three outcomes:

``"passes"``        the interval of the quantity lies wholly on the claim's side of the margin;
``"fails"``         it lies wholly on the other side (the data contradict the claim at this margin);
``"inconclusive"``  it straddles the margin: at this sample size the data cannot decide.

Two kinds of comparison between a measurement ``a`` (the lever) and ``b`` (its baseline):

- **superiority** ("improves"): the difference ``a - b`` must exclude no change, in the better direction;
- **non-inferiority** ("keeps quality"): ``a`` may be worse than ``b`` by at most a stated margin; the margin is
  relative to ``b`` (``a <= (1 + margin) * b`` for lower-is-better quantities), because a feature-space distance
  has no absolute unit a reader could judge.

and one for a single measurement, **threshold** (``a.low > threshold`` for "at least").

The interval of a difference of two independently measured quantities is the MOVER interval (Zou & Donner 2008,
"Construction of confidence limits about effect measures"): it recovers the variance of each side from its own
95 % interval, so asymmetric bootstrap intervals stay asymmetric. Each verdict also states its power: the
smallest true difference the rule would detect with about 80 % probability at this sample size (1.43 times the
half-width of the difference's interval: (z_0.975 + z_0.8) / z_0.975). A rule whose detectable difference is
larger than its margin could not have passed; the verdict says so instead of reporting "fails".

Measurements from different feature spaces or sample sizes are refused: such a comparison has no meaning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .metrics import CONFIDENCE, Measurement

TESTS = ("superiority", "non-inferiority", "threshold")
OUTCOMES = ("passes", "fails", "inconclusive")
# (z_0.975 + z_0.80) / z_0.975: a true effect this many half-widths away from the margin is detected ~80 % of the time
POWER_FACTOR = (1.959964 + 0.841621) / 1.959964


@dataclass(frozen=True)
class Rule:
    """A verdict's rule, stated before the run.

    ``quantity`` names what is measured (and in which space); ``higher_is_better`` its direction; ``test`` one of
    :data:`TESTS`; ``margin`` is the relative non-inferiority margin (0.25: at most 25 % worse), the threshold of
    a threshold test, or the least improvement that counts for superiority (usually 0); ``n`` the sample size per
    arm the rule is judged at.
    """

    claim: str
    quantity: str
    test: str
    higher_is_better: bool
    n: int
    margin: float = 0.0

    def __post_init__(self):
        if self.test not in TESTS:
            raise ValueError(f"unknown test {self.test!r}; choose one of {', '.join(TESTS)}")
        if self.n < 1:
            raise ValueError(f"a rule needs a sample size n >= 1, got {self.n}")
        if self.test == "non-inferiority" and not 0 <= self.margin < 1:
            raise ValueError(f"a relative non-inferiority margin must lie in [0, 1), got {self.margin}")
        if self.test == "superiority" and self.margin < 0:
            raise ValueError(f"a superiority margin is the least improvement that counts, >= 0; got {self.margin}")

    def describe(self) -> str:
        """The rule in one sentence, as the chapter states it before the run."""
        better = "higher" if self.higher_is_better else "lower"
        if self.test == "threshold":
            side = "above" if self.higher_is_better else "below"
            return (f"{self.claim}: passes if the whole {round(100 * CONFIDENCE)} % interval of {self.quantity} lies {side} "
                    f"{self.margin:g} (n = {self.n})")
        if self.test == "superiority":
            least = f" by more than {self.margin:g}" if self.margin else ""
            return (f"{self.claim}: passes if the {round(100 * CONFIDENCE)} % interval of the difference in {self.quantity} "
                    f"({better} is better) excludes no change{least}, in the better direction (n = {self.n} per arm)")
        worse = "above" if not self.higher_is_better else "below"
        return (f"{self.claim}: passes if {self.quantity} of the lever is at most {100 * self.margin:.0f} % {'worse'} than the "
                f"baseline's ({better} is better): the {round(100 * CONFIDENCE)} % interval of the margin-adjusted difference "
                f"lies wholly on the good side; fails if it lies wholly {worse} it (n = {self.n} per arm)")


@dataclass(frozen=True)
class Verdict:
    """The outcome of a :class:`Rule` on measured data, with the interval it was judged on and its power."""

    rule: Rule
    outcome: str
    statistic: Measurement  # the judged quantity: a difference (oriented so > 0 is good) or the single measurement
    detectable: float       # smallest true effect detected with ~80 % probability at this n (in the statistic's units)
    reason: str
    margin_value: float = 0.0  # non-inferiority: the margin in the statistic's units (the judged quantity at equality)

    @property
    def passed(self) -> bool:
        return self.outcome == "passes"

    def power(self) -> str:
        """What this sample size can show, in words: the smallest effect the rule detects (~80 % of the time)."""
        unit = self.statistic.name
        if self.rule.test == "non-inferiority":
            return (f"at n = {self.statistic.n} a lever equal to its baseline passes ~80 % of the time only if the margin is worth "
                    f"more than {self.detectable:.2g} ({unit}); here the margin is worth {self.margin_value:.2g}"
                    + ("" if self.margin_value > self.detectable else ": this n is too small for the rule to pass reliably"))
        return f"at n = {self.statistic.n} a true effect beyond about {self.detectable:.2g} ({unit}) is detected ~80 % of the time"

    def summary(self) -> str:
        s = self.statistic
        return f"{self.outcome}: {self.reason} [{s.low:.3g}, {s.high:.3g}] at n = {s.n}"

    def __str__(self) -> str:
        return self.summary()


def check_comparable(a: Measurement, b: Measurement) -> None:
    """Refuse measurements that cannot be compared: different metric, feature space or sample size."""
    for x in (a, b):
        if not isinstance(x, Measurement):
            raise TypeError(f"expected a Measurement (value, interval, n, feature space), got {type(x).__name__}: {x!r}")
    if a.name != b.name:
        raise ValueError(f"cannot compare {a.name!r} with {b.name!r}: different metrics")
    if a.feature != b.feature:
        raise ValueError(f"cannot compare {a.name} measured in {a.feature!r} with one measured in {b.feature!r}: "
                         "distances in different feature spaces have different units")
    if a.n != b.n:
        raise ValueError(f"cannot compare {a.name} from n = {a.n} samples with one from n = {b.n}: finite-sample bias and "
                         "interval width depend on n; measure both arms at the same sample size")


def difference(a: Measurement, b: Measurement, *, scale_b: float = 1.0) -> Measurement:
    """``a - scale_b * b`` with its MOVER interval (Zou & Donner 2008), from two independent measurements."""
    check_comparable(a, b)
    d = a.value - scale_b * b.value
    bl, bh = sorted((scale_b * b.low, scale_b * b.high))
    bv = scale_b * b.value
    low = d - math.sqrt((a.value - a.low) ** 2 + (bh - bv) ** 2)
    high = d + math.sqrt((a.high - a.value) ** 2 + (bv - bl) ** 2)
    name = f"{a.name} difference" if scale_b == 1 else f"{a.name} - {scale_b:g} x baseline"
    return Measurement(name, d, low, high, a.n, a.feature, "MOVER interval of a difference of independent measurements")


def _orient(m: Measurement, higher_is_better: bool) -> Measurement:
    """The same measurement with its sign chosen so that positive is good."""
    if higher_is_better:
        return m
    return Measurement(m.name, -m.value, -m.high, -m.low, m.n, m.feature, m.note)


def judge(rule: Rule, a: Measurement, b: Measurement | None = None) -> Verdict:
    """Decide ``rule`` on measurement ``a`` (the lever) against ``b`` (the baseline; none for a threshold test)."""
    if rule.test == "threshold":
        if b is not None:
            raise ValueError("a threshold rule judges one measurement; got a baseline too")
        if not isinstance(a, Measurement):
            raise TypeError(f"expected a Measurement, got {type(a).__name__}")
        _check_n(rule, a)
        good = _orient(Measurement(a.name, a.value - rule.margin, a.low - rule.margin, a.high - rule.margin, a.n, a.feature, a.note),
                       rule.higher_is_better)
        half = (good.high - good.low) / 2
        return _decide(rule, good, POWER_FACTOR * half, f"{a.name} {a.value:.3g} against the threshold {rule.margin:g}")
    if b is None:
        raise ValueError(f"a {rule.test} rule compares a lever with a baseline: pass both measurements")
    check_comparable(a, b)
    _check_n(rule, a)
    if rule.test == "superiority":
        d = difference(a, b)
        good = _orient(d, rule.higher_is_better)
        good = Measurement(good.name, good.value - rule.margin, good.low - rule.margin, good.high - rule.margin, good.n, good.feature, good.note)
        half = (good.high - good.low) / 2
        return _decide(rule, good, POWER_FACTOR * half, f"{a.name} {b.value:.3g} -> {a.value:.3g}, change {a.value - b.value:+.3g}")
    # non-inferiority on the ratio scale, made linear: lower is better -> (1 + m) b - a >= 0; higher -> a - (1 - m) b >= 0
    if rule.higher_is_better:
        good = difference(a, b, scale_b=1 - rule.margin)
    else:
        d = difference(a, b, scale_b=1 + rule.margin)
        good = _orient(d, False)
    half = (good.high - good.low) / 2
    v = _decide(rule, good, POWER_FACTOR * half,
                f"{a.name} {a.value:.3g} vs baseline {b.value:.3g} (allowed: {100 * rule.margin:.0f} % worse)")
    return Verdict(v.rule, v.outcome, v.statistic, v.detectable, v.reason, margin_value=abs(rule.margin * b.value))


def _check_n(rule: Rule, a: Measurement) -> None:
    if a.n != rule.n:
        raise ValueError(f"the rule {rule.claim!r} was stated for n = {rule.n} samples, the measurement has n = {a.n}")


def _decide(rule: Rule, good: Measurement, detectable: float, evidence: str) -> Verdict:
    """``good`` is the judged quantity oriented so that > 0 favours the claim."""
    if good.low > 0:
        outcome = "passes"
    elif good.high < 0:
        outcome = "fails"
    else:
        outcome = "inconclusive"
    reason = f"{evidence}; judged quantity {good.value:+.3g} (> 0 favours the claim)"
    if outcome == "inconclusive":
        reason += f"; its interval straddles 0: at n = {good.n} only effects beyond about {detectable:.2g} are detectable"
    return Verdict(rule, outcome, good, detectable, reason)


def finding(verdicts: dict[str, Verdict], required: tuple[str, ...], supporting: tuple[str, ...] = ()) -> str:
    """A finding's overall verdict from its rules: ``"supported"`` when every required rule passes (and every
    supporting one too), ``"partly supported"`` when every required one passes but a supporting one does not,
    ``"not supported"`` when a required rule fails (the data contradict it at its margin), ``"not shown at this
    sample size"`` otherwise (a required rule is inconclusive)."""
    missing = [k for k in (*required, *supporting) if k not in verdicts]
    if missing:
        raise KeyError(f"no verdict for {missing}; have {sorted(verdicts)}")
    req = [verdicts[k].outcome for k in required]
    sup = [verdicts[k].outcome for k in supporting]
    if "fails" in req:
        return "not supported"
    if all(o == "passes" for o in req):
        return "supported" if all(o == "passes" for o in sup) else "partly supported"
    return "not shown at this sample size"


def ratio_of_medians(slow: "np.ndarray", fast: "np.ndarray", *, name: str = "speed-up", n_boot: int = 2000, seed: int = 0) -> Measurement:
    """``median(slow) / median(fast)`` of repeated wall times with a bootstrap percentile interval (repeats of each
    side resampled independently). ``n`` is the number of repeats per side."""
    slow, fast = np.asarray(slow, dtype=float), np.asarray(fast, dtype=float)
    if len(slow) != len(fast) or len(slow) < 3:
        raise ValueError(f"need the same number (>= 3) of repeats on each side, got {len(slow)} and {len(fast)}")
    if (slow <= 0).any() or (fast <= 0).any():
        raise ValueError("wall times must be positive")
    rng = np.random.default_rng(seed)
    k = len(slow)
    bs = np.median(slow[rng.integers(0, k, (n_boot, k))], axis=1)
    bf = np.median(fast[rng.integers(0, k, (n_boot, k))], axis=1)
    a = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(bs / bf, [a, 1 - a])
    return Measurement(name, float(np.median(slow) / np.median(fast)), float(lo), float(hi), k, None,
                       "ratio of median wall times, bootstrap interval over repeats")


def from_row(row, name: str, feature: str | None) -> Measurement:
    """Metric ``name`` of a sweep-table row (columns ``name``, ``name_low``, ``name_high``, ``name_n``) as a
    :class:`Measurement` in feature space ``feature`` (a row does not record the space; the caller names it)."""
    cols = (name, f"{name}_low", f"{name}_high", f"{name}_n")
    missing = [c for c in cols if c not in row]
    if missing:
        raise KeyError(f"the row has no column(s) {missing}; columns: {', '.join(map(str, row.keys()))}")
    return Measurement(name, float(row[name]), float(row[f"{name}_low"]), float(row[f"{name}_high"]), int(row[f"{name}_n"]), feature)


def exact(name: str, value: float) -> Measurement:
    """A count or ratio of counts (FLOPs, network calls): no sampling error, so its interval is the value itself."""
    return Measurement(name, float(value), float(value), float(value), 1, None, "exact count")
