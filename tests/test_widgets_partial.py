"""PartialPanel: the reverse chain started part-way, under a t0 slider and a start-image picker."""
from __future__ import annotations

import pytest
import torch

from companion.widgets import PartialPanel


@pytest.fixture(scope="module")
def sources():
    g = torch.Generator().manual_seed(0)
    return {"noise-like": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "flat": torch.zeros(4, 1, 8, 8)}


def test_panel_runs_at_once_and_again_when_a_control_moves(tiny_model, sources):
    p = PartialPanel(tiny_model, sources, torch.arange(4) % 3, t0=300, source="flat", n=3)
    first = p.result
    assert first is not None and first.images.shape == (3, 1, 8, 8)
    assert first.record.nfe == p.steps(300) == 6  # the 20-step chain's density over [0, 300]
    assert "noised to t=" in p.view.value and p.static_html() == p.view.value
    p.t0.value = 50
    assert p.result is not first and p.result.record.nfe == p.steps(50) == 1
    p.source.value = "noise-like"
    assert "result (1 NFE" in p.view.value
    assert p._repr_mimebundle_()["text/html"] == p.view.value


def test_panel_names_a_bad_source(tiny_model, sources):
    with pytest.raises(ValueError, match=r"source='nope'.*\['noise-like', 'flat'\]"):
        PartialPanel(tiny_model, sources, source="nope")
    with pytest.raises(ValueError, match="sources is empty"):
        PartialPanel(tiny_model, {})
