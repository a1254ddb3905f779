"""Nothing stale, nothing lost: a sweep's cache key follows everything that changes a row, and a cache that
cannot be written or is written by two threads at once never costs the results."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

from companion import bench, provenance
from companion.errors import CacheWarning
from companion.features import load_feature_net
from companion.speed import SpeedOptions, accelerate
from test_bench import tiny_model  # the same small random conditional UNet the sweep tests use

N = 128


def run(model, cache, metrics=("class_accuracy",)):
    return bench.sweep(model, ["ddim"], [2], n_samples=N, metrics=metrics, cache_dir=cache, progress=False).iloc[0]


def test_weights_changed_in_place_are_a_new_model(tmp_path):
    model = tiny_model()
    run(model, tmp_path)
    assert run(model, tmp_path)["cached"]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    halved = run(model, tmp_path)
    assert not halved["cached"]


def test_a_speed_wrapper_is_a_new_model(tmp_path):
    model = tiny_model()
    run(model, tmp_path)
    fast = accelerate(model, SpeedOptions.from_label("bf16"))
    assert model.sha256 == getattr(fast, "sha256", model.sha256)  # the loaded identity passes through the wrapper...
    assert not run(fast, tmp_path)["cached"]  # ...but the key does not use it


def test_a_changed_feature_network_is_a_new_measurement(tmp_path):
    model = tiny_model()
    run(model, tmp_path)
    net = load_feature_net("features-digits")
    p = next(net.parameters())
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.add_(0.25)
        assert not run(model, tmp_path)["cached"]
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert run(model, tmp_path)["cached"]  # the original network again: its rows are served again


def test_library_or_code_versions_are_part_of_the_key(tmp_path, monkeypatch):
    model = tiny_model()
    run(model, tmp_path)
    real = provenance.versions()
    monkeypatch.setattr(bench, "versions", lambda: dict(real, diffusers="0.99.0"))
    assert not run(model, tmp_path)["cached"]
    monkeypatch.setattr(bench, "versions", lambda: dict(real, companion_source="edited"))
    assert not run(model, tmp_path)["cached"]


def test_source_digest_changes_with_the_code(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path)
    provenance.source_digest.cache_clear()
    one = provenance.source_digest()
    (tmp_path / "a.py").write_text("x = 2\n")
    provenance.source_digest.cache_clear()
    assert provenance.source_digest() != one
    provenance.source_digest.cache_clear()


def test_an_unwritable_cache_keeps_the_results(tmp_path, monkeypatch):
    model = tiny_model()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bench.os, "replace", refuse)
    with pytest.warns(CacheWarning, match="could not write cache entry"):
        df = bench.sweep(model, ["ddim", "euler"], [2], n_samples=N, metrics=("class_accuracy",), cache_dir=tmp_path, progress=False)
    assert len(df) == 2 and df["class_accuracy"].notna().all()
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_a_cache_path_that_is_a_file_is_refused_clearly(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        bench.RunCache(f)


def test_two_threads_writing_one_key_never_fail(tmp_path):
    cache = bench.RunCache(tmp_path)
    config = {"a": 1}
    errors = []

    def writer(i):
        try:
            for j in range(150):
                cache.put("same-key", config, {"nfe": i * 1000 + j})
        except Exception as e:  # noqa: BLE001 - the test counts every failure
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert cache.get("same-key", config)["nfe"] in {149, 1149}


def test_the_host_changes_the_timing_key_and_the_device_changes_both(tmp_path, monkeypatch):
    """Another host with the same device: new timings (cache miss), the same samples (same quality key and values).
    Another device name: a new quality key, never served from the first device's rows."""
    model = tiny_model()
    first = run(model, tmp_path)
    here = provenance.cpu_name()
    real = provenance.machine()
    monkeypatch.setattr(bench, "machine", lambda: dict(real, cpu_count=real["cpu_count"] + 64, torch_threads=17))
    other_host = run(model, tmp_path)
    assert not other_host["cached"] and other_host["cache_key"] != first["cache_key"]
    assert other_host["quality_key"] == first["quality_key"] and other_host["class_accuracy"] == first["class_accuracy"]
    monkeypatch.undo()
    monkeypatch.setattr(provenance, "cpu_name", lambda: "Another CPU")
    other_device = run(model, tmp_path)
    assert not other_device["cached"] and other_device["quality_key"] != first["quality_key"]
    assert other_device["device_name"] == "Another CPU" and first["device_name"] == here
    assert first["device_kind"] == "cpu" and first["dtype"] == "float32"
