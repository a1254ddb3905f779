"""What produced a result: the model as it is in memory, the library versions, the companion's own code, the
machine. Cache keys are digests of these, so a cached result is served only when nothing that changes it changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from collections import OrderedDict
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from .speed import describe as describe_speed

PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARIES = ("torch", "diffusers", "torchmetrics", "scipy", "numpy")


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of the companion's own source (every module of the package): an edit to any of them is a new code
    version, whether or not the package version number moved."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def versions() -> dict:
    """Versions of the libraries a result depends on, and the companion's source digest."""
    out = {}
    for pkg in LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    out["torch_build"] = torch.__version__
    out["companion_source"] = source_digest()[:16]
    return out


def machine() -> dict:
    """The host a timing was taken on (part of a timing's key, not of a quality's): the same device in a host with
    fewer cores or more threads times differently but samples the same."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpu": gpu, "torch_threads": torch.get_num_threads()}


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_identity(device) -> dict:
    """``{"device_kind", "device_name"}`` of the device a model computes on: what makes its samples bit-identical.

    The same seeds give the same samples only on the same kind of processor running the same kernels, so a quality
    result is keyed by this (and shared between hosts and ranks that have it); a timing is keyed by it and the host.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = ".".join(map(str, torch.cuda.get_device_capability(index)))
        return {"device_kind": "cuda", "device_name": f"{torch.cuda.get_device_name(index)} (sm {cap})"}
    if dev.type == "cpu":
        return {"device_kind": "cpu", "device_name": cpu_name()}
    return {"device_kind": dev.type, "device_name": platform.machine() or dev.type}


def model_dtype(model) -> str:
    """The floating-point type of a model's weights as it computes (``float32`` for a model without parameters)."""
    params = getattr(model, "parameters", None)
    for p in (params() if callable(params) else ()):
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, torch.as_tensor(t))
    return h.hexdigest()


_FINGERPRINTS: "OrderedDict[tuple, str]" = OrderedDict()


def model_fingerprint(model) -> str:
    """sha256 of what the model computes *now*: its weights and buffers as they are in memory (not as loaded), its
    class, training schedule and speed wrapper. A model changed in place gets a new fingerprint.

    Hashing a few MB of weights costs milliseconds, so the digest is memoised per model object and per state of its
    tensors: torch bumps a tensor's version counter on every in-place change (``p.mul_(0.5)``, an optimiser step)
    and assigning new data changes its storage pointer, and both are part of the memo key."""
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    memo = (id(model), tuple((k, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for k, t in state.items()))
    if memo in _FINGERPRINTS:
        _FINGERPRINTS.move_to_end(memo)
        return _FINGERPRINTS[memo]
    h = hashlib.sha256(type(model).__qualname__.encode())
    if state:
        for name, t in sorted(state.items()):
            h.update(name.encode())
            _tensor_digest(h, t)
    else:
        h.update(str(getattr(model, "sha256", id(model))).encode())
    h.update(json.dumps(getattr(model, "scheduler_config", {}), sort_keys=True, default=str).encode())
    h.update(json.dumps(describe_speed(model), sort_keys=True, default=str).encode())
    digest = _FINGERPRINTS[memo] = h.hexdigest()
    if len(_FINGERPRINTS) > 256:
        _FINGERPRINTS.popitem(last=False)
    return digest
