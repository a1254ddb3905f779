"""Interval comparisons (clearly above / below / not distinguishable), the FD triple and the class-accuracy
panel callback: the helpers the chapters decide their claims with."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from companion import metrics as M


def m(value, low, high):
    return M.Measurement("fd", value, low, high, 200)


def test_interval_reads_measurements_and_triples():
    assert M.interval(m(2.0, 1.0, 3.0)) == (2.0, 1.0, 3.0)
    assert M.interval((2, 1, 3)) == (2.0, 1.0, 3.0)
    with pytest.raises(TypeError, match=r"Measurement or a \(value, low, high\) triple, got \(1, 2\)"):
        M.interval((1, 2))


def test_from_columns_reads_back_what_as_columns_wrote():
    row = pd.Series(M.as_columns({"fd": m(2.0, 1.0, 3.0)}))
    assert M.from_columns(row, "fd") == (2.0, 1.0, 3.0)
    with pytest.raises(KeyError, match=r"no column\(s\) \['kid', 'kid_low', 'kid_high'\]"):
        M.from_columns(row, "kid")


def test_clearly_above_and_below_need_disjoint_intervals():
    a, b, c = m(10, 9, 11), m(5, 4, 6), m(8, 5.5, 9.5)
    assert M.clearly_above(a, b) and M.clearly_below(b, a)
    assert not M.clearly_above(a, c) and not M.clearly_below(c, a)  # touching/overlapping: not distinguishable
    assert not M.clearly_above(m(5, 4, 6), (5, 4, 6)) and not M.clearly_below((5, 4, 6), (5, 4, 6))
    assert M.clearly_above((3, 2.0, 4), (1, 0, 1.9)) and not M.clearly_above((3, 2.0, 4), (1, 0, 2.0))  # strict


def test_compared_with_says_better_worse_or_not_distinguishable():
    base = (10, 9, 11)
    assert M.compared_with((5, 4, 6), base) == "better than base"  # lower is better by default (FD)
    assert M.compared_with((15, 14, 16), base) == "worse than base"
    assert M.compared_with((10.5, 9.5, 12), base) == "not distinguishable from base (95 % intervals overlap)"
    assert M.compared_with((5, 4, 6), base, "w=1", higher_is_better=True) == "worse than w=1"
    assert M.compared_with((15, 14, 16), base, "w=1", higher_is_better=True) == "better than w=1"


def test_fd_triple_is_the_clamped_frechet_distance():
    from companion.data import digits

    x, _ = digits(16, "test")
    x = x[:128]
    got = M.fd_triple(x * 2)
    want = M.frechet_distance((x * 2).clamp(-1, 1))
    assert got == (want.value, want.low, want.high)


def test_class_accuracy_quality_is_a_panel_callback():
    from companion.data import digits

    x, y = digits(16, "test")

    class Result:
        images, class_labels = x[:40] * 3, y[:40]  # out of range: clamped as a saved image would be

    q = M.class_accuracy_quality(None, Result())
    assert q == M.class_accuracy(x[:40].mul(3).clamp(-1, 1), y[:40]).value
    assert isinstance(q, float) and M.class_accuracy_quality.label == "class accuracy (higher is better)"
