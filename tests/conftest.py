"""Shared test fixtures: no network, no pickles."""
from __future__ import annotations

import pickle

import pytest
import torch


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE=1: what an offline machine with nothing downloaded sees."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home"


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every unpickling entry point raise, so a test fails if any file is unpickled."""

    def refuse(*args, **kwargs):
        raise AssertionError("a file was unpickled; checkpoints must load from safetensors/JSON only")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
