"""Small helpers shared by the panel tests (the tiny model itself is a fixture in conftest.py)."""
from __future__ import annotations

import threading

from companion.reference import ReferenceSolutions


def mean_abs(model, result):
    """A cheap, deterministic per-run quality for tests."""
    return float(result.images.abs().mean())


class SlowReferences(ReferenceSolutions):
    """A reference cache whose every lookup waits until the test opens ``gate``: a reference solution that takes
    as long as the test wants, without timing anything. ``asked`` counts lookups, ``waiting`` is set while one
    waits at the gate."""

    def __init__(self, open_at_start: bool = True):
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.asked = 0
        if open_at_start:
            self.gate.set()

    def get(self, *args, **kwargs):
        self.asked += 1
        if not self.gate.is_set():
            self.waiting.set()
            if not self.gate.wait(60):
                raise TimeoutError("the test never opened the gate")
        self.waiting.clear()
        return super().get(*args, **kwargs)
