"""The interactive panels work in JupyterLab as a person uses them: run all, move the slider, pick a sampler.

Each notebook test opens a temporary copy in JupyterLab (headless Chromium), runs Run -> Run All Cells,
waits for an idle kernel, requires the panel to be a live widget (not its text fallback), then moves the
steps slider with the keyboard and changes the sampler; after each change the image must change and the
plotly figure must gain a point. Screenshots go to artifacts/e2e/. The harness itself is proven on a
fixture panel and on two broken variants of it, on which it must fail.
"""
from __future__ import annotations

import time

import pytest

import jupyterlab_driver as lab

# Room for the slowest path: Run All, two panel reactions, page and kernel start.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(lab.RUN_TIMEOUT + 2 * lab.REACT_TIMEOUT + 120)]


def _no_console_errors(lab_page) -> None:
    assert not lab_page.console.errors, "front-end errors in the browser console:\n" + "\n".join(lab_page.console.errors)


def _adds_a_point(label: str) -> bool:
    """Samplers whose panel runs add a point to the speed/quality curve, cheapest kind first.

    The curve's quality is the distance to an ODE reference, which stochastic samplers do not have (their
    runs add no point by design); one network evaluation per step keeps the run short.
    """
    from companion.samplers import REGISTRY

    spec = next((s for s in REGISTRY.values() if s.name == label), None)
    return spec is not None and not spec.stochastic and spec.nfe_per_step == 1


def test_fixture_panel_reacts(lab_page):
    nb = "e2e/panel.ipynb"
    lab_page.open(nb)
    lab_page.run_all(nb)
    seen = lab.exercise_panel(lab_page.page, nb, f"{lab_page.name}", lab.REACT_TIMEOUT)
    start, after_slider, after_sampler = seen["points"]
    assert start == [1] and after_slider == [2] and after_sampler == [3], seen  # one point per run
    assert seen["steps"] == ("10", "11"), seen  # ArrowRight moves the IntSlider by its step of 1
    assert seen["sampler"] == ("ddim", "euler"), seen
    _no_console_errors(lab_page)


def test_companion_sampler_panel_reacts(lab_page):
    """companion.widgets.SamplerPanel itself, on an exact-score toy model (cheap runs, same widgets)."""
    nb = "e2e/sampler_panel.ipynb"
    lab_page.open(nb)
    lab_page.run_all(nb)
    seen = lab.exercise_panel(lab_page.page, nb, lab_page.name, lab.REACT_TIMEOUT, sampler_ok=_adds_a_point)
    assert seen["steps"] == ("10", "11"), seen
    assert seen["sampler"][0] == "DPM-Solver++ 2M", seen
    _no_console_errors(lab_page)


def test_harness_fails_when_callback_is_broken(lab_page):
    nb = "e2e/panel_broken_callback.ipynb"
    lab_page.open(nb)
    lab_page.run_all(nb)
    with pytest.raises(AssertionError, match="the image did not change; the plotly figure gained no point"):
        lab.exercise_panel(lab_page.page, nb, lab_page.name, timeout_s=3)


def test_harness_fails_when_panel_is_text_only(lab_page):
    nb = "e2e/panel_text_only.ipynb"
    lab_page.open(nb)
    lab_page.run_all(nb)
    with pytest.raises(AssertionError, match=r"no panel rendered as a live widget.*VBox\(children="):
        lab.find_panel(lab_page.page, nb, timeout_s=3)


# The tour and one sampler chapter are driven through the browser; every notebook is executed by nbval and
# opened by test_console.py. Driving all chapters here would run each of them a second time in CI.
BROWSER_DRIVEN = ("00_tour.ipynb", "06_fast_solvers.ipynb")


@pytest.mark.parametrize("notebook", [p for p in lab.repo_notebooks() if p.name in BROWSER_DRIVEN], ids=lambda p: p.name)
def test_notebook_panel_reacts(lab_page, notebook):
    if not lab.has_panel(notebook):
        pytest.skip(f"{notebook.name} has no sampler panel yet (no code cell builds companion.widgets.SamplerPanel)")
    nb = f"notebooks/{notebook.name}"
    lab_page.open(nb)
    lab_page.run_all(nb)
    if notebook.name == "00_tour.ipynb":
        # the tour's first self-check times DDIM-5 against DDIM-40 beside the browser and the panel's own work: in
        # JupyterLab it must see the network's cost (wall-time ratio near the NFE ratio), as it does headless
        texts = lab_page.page.locator(lab.NOTEBOOK).locator(".jp-OutputArea-output").all_inner_texts()
        line = next((ln for t in texts for ln in t.splitlines() if ln.startswith("exercise 1:")), None)
        assert line is not None and "PASS" in line, f"the tour's exercise-1 self-check in the browser: {line!r}"
    lab.exercise_panel(lab_page.page, nb, lab_page.name, lab.REACT_TIMEOUT, sampler_ok=_adds_a_point)
    _no_console_errors(lab_page)


def test_sweep_view_draws_points_while_run_all_is_still_running(lab_page):
    """SweepView.show() puts the view on the page before waiting: points appear while the cell still runs."""
    nb = "e2e/sweep_view.ipynb"
    lab_page.open(nb)
    page = lab_page.page
    t0 = lab.start_run_all(page)
    notebook = page.locator(lab.NOTEBOOK).first
    counts = lambda: sum(notebook.evaluate(lab.POINTS_JS))  # points in every plotly figure of the notebook
    seen_while_running = None
    deadline = t0 + lab.RUN_TIMEOUT
    while seen_while_running is None and time.monotonic() < deadline:
        points = counts()
        state = lab.run_state(page)
        if state["pending"] == 0 and state["status"] == "idle":
            break
        if 0 < points < 8 and state["pending"] > 0:
            seen_while_running = points
        page.wait_for_timeout(100)
    lab_page.screenshot("while-running")
    assert seen_while_running, "no point of the sweep appeared in the browser before Run All finished the cell"
    lab.wait_run_all(page, nb, t0, lab.RUN_TIMEOUT)
    page.wait_for_timeout(500)
    assert counts() == 8  # 2 samplers x 4 step counts, all drawn once the sweep ended
    _no_console_errors(lab_page)
