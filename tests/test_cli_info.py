"""`companion info` names the accelerator (or says "none: CPU only" and why), the Hub cache and offline mode."""
from __future__ import annotations

import json

import pytest
import torch

from companion import assets, cli, device


@pytest.fixture(scope="module")
def info_text():
    """`companion info` as printed, once for the module (it checks the sha256 of every bundled file)."""
    import contextlib
    import io
    import os

    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli.main(["info"])
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return rc, out.getvalue()


@pytest.mark.skipif(torch.cuda.is_available() or device._available("mps"), reason="needs a machine without an accelerator")
def test_info_on_cpu_says_none_cpu_only_and_why(info_text):
    _, text = info_text
    line = next(ln for ln in text.splitlines() if ln.startswith("accelerator"))
    why = "torch is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
    assert "none: CPU only" in line and why in line, line


def test_info_shows_version_hub_cache_offline_mode_and_notebooks(info_text):
    from huggingface_hub import constants

    import companion

    _, text = info_text
    rows = dict((ln[:14].strip(), ln[14:]) for ln in text.splitlines() if ln[:1] != " " and len(ln) > 14)
    assert rows["companion"] == companion.__version__
    assert rows["hub cache"].startswith(constants.HF_HUB_CACHE) and "HF_HUB_OFFLINE on" in rows["hub cache"]
    assert rows["notebooks"] == str(assets.notebooks_dir())


def test_offline_mode_follows_the_environment(monkeypatch):
    for value, expected in [("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert assets.hub_offline() is expected, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert assets.hub_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert assets.hub_unavailable() == "HF_HUB_OFFLINE is set"  # downloads read the same switch


def test_info_json_carries_the_accelerator_fields(monkeypatch):
    monkeypatch.setattr(assets, "status", lambda: [])  # the asset check is covered by test_foundation
    info = json.loads(json.dumps(cli.info_dict()))
    assert info["accelerators"] == device.accelerators()
    assert info["torch_cuda"] == torch.version.cuda
    assert set(info) >= {"companion", "hub_cache", "hub_offline", "notebooks_dir", "nvidia_driver", "cuda_driver"}


def test_accelerator_line_names_gpu_memory_driver_and_cuda():
    info = {"accelerators": [{"device": "cuda:0", "name": "NVIDIA H200", "memory_bytes": 150 * 2**30, "compute_capability": "9.0"}],
            "torch_cuda": "12.8", "nvidia_driver": "570.86.15", "cuda_driver": "12.8"}
    line = device.accelerator_summary(info)
    assert line == ("cuda:0 NVIDIA H200, 150.0 GiB, compute capability 9.0; "
                    "driver 570.86.15 (supports CUDA 12.8), torch built with CUDA 12.8")
    no_gpu = dict(info, accelerators=[], nvidia_driver=None)
    assert device.accelerator_summary(no_gpu) == "none: CPU only (torch is built for CUDA 12.8 but sees no GPU (driver: none found))"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accelerator_rows_match_torch_on_cuda():
    rows = device.accelerators()
    assert len(rows) == torch.cuda.device_count()
    assert rows[0]["name"] == torch.cuda.get_device_name(0) and rows[0]["memory_bytes"] > 2**30
    assert device.nvidia_driver() is not None and device.cuda_driver_version() is not None
