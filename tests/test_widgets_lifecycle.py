"""Panels release what they hold: closing ends the worker thread, a failure while showing a result is shown and
the worker keeps serving, history is bounded, and a worker never keeps its panel alive."""
from __future__ import annotations

import gc
import threading
import time

import pytest

from companion import widgets
from companion.widgets import LatestOnlyRunner, SamplerPanel


def _runner_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "companion-panel-runner" and t.is_alive()}


def _quality(model, result):
    return float(result.samples.abs().mean())


def test_closed_panels_leave_no_thread(tiny_model):
    before = _runner_threads()
    panels = [SamplerPanel(tiny_model, controls=("steps",), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                           quality=_quality) for _ in range(5)]
    for p in panels:
        p.controls["steps"].value = 3
        assert p.wait(60)
    assert len(_runner_threads() - before) == 5
    for p in panels:
        p.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _runner_threads() - before:
        time.sleep(0.1)
    assert not _runner_threads() - before
    with pytest.raises(RuntimeError, match="closed"):
        panels[0]._runner.request({})


def test_a_worker_does_not_keep_its_owner_alive():
    class Owner:
        def __init__(self):
            self.runner = LatestOnlyRunner(self.fn, self.done, self.err)

        def fn(self, req):
            return req

        def done(self, req, out):
            pass

        def err(self, req, exc):
            pass

    o = Owner()
    o.runner.request(1)
    assert o.runner.wait_idle(10)
    thread = o.runner._thread
    del o
    gc.collect()
    thread.join(LatestOnlyRunner.IDLE_CHECK_S * 5)
    assert not thread.is_alive()


def test_a_failure_while_showing_is_reported_and_the_worker_survives():
    seen = []

    def done(req, out):
        if req == 1:
            raise ValueError("drawing failed")
        seen.append(("done", req))

    runner = LatestOnlyRunner(lambda r: r, done, lambda req, exc: seen.append(("error", req, str(exc))))
    runner.request(1)
    assert runner.wait_idle(10)
    runner.request(2)
    assert runner.wait_idle(10)
    assert seen == [("error", 1, "drawing failed"), ("done", 2)]
    runner.close()


def test_panel_history_is_bounded(tiny_model, monkeypatch):
    monkeypatch.setattr(widgets, "HISTORY_MAX", 3)
    p = SamplerPanel(tiny_model, controls=("seed",), defaults={"sampler": "ddim", "steps": 1, "batch": 2}, quality=_quality)
    for seed in range(1, 6):
        p.controls["seed"].value = seed
        assert p.wait(60)
    assert len(p.history) == 3 and p.history[-1].params["seed"] == 5
    p.close()


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _companion_threads() -> set[threading.Thread]:
    """The companion's live threads. Compared as sets of thread objects: a thread that an earlier test left and that
    ends during this one is neither a leak of this test nor a reason to miss one."""
    return {t for t in threading.enumerate() if t.name.startswith("companion-") and t.is_alive()}


@pytest.mark.slow
def test_soak_random_moves_across_panels_and_a_sweep(tiny_model):
    import random

    from companion import oracle
    from companion.widgets import SweepView

    def cycle(moves: int, rng: random.Random):
        a = SamplerPanel(tiny_model, controls=("steps", "seed"), defaults={"sampler": "ddim", "steps": 2, "batch": 2},
                         quality=_quality)
        b = SamplerPanel(tiny_model, controls=("sampler", "steps"), defaults={"sampler": "euler", "steps": 2, "batch": 2},
                         quality=_quality)
        sweep = SweepView(oracle.toy_mixture(), ["ddim", "euler"], [2, 3, 4], n_samples=8, metrics=("ode_distance",),
                          n_ode=4, cache_dir=False)
        for _ in range(moves):
            panel, name = rng.choice([(a, "steps"), (a, "seed"), (b, "sampler"), (b, "steps")])
            c = panel.controls[name]
            c.value = (rng.choice(["ddim", "euler", "heun", "dpmpp_2m"]) if name == "sampler"
                       else rng.randint(1, 6) if name == "steps" else rng.randint(0, 1000))
        for panel in (a, b):
            assert panel.wait(120)
            last = panel.history[-1].params
            assert all(last[k] == panel.controls[k].value for k in panel.controls), (last, {k: c.value for k, c in panel.controls.items()})
        sweep.close()
        a.close()
        b.close()

    threads0 = _companion_threads()
    cycle(20, random.Random(1))  # warm-up: first-call allocations are not a leak
    gc.collect()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _companion_threads() - threads0:
        time.sleep(0.1)
    rss0 = _rss_bytes()
    cycle(200, random.Random(0))
    gc.collect()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _companion_threads() - threads0:
        time.sleep(0.1)
    assert not _companion_threads() - threads0, f"threads left running: {sorted(t.name for t in _companion_threads() - threads0)}"
    assert _rss_bytes() <= 1.10 * rss0, f"memory grew from {rss0 / 1e6:.0f} MB to {_rss_bytes() / 1e6:.0f} MB"
