"""SweepView driven programmatically: a tiny bench sweep on an exact-score mixture, one point per finished run."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from companion import oracle
from companion.widgets import SweepView, series_points

# Four samples are enough for the ODE distance on a 16-dimensional mixture; its reference solve is exact-score and cheap.
TINY = dict(n_samples=4, n_ode=4, metrics=("ode_distance",))


def gated_mixture(gate: threading.Event):
    """The toy mixture whose evaluations wait for ``gate``: a run is surely in progress until the test opens it."""
    model = oracle.toy_mixture()
    exact = model.predict_noise

    def predict_noise(x, t, class_labels=None, cond=None):
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return exact(x, t, class_labels=class_labels, cond=cond)

    model.predict_noise = predict_noise
    return model


def curve_points(view) -> list[tuple[float, float]]:
    return sorted((x, y) for t in view.figure.data if t.hovertemplate for x, y in zip(t.x, t.y))


def test_one_point_per_finished_run_and_the_progress_bar_reaches_the_total(tmp_path):
    seen = []
    view = SweepView(oracle.toy_mixture(), ["ddim", "heun"], [2, 4], x="nfe", cache_dir=tmp_path, start=False, **TINY)
    assert view.total == 4 and view.progress.max == 4 and view.progress.value == 0
    view.progress.observe(lambda ch: seen.append((ch["new"], series_points(view.figure))), names="value")
    view.start()
    assert view.wait(60)
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]  # the curve grew by one point as each run finished
    assert view.error.value == "" and "done: 4 of 4 runs" in view.status.value
    df = view.frame()
    assert len(df) == 4 and not df["cached"].any()
    assert curve_points(view) == sorted(zip(df["nfe"].astype(float), df["ode_distance"]))
    assert {t.name for t in view.figure.data if t.hovertemplate} == {"DDIM", "Heun"}
    assert view.table.value.count("<tr") == 1 + 4  # header + one row a run
    assert view.stop_button.disabled and view.resume_button.disabled
    # a second view of the same sweep reads every run back from the cache: the same points
    again = SweepView(oracle.toy_mixture(), ["ddim", "heun"], [2, 4], x="nfe", cache_dir=tmp_path, **TINY)
    assert again.wait(60)
    assert again.frame()["cached"].all() and "4 from the cache" in again.status.value
    assert curve_points(again) == curve_points(view)


def test_error_bars_come_from_the_bootstrap_interval(tmp_path):
    view = SweepView(oracle.toy_mixture(), ["ddim"], [2, 4], cache_dir=tmp_path, **TINY)
    assert view.wait(60)
    df = view.frame().sort_values("wall_s", kind="stable")  # a line's points are sorted by x
    trace = next(t for t in view.figure.data if t.name == "DDIM")
    np.testing.assert_allclose(trace.error_y.array, df["ode_distance_high"] - df["ode_distance"], rtol=1e-12)
    np.testing.assert_allclose(trace.error_y.arrayminus, df["ode_distance"] - df["ode_distance_low"], rtol=1e-12)
    np.testing.assert_allclose(trace.x, df["wall_s"], rtol=1e-12)


def test_stop_ends_after_the_current_run_keeps_it_and_resume_runs_the_rest(tmp_path):
    gate = threading.Event()
    view = SweepView(gated_mixture(gate), ["ddim"], [4, 6, 8], cache_dir=tmp_path, **TINY)
    assert view.running and not view.stop_button.disabled
    view.stop_button.click()  # pressed while the first run waits at its first network evaluation
    assert "stopping after the current run" in view.status.value
    gate.set()  # the run in progress finishes; no further run starts
    assert view.wait(60)
    assert view.done == 1 and series_points(view.figure) == 1
    assert view.progress.value == 1 < view.progress.max == 3
    assert view.frame()["steps"].tolist() == [4]
    assert view.table.value.count("<tr") == 1 + 1
    assert "stopped: 1 of 3 runs finished" in view.status.value
    assert not view.resume_button.disabled and view.stop_button.disabled
    view.resume_button.click()
    assert view.wait(60)
    assert view.done == 3 and series_points(view.figure) == 3  # the finished run is not drawn twice
    assert view.frame()["steps"].tolist() == [4, 6, 8] and view.progress.value == 3
    assert "done: 3 of 3 runs" in view.status.value


def test_an_error_is_shown_in_plain_words_and_finished_runs_stay(tmp_path):
    view = SweepView(oracle.toy_mixture(), ["ddim"], [2], modes=({}, {"spacing": "nonsense"}), cache_dir=tmp_path, **TINY)
    assert view.wait(60)
    assert "The sweep stopped at an error" in view.error.value and "nonsense" in view.error.value
    assert "trailing" in view.error.value  # the message lists the valid spacings
    assert view.done == 1 and series_points(view.figure) == 1 and view.progress.value == 1
    assert "1 of 2 runs finished" in view.status.value and view.progress.bar_style == "danger"
    assert not view.resume_button.disabled
    assert {t.name for t in view.figure.data if t.hovertemplate} == {"DDIM (default)"}  # modes vary: in the label


def test_a_sweep_refused_before_any_run_says_why(tmp_path):
    view = SweepView(oracle.toy_mixture(), ["ddim"], [2], n_samples=4, metrics=("fd",), cache_dir=tmp_path)
    assert view.wait(60)
    assert "fd needs at least 128 samples, got 4" in view.error.value
    assert view.done == 0 and series_points(view.figure) == 0 and view.table.value == ""


def test_static_representation_has_the_figure_and_the_table_of_finished_runs(tmp_path):
    view = SweepView(oracle.toy_mixture(), ["ddim"], [2, 4], cache_dir=tmp_path, **TINY)
    assert view.wait(60)
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    html = bundle["text/html"]
    assert "plotly" in html and html.count("<tr") == 1 + 2 and "distance to ODE solution" in html and "done: 2 of 2" in html


def test_bad_arguments_are_refused():
    model = oracle.toy_mixture()
    with pytest.raises(ValueError, match=r"y='fd' is not measured by metrics=\['ode_distance'\]; choose one of \['ode_distance'\]"):
        SweepView(model, ["ddim"], [2], y="fd", start=False, **TINY)
    with pytest.raises(ValueError, match=r"x='time' is not valid; choose one of"):
        SweepView(model, ["ddim"], [2], x="time", start=False, **TINY)
    with pytest.raises(TypeError, match="must be sequences"):
        SweepView(model, "ddim", [2], start=False, **TINY)
    with pytest.raises(ValueError, match="warp_drive"):
        SweepView(model, ["warp_drive"], [2], start=False, **TINY)


def test_show_displays_the_view_before_the_sweep_ends_and_refreshes_it_after(tmp_path, monkeypatch):
    import IPython.display

    gate, shown = threading.Event(), []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj.done, obj.running))

    def display(obj, display_id=False):
        shown.append(("display", obj.done, obj.running))
        gate.set()  # the sweep may go on only once the view is on the page
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    view = SweepView(gated_mixture(gate), ["ddim"], [2, 4], cache_dir=tmp_path, **TINY)
    assert view.show(timeout=60) is None  # nothing for the cell to print after the view
    assert not view.running and view.done == 2
    assert shown == [("display", 0, True), ("update", 2, False)]  # shown while running, refreshed when finished
