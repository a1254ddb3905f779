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


@pytest.fixture(scope="module")
def tiny_model():
    """A random-init class-conditional UNet for panel tests: runs cost milliseconds; nothing depends on trained weights."""
    from diffusers import UNet2DModel

    from companion.models import DiffusionModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4)
    return DiffusionModel(unet, name="tiny-cond", num_classes=3)
