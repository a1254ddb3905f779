"""Verdict rules: outcomes follow the stated test, refuse incomparable measurements, and can fail."""
import numpy as np
import pytest

from companion.metrics import Measurement
from companion.verdicts import Rule, difference, finding, judge, ratio_of_medians


def fd(value, low, high, n=256, feature="features-shapes"):
    return Measurement("fd", value, low, high, n, feature)


KEEPS = Rule("latent keeps quality", "FD (features-shapes)", "non-inferiority", higher_is_better=False, n=256, margin=0.25)
IMPROVES = Rule("guidance raises accuracy", "class accuracy", "superiority", higher_is_better=True, n=256)


def test_difference_interval_is_mover():
    a, b = fd(1.0, 0.8, 1.3), fd(0.5, 0.4, 0.7)
    d = difference(a, b)
    assert d.value == pytest.approx(0.5)
    assert d.low == pytest.approx(0.5 - np.hypot(0.2, 0.2))
    assert d.high == pytest.approx(0.5 + np.hypot(0.3, 0.1))


def test_equal_quality_passes_non_inferiority_but_not_superiority():
    # a lever exactly as good as its baseline, measured precisely: keeps quality, does not improve it
    a, b = fd(1.0, 0.95, 1.05), fd(1.0, 0.95, 1.05)
    assert judge(KEEPS, a, b).outcome == "passes"
    better = Rule("latent better", "FD", "superiority", higher_is_better=False, n=256)
    assert judge(better, a, b).outcome == "inconclusive"


def test_non_inferiority_fails_when_clearly_worse_than_margin():
    v = judge(KEEPS, fd(2.0, 1.9, 2.1), fd(1.0, 0.95, 1.05))  # 100 % worse, margin 25 %
    assert v.outcome == "fails" and not v.passed


def test_wide_intervals_are_inconclusive_and_say_what_n_can_detect():
    v = judge(KEEPS, fd(1.0, 0.0, 2.5), fd(1.0, 0.0, 2.5))
    assert v.outcome == "inconclusive"
    assert v.detectable > v.margin_value
    assert "too small" in v.power()


def test_superiority_direction_matters():
    up = judge(IMPROVES, Measurement("class_accuracy", 0.95, 0.92, 0.98, 256, "f"), Measurement("class_accuracy", 0.80, 0.75, 0.85, 256, "f"))
    down = judge(IMPROVES, Measurement("class_accuracy", 0.80, 0.75, 0.85, 256, "f"), Measurement("class_accuracy", 0.95, 0.92, 0.98, 256, "f"))
    assert up.outcome == "passes" and down.outcome == "fails"


def test_threshold_rule():
    r = Rule("large speed-up", "speed-up", "threshold", higher_is_better=True, n=5, margin=3.0)
    assert judge(r, Measurement("speed-up", 9.0, 8.0, 10.0, 5)).outcome == "passes"
    assert judge(r, Measurement("speed-up", 3.5, 2.5, 4.5, 5)).outcome == "inconclusive"
    assert judge(r, Measurement("speed-up", 2.0, 1.5, 2.5, 5)).outcome == "fails"


def test_refuses_different_feature_spaces_sample_sizes_and_metrics():
    with pytest.raises(ValueError, match="feature spaces"):
        judge(KEEPS, fd(1, 0.9, 1.1), fd(1, 0.9, 1.1, feature="features-digits"))
    with pytest.raises(ValueError, match="n = 256.*n = 128"):
        judge(KEEPS, fd(1, 0.9, 1.1), fd(1, 0.9, 1.1, n=128))
    with pytest.raises(ValueError, match="different metrics"):
        difference(fd(1, 0.9, 1.1), Measurement("kid", 1, 0.9, 1.1, 256, "features-shapes"))
    with pytest.raises(ValueError, match="stated for n = 256"):
        judge(KEEPS, fd(1, 0.9, 1.1, n=128), fd(1, 0.9, 1.1, n=128))
    with pytest.raises(TypeError, match="Measurement"):
        difference((1, 0.9, 1.1), fd(1, 0.9, 1.1))


def test_rule_validates_its_own_statement():
    with pytest.raises(ValueError, match="unknown test 'better'.*superiority"):
        Rule("x", "q", "better", higher_is_better=True, n=10)
    with pytest.raises(ValueError, match="margin"):
        Rule("x", "q", "non-inferiority", higher_is_better=False, n=10, margin=1.5)
    assert "25 %" in KEEPS.describe() and "n = 256" in KEEPS.describe()


def test_finding_combines_rules():
    p = judge(KEEPS, fd(1.0, 0.95, 1.05), fd(1.0, 0.95, 1.05))
    f = judge(KEEPS, fd(2.0, 1.9, 2.1), fd(1.0, 0.95, 1.05))
    i = judge(KEEPS, fd(1.0, 0.0, 2.5), fd(1.0, 0.0, 2.5))
    assert finding({"a": p, "b": p}, ("a",), ("b",)) == "supported"
    assert finding({"a": p, "b": i}, ("a",), ("b",)) == "partly supported"
    assert finding({"a": f, "b": p}, ("a", "b")) == "not supported"
    assert finding({"a": i, "b": p}, ("a", "b")) == "not shown at this sample size"
    with pytest.raises(KeyError, match="no verdict"):
        finding({"a": p}, ("a", "c"))


def test_ratio_of_medians_interval_brackets_the_ratio():
    rng = np.random.default_rng(0)
    slow, fast = 10 + rng.normal(0, 0.2, 7), 1 + rng.normal(0, 0.02, 7)
    m = ratio_of_medians(slow, fast)
    assert m.low <= m.value <= m.high and 9 < m.value < 11 and m.n == 7
    with pytest.raises(ValueError, match=">= 3"):
        ratio_of_medians([1, 2], [1, 2])


def test_from_row_and_exact():
    from companion.verdicts import exact, from_row

    m = from_row({"fd": 1.0, "fd_low": 0.5, "fd_high": 1.5, "fd_n": 128}, "fd", "features-digits")
    assert (m.value, m.low, m.high, m.n, m.feature) == (1.0, 0.5, 1.5, 128, "features-digits")
    with pytest.raises(KeyError, match="fd_n"):
        from_row({"fd": 1.0, "fd_low": 0.5, "fd_high": 1.5}, "fd", "features-digits")
    r = Rule("cheaper", "FLOP ratio", "threshold", higher_is_better=True, n=1, margin=2.0)
    assert judge(r, exact("flops ratio", 2.5)).outcome == "passes"
    assert judge(r, exact("flops ratio", 1.5)).outcome == "fails"
