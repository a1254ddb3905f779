"""DeepCache-style feature caching: exact when it should be, counted, refused where it cannot apply."""
import pytest
import torch

from companion import load, sample
from companion.caching import DeepCache, shallow_fraction, unet_forward
from companion.errors import CachingError
from companion.oracle import toy_mixture


@pytest.fixture(scope="module")
def digits():
    return load("digits-cond")


def test_split_forward_is_the_unet_and_the_shallow_branch_reuses_exactly(digits):
    x, t, y = torch.randn(3, *digits.sample_shape), torch.tensor([10, 400, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = digits.unet(x, t, class_labels=y).sample
        kept = []
        full = unet_forward(digits.unet, x, t, y, keep=kept.append)
        shallow = unet_forward(digits.unet, x, t, y, deep=kept[0])
    assert torch.equal(full, ref) and torch.equal(shallow, ref)  # same input, same deep features: the same output
    with torch.no_grad():
        other = unet_forward(digits.unet, x, t + 50, y, deep=kept[0])
    assert not torch.equal(other, ref)  # the shallow branch does see the new timestep


def test_interval_one_is_the_uncached_sampler_and_larger_intervals_skip_calls(digits):
    kw = dict(sampler="dpmpp_2m", steps=9, seed=0, batch=4, class_labels=torch.arange(4))
    base = sample(digits, **kw)
    one = DeepCache(digits, 1)
    assert torch.equal(sample(digits, wrap=one, **kw).samples, base.samples) and one.full_calls == one.calls == 9
    three = DeepCache(digits, 3)
    cached = sample(digits, wrap=three, **kw)
    assert (three.calls, three.full_calls) == (9, 3) and cached.record.nfe == base.record.nfe
    err = (cached.samples - base.samples).pow(2).mean().sqrt()
    assert 0 < err < 0.5 * base.samples.pow(2).mean().sqrt()  # an approximation, not a different sample


def test_guidance_batches_are_cached_too(digits):
    dc = DeepCache(digits, 2)
    r = sample(digits, sampler="ddim", steps=6, seed=1, batch=2, guidance=2.0, class_labels=torch.tensor([3, 4]), wrap=dc)
    assert torch.isfinite(r.samples).all() and (dc.calls, dc.full_calls) == (6, 3)


def test_shallow_fraction_is_a_proper_fraction(digits):
    f = shallow_fraction(digits)
    assert 0.05 < f < 0.9


def test_refused_where_it_cannot_apply(digits):
    with pytest.raises(CachingError, match="interval must be an int >= 1.*got 0"):
        DeepCache(digits, 0)
    with pytest.raises(CachingError, match="got 2.5"):
        DeepCache(digits, 2.5)
    with pytest.raises(CachingError, match="UNet2DModel.*no network"):
        DeepCache(toy_mixture(), 2)


def test_a_panel_offers_the_cache_interval(digits):
    from companion.widgets import SamplingSetup, cache_control

    _, kw = SamplingSetup(digits).sample_kwargs({"sampler": "ddim", "steps": 4, "batch": 2, "cache": 3})
    assert isinstance(kw["wrap"], DeepCache) and kw["wrap"].interval == 3
    _, plain = SamplingSetup(digits).sample_kwargs({"sampler": "ddim", "steps": 4, "batch": 2, "cache": 1})
    assert "wrap" not in plain
    assert cache_control(5).value == 5
    with pytest.raises(ValueError, match="cache interval 4 is not offered.*1, 2, 3, 5"):
        cache_control(4)


def test_an_instance_restarts_with_each_run_and_speed_options_are_refused(digits):
    from companion.speed import accelerate

    dc = DeepCache(digits, 2)
    for _ in range(2):
        sample(digits, sampler="ddim", steps=4, seed=0, batch=2, class_labels=torch.tensor([1, 2]), wrap=dc)
        assert (dc.calls, dc.full_calls) == (4, 2)
    with pytest.raises(CachingError, match="speed options"):
        DeepCache(accelerate(digits, {"channels_last": True}), 2)
