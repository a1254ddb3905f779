"""The reference-solution service: one cache whose key follows the weights as they are, on disk and in memory."""
from __future__ import annotations

import warnings

import pytest
import torch

from companion import oracle as O
from companion.errors import CacheWarning
from companion.provenance import model_fingerprint
from companion.reference import ReferenceDistance, ReferenceSolutions, solve_ode
from companion.sampling import sample


@pytest.fixture
def mixture():
    return O.toy_mixture((1, 2, 2), components=3)


def test_fingerprint_follows_in_place_changes(tiny_model):
    before = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) == before
    p = next(tiny_model.parameters())
    with torch.no_grad():
        p.mul_(0.5)
    halved = model_fingerprint(tiny_model)
    with torch.no_grad():
        p.mul_(2.0)
    assert halved != before
    assert model_fingerprint(tiny_model) == before  # the same values again: the same answer, the same key


def test_cache_computes_once_per_key_and_keeps_answers_apart(mixture):
    cache = ReferenceSolutions()
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = cache.get(mixture, x_T, rtol=1e-6)
    assert cache.get(mixture, x_T, rtol=1e-6) is a and cache.computed == 1
    b = cache.get(mixture, x_T, rtol=1e-8)
    cache.get(mixture, x_T + 1.0, rtol=1e-6)
    assert cache.computed == 3 and not torch.equal(a, b)
    torch.testing.assert_close(a, solve_ode(mixture, x_T, "clean", rtol=1e-6, atol=1e-6))


def test_disk_cache_survives_a_new_process_and_recovers_from_damage(mixture, tmp_path):
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    first = ReferenceSolutions(tmp_path)
    ref = first.get(mixture, x_T, rtol=1e-6)
    files = list(tmp_path.glob("ref-*.safetensors"))
    assert len(files) == 1
    second = ReferenceSolutions(tmp_path)
    torch.testing.assert_close(second.get(mixture, x_T, rtol=1e-6), ref)
    assert second.computed == 0
    files[0].write_bytes(b"not a safetensors file")
    third = ReferenceSolutions(tmp_path)
    with pytest.warns(CacheWarning, match="corrupted cache entry"):
        again = third.get(mixture, x_T, rtol=1e-6)
    assert third.computed == 1
    torch.testing.assert_close(again, ref)


def test_refuses_unknown_methods(mixture):
    with pytest.raises(ValueError, match="method='rk4' is not valid"):
        ReferenceSolutions().get(mixture, torch.zeros(1, 1, 2, 2), method="rk4")


def test_reference_distance_of_the_model_and_of_a_teacher(tiny_model):
    own = ReferenceDistance(reference_steps=30, cache=ReferenceSolutions())
    res = sample(tiny_model, "ddim", 2, batch=4)
    assert own(tiny_model, res) > 0
    assert own(tiny_model, sample(tiny_model, "euler_a", 2, batch=4)) is None  # stochastic: no ODE to follow
    teacher = ReferenceDistance(tiny_model, reference_steps=30, cache=own.cache)
    assert teacher(tiny_model, res) == pytest.approx(own(tiny_model, res))
    assert teacher(tiny_model, sample(tiny_model, "euler_a", 2, batch=4)) > 0  # students' stochastic sampling is measured
    assert own.cache.computed == 1  # one reference served all of the above
    assert "teacher" in teacher.label and "teacher" not in own.label


def test_reference_distance_sees_a_changed_model(tiny_model):
    cache = ReferenceSolutions()
    q = ReferenceDistance(reference_steps=20, cache=cache)
    res = sample(tiny_model, "ddim", 20, batch=2)
    d0 = q(tiny_model, res)
    p = next(tiny_model.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(0.1)
    try:
        d1 = q(tiny_model, res)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert cache.computed == 2 and d1 != d0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert q(tiny_model, res) == d0  # the original weights again: served from the cache
    assert cache.computed == 2
