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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The CI/dev machines have 2 shared cores: two intra-op threads on a busy machine are ~50x slower for tiny nets.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build_tiny_unet(in_channels: int = 1, out_channels: int = 1, num_class_embeds: int | None = None, size: int = 8,
                     seed: int = 0, *, channels: tuple[int, ...] = (16, 32), attention_at: tuple[int, ...] = (),
                     mid_attention: bool = True):
    """A small random-init UNet (eval mode), the same weights for the same arguments.

    ``channels``: one resolution level each; ``attention_at``: the levels (0 = full resolution) whose blocks have
    attention; ``mid_attention``: attention in the middle block (diffusers' default).
    """
    from diffusers import UNet2DModel

    bad = [i for i in attention_at if not 0 <= i < len(channels)]
    if bad:
        raise ValueError(f"attention_at={attention_at}: levels {bad} do not exist; channels={channels} has levels 0..{len(channels) - 1}")
    levels = range(len(channels))
    down = tuple("AttnDownBlock2D" if i in attention_at else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in attention_at else "UpBlock2D" for i in reversed(levels))  # deepest level first
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(channels),
                       down_block_types=down, up_block_types=up, layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       add_attention=mid_attention, num_class_embeds=num_class_embeds).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    """The builder of small random-init UNets for sampler/speed tests: ``tiny_unet(in_channels=1, out_channels=1,
    num_class_embeds=None, size=8, seed=0, *, channels=(16, 32), attention_at=(), mid_attention=True)``."""
    return _build_tiny_unet


# ----------------------------------------------------------------------------- one real browser per session
# The JupyterLab tests (tests/e2e) and the book's tests share it: Playwright's sync API cannot be started twice in one
# process, so a second fixture of its own would fail whenever both sets run in one pytest session.
@pytest.fixture(scope="session")
def chromium():
    path, why = _browser_driver().ensure_chromium()
    if path is None:
        pytest.skip(f"real-browser tests need Chromium: {why}")
    return path


def _browser_driver():
    import sys
    from pathlib import Path

    e2e = str(Path(__file__).resolve().parent / "e2e")
    if e2e not in sys.path:
        sys.path.insert(0, e2e)
    import jupyterlab_driver

    return jupyterlab_driver


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the real-browser tests need the 'playwright' pip package: .venv/bin/pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("chromium")
    proc, endpoint = _browser_driver().start_chromium(chromium, tmp / "profile")
    pw = None
    try:
        pw = sync_playwright().start()
        browser = pw.chromium.connect_over_cdp(endpoint)
        yield browser
        browser.close()
    finally:
        _browser_driver().stop_group(proc)
        if pw is not None:
            pw.stop()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (text and vision towers, processor, a letter tokenizer) saved to a folder: no download."""
    pytest.importorskip("transformers")
    from companion.pipelines import letter_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tok = letter_tokenizer(folder / "tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder
