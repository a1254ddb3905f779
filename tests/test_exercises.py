"""The exercise self-checks: what they print, what they return, what they refuse."""
import numpy as np
import pytest
import torch

from companion import exercises as X
from companion import oracle as O


def test_check_prints_pass_with_measured_and_expected(capsys):
    assert X.check("exercise 1", True, "ratio 7.6", "between 4 and 16") is True
    assert capsys.readouterr().out == "exercise 1: PASS — measured ratio 7.6; expected between 4 and 16\n"


def test_check_prints_not_yet_and_returns_false(capsys):
    assert X.check("exercise 2", False, "30 NFE", "20 NFE") is False
    assert capsys.readouterr().out.startswith("exercise 2: NOT YET — measured 30 NFE; expected 20 NFE")


@pytest.mark.parametrize("flag, result", [(np.bool_(True), True), (np.float64(2.0) > 3, False), (torch.tensor(True), True),
                                          (np.array(False), False)])
def test_check_takes_numpy_and_torch_booleans(flag, result, capsys):
    out = X.check("c", flag, "m", "e")
    assert out is result
    assert ("PASS" if result else "NOT YET") in capsys.readouterr().out


@pytest.mark.parametrize("flag", [None, 1, 0.0, "True", torch.tensor([True, False]), torch.tensor(1.0)])
def test_check_refuses_anything_but_one_boolean(flag):
    with pytest.raises(TypeError, match="boolean"):
        X.check("c", flag, "m", "e")


@pytest.mark.parametrize("field", ["name", "measured", "expected"])
def test_check_refuses_empty_descriptions(field):
    args = {"name": "c", "measured": "m", "expected": "e", field: "  "}
    with pytest.raises(ValueError, match=field):
        X.check(args["name"], True, args["measured"], args["expected"])


def test_check_answer_none_is_not_yet_and_names_the_variable(capsys):
    assert X.check_answer("ex", None, 30, variable="my_nfe") is False
    out = capsys.readouterr().out
    assert out.startswith("ex: NOT YET — `my_nfe` is still None") and "30" not in out


def test_unanswered_is_not_yet_and_refuses_empty_text(capsys):
    assert X.unanswered("ex 1", "my_answer", "True or False") is False
    assert capsys.readouterr().out == ("ex 1: NOT YET — `my_answer` is still None: write your answer there and run the cell "
                                       "again (expected: True or False)\n")
    with pytest.raises(ValueError, match="variable"):
        X.unanswered("ex 1", "", "True or False")


def test_check_answer_exact_and_within_tolerance(capsys):
    assert X.check_answer("ex", 30, 30, variable="v") is True
    assert X.check_answer("ex", 7.0, 8.0, variable="v", tolerance=1.0) is True
    assert X.check_answer("ex", 6.9, 8.0, variable="v", tolerance=1.0) is False
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" — ")[0] for line in out] == ["PASS", "PASS", "NOT YET"]
    assert "too low" in out[2]


def test_check_answer_says_too_high_without_giving_the_value_away(capsys):
    assert X.check_answer("ex", 40, 30, variable="v", unit="NFE") is False
    out = capsys.readouterr().out
    assert "too high" in out and "30" not in out


@pytest.mark.parametrize("answer", [True, "30", float("nan")])
def test_check_answer_refuses_non_numbers(answer):
    with pytest.raises(TypeError, match="v must be a finite number"):
        X.check_answer("ex", answer, 30, variable="v")


def test_check_answer_refuses_bad_tolerance_and_variable():
    with pytest.raises(ValueError, match="tolerance"):
        X.check_answer("ex", 1, 1, variable="v", tolerance=-1)
    with pytest.raises(ValueError, match="variable"):
        X.check_answer("ex", 1, 1, variable="")


def test_within_factor_bounds():
    assert X.within_factor(4.0, 8.0, 2.0) and X.within_factor(16.0, 8.0, 2.0)
    assert not X.within_factor(3.99, 8.0, 2.0) and not X.within_factor(16.01, 8.0, 2.0)
    with pytest.raises(ValueError, match="factor"):
        X.within_factor(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        X.within_factor(0.0, 1.0, 2.0)


def test_median_seconds_warms_up_and_ignores_one_disturbed_repeat(monkeypatch):
    calls = []
    # perf_counter readings: repeat 1 takes 1 s, repeat 2 takes 10 s (disturbed), repeat 3 takes 2 s
    clock = iter([0.0, 1.0, 1.0, 11.0, 11.0, 13.0])
    monkeypatch.setattr(X.time, "perf_counter", lambda: next(clock))
    assert X.median_seconds(lambda: calls.append(1), repeats=3, warmup=2) == 2.0
    assert len(calls) == 5  # two untimed warm-up calls, three timed


@pytest.mark.parametrize("kw", [{"repeats": 0}, {"repeats": 2.0}, {"warmup": -1}])
def test_median_seconds_refuses_bad_counts(kw):
    with pytest.raises(ValueError):
        X.median_seconds(lambda: None, **kw)


class _Panel:
    def __init__(self, idle: bool):
        self.idle, self.timeouts = idle, []

    def wait(self, timeout):
        self.timeouts.append(timeout)
        return self.idle


def test_wait_for_panel_passes_its_timeout_and_raises_when_still_busy():
    idle = _Panel(True)
    X.wait_for_panel(idle, timeout=5)
    assert idle.timeouts == [5]
    with pytest.raises(TimeoutError, match="still running after 3 s"):
        X.wait_for_panel(_Panel(False), timeout=3)


def test_reference_gap_shrinks_as_the_quick_reference_converges():
    model = O.toy_mixture((1, 4, 4))
    coarse, fine = X.reference_gap(model, n=8, steps=10), X.reference_gap(model, n=8, steps=200)
    assert fine.n == 8 and fine.low <= fine.value <= fine.high
    # 200 UniPC steps lie within 1e-2 of the DOP853 solution on an exact score, and far closer than 10 steps
    assert fine.value < 1e-2
    assert coarse.value > 10 * fine.value


def test_check_smallest_says_which_way_to_move(capsys):
    def measure(n):  # falls with the step count; below 0.2 from 6 steps on
        return 1.0 / n

    assert X.check_smallest("ex", 6, measure, 0.2, variable="k") is True
    assert X.check_smallest("ex", 5, measure, 0.2, variable="k") is False
    assert X.check_smallest("ex", 8, measure, 0.2, variable="k") is False
    out = capsys.readouterr().out.splitlines()
    assert "PASS" in out[0]
    assert "NOT YET" in out[1] and "raise `k`" in out[1]
    assert "NOT YET" in out[2] and "lower `k`" in out[2]


def test_check_smallest_passes_when_one_step_less_is_not_a_valid_count(capsys):
    def measure(n):
        if n < 3:
            raise X.SamplingError(f"needs at least 3 steps, got {n}")
        return 0.1

    assert X.check_smallest("ex", 3, measure, 0.2, variable="k") is True
    with pytest.raises(ValueError, match="positive int"):
        X.check_smallest("ex", 2.5, measure, 0.2, variable="k")


def test_ratio_bounds():
    assert X.ratio_bounds((1.0, 0.5, 2.0), (0.5, 0.25, 1.0)) == (2.0, 0.5, 8.0)
    assert X.ratio_bounds((1.0, -0.5, 2.0), (0.5, 0.25, 1.0)) == (2.0, -2.0, 8.0)  # a's interval crosses 0
    assert X.ratio_bounds((1.0, 0.5, 2.0), (0.5, 0.0, 1.0)) == (2.0, 0.5, float("inf"))  # b's reaches 0
    assert X.ratio_bounds((1.0, 0.5, 2.0), (0.5, -0.1, 1.0)) == (2.0, -float("inf"), float("inf"))  # b's crosses 0
    with pytest.raises(ValueError, match="not defined"):
        X.ratio_bounds((1.0, 0.5, 2.0), (-0.1, -0.3, 0.2))
    with pytest.raises(ValueError, match="inside its interval"):
        X.ratio_bounds((1.0, 1.5, 2.0), (0.5, 0.25, 1.0))


def test_conv_flops_add_up_to_the_flop_counters_convolutions(tiny_model):
    from companion.design import architecture_profile

    convs = [n for n, m in tiny_model.unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    counted = X.conv_flops(tiny_model, convs)
    assert sum(counted.values()) == architecture_profile(tiny_model)["flops_convolution"]
    # conv_in: 3x3, 1 -> 8 channels on the 8x8 input
    assert counted["conv_in"] == 2 * 9 * 1 * 8 * 8 * 8
    with pytest.raises(ValueError, match="not convolutions.*conv_in"):
        X.conv_flops(tiny_model, ["conv_norm_out"])


def test_distance_to_reference_falls_with_steps_and_is_none_for_stochastic_samplers():
    model = O.toy_mixture((1, 4, 4))
    coarse, fine = (X.distance_to_reference(model, "dpmpp_2m", n) for n in (5, 50))
    assert 0 < fine < coarse / 5
    assert X.distance_to_reference(model, "ddpm", 10) is None


def test_spacing_gap_is_the_difference_of_the_two_spacings_distances():
    model = O.toy_mixture((1, 4, 4))
    gap = X.spacing_gap(model, "dpmpp_2m", "karras", "trailing")
    expected = (X.distance_to_reference(model, "dpmpp_2m", 6, spacing="karras")
                - X.distance_to_reference(model, "dpmpp_2m", 6, spacing="trailing"))
    assert gap(6) == pytest.approx(expected, abs=1e-12)
    assert gap(6) != 0.0
    assert X.spacing_gap(model, "dpmpp_2m", "trailing", "trailing")(6) == 0.0


class _MeanSign(torch.nn.Module):
    """A 'classifier' of two classes: the sign of the image's mean. It records the timesteps it is given."""

    def forward(self, x, t):
        self.t = t
        return torch.nn.functional.one_hot(x.flatten(1).mean(1).gt(0).long(), 2).float()


def test_readable_fraction_noises_to_t_and_passes_t_to_the_classifier():
    images = torch.cat([torch.full((100, 1, 4, 4), -0.8), torch.full((100, 1, 4, 4), 0.8)])
    labels = torch.arange(200) // 100
    clf = _MeanSign()
    assert X.readable_fraction(images, labels, 0, classifier=clf) == 1.0
    assert clf.t.tolist() == [0] * 200
    # at t = 999 the linear schedule leaves sqrt(4e-5) of the signal: the sign of the mean is a coin flip
    assert 0.35 < X.readable_fraction(images, labels, 999, classifier=clf) < 0.65
    assert clf.t.tolist() == [999] * 200


def test_difference_interval_is_mover():
    d, lo, hi = X.difference_interval((3.0, 2.0, 5.0), (1.0, 0.5, 1.2))
    assert d == 2.0
    assert lo == pytest.approx(2.0 - (1.0 ** 2 + 0.2 ** 2) ** 0.5) and hi == pytest.approx(2.0 + (2.0 ** 2 + 0.5 ** 2) ** 0.5)
    with pytest.raises(ValueError, match="inside its interval"):
        X.difference_interval((3.0, 3.5, 5.0), (1.0, 0.5, 1.2))


def test_versus_states_difference_and_ratio_or_why_not():
    line = X.versus((3.0, 2.0, 5.0), (1.0, 0.5, 1.2))
    assert line.startswith("difference +2.00 [")
    assert "ratio 3.00x" in line and "1.67 to 10.00" in line
    # a reference whose interval reaches 0 has no meaningful ratio: the line says why instead of printing one
    assert "no ratio" in X.versus((3.0, 2.0, 5.0), (0.1, -0.2, 0.4))


def test_difference_interval_refuses_incomparable_measurements():
    from companion.metrics import Measurement
    a = Measurement("fd", 1.0, 0.8, 1.2, 500, "digits-judge")
    with pytest.raises(ValueError, match="n = 500"):
        X.difference_interval(a, Measurement("fd", 1.0, 0.8, 1.2, 200, "digits-judge"))


def test_no_chapter_cell_ends_in_a_self_check_whose_boolean_jupyter_would_show():
    # a cell whose last statement is a bare check(...) shows "True"/"False" under the PASS / NOT YET line
    import ast
    import json
    from pathlib import Path

    names = {n for n in dir(X) if n.startswith("check") or n == "unanswered"}
    shown = []
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            src = "".join(cell["source"]).strip()
            if cell["cell_type"] != "code" or not src:
                continue
            # IPython's magics and shell lines are not Python: read them as no-ops
            code = "\n".join(("pass" if line.lstrip().startswith(("%", "!")) else line) for line in src.splitlines())
            last = ast.parse(code).body[-1]
            call = last.value if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) else None
            name = getattr(call.func, "id", getattr(call.func, "attr", None)) if call is not None else None
            if name in names and not src.endswith(";"):
                shown.append(f"{path.name} cell {i}: {name}(...)")
    assert not shown, "end these cells with ';' (or assign the result): " + ", ".join(shown)
