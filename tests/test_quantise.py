"""int8 quantisation of a bundled UNet: what each mode quantises, how close it stays, where it is refused."""
import pytest
import torch

from companion import load, sample
from companion.caching import DeepCache
from companion.errors import SpeedOptionError
from companion.oracle import toy_mixture
from companion.quantise import (Int8WeightConv2d, int8_per_channel, layer_errors, predictions, probe_inputs, quantisable_layers,
                                quantise, relative_error, weight_bytes)
from companion.speed import accelerate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load("digits-cond")


@pytest.fixture(scope="module")
def probes(digits):
    return probe_inputs(digits, steps=6, batch=4, every=3)


def test_per_channel_int8_round_trip_is_within_half_a_step():
    w = torch.randn(8, 3, 3, 3) * torch.logspace(-3, 1, 8)[:, None, None, None]  # channels of very different size
    q, scale = int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (8, 1, 1, 1)
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-12).all()  # per channel: small channels keep their precision


def test_int8_weight_layer_matches_its_float_layer():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    x = torch.randn(2, 4, 9, 9)
    q = Int8WeightConv2d(conv)
    ref = conv(x)
    with torch.no_grad():
        assert (q(x) - ref).abs().max() < 0.02 * ref.abs().max()
        assert not torch.equal(q(x), ref)  # it really computes with the rounded weights
    with pytest.raises(SpeedOptionError, match="reflect"):
        Int8WeightConv2d(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_each_mode_quantises_what_it_says_and_stays_close(digits, probes):
    ref = predictions(digits, probes)
    errors = {}
    for mode in ("int8-weight", "int8-dynamic", "int8-static"):
        q = quantise(digits, mode, calibration_steps=4, calibration_batch=8)
        info = q.quantisation
        assert info["mode"] == mode and q.name == f"digits-cond+{mode}" and q.sha256 != digits.sha256
        errors[mode] = relative_error(ref, q, probes)
        assert 0 < errors[mode] < 0.2, (mode, errors[mode])
        if mode == "int8-dynamic":  # PyTorch's dynamic quantisation covers nn.Linear only: a few % of this UNet's FLOPs
            assert info["layers"] < info["of_layers"] and info["flops_share"] < 0.1
        else:
            assert info["layers"] == info["of_layers"] and info["flops_share"] > 0.99
    assert errors["int8-static"] > errors["int8-weight"]  # quantised activations cost more than quantised weights
    assert all(type(m).__name__ != "Int8WeightConv2d" for m in digits.unet.modules())  # the original is untouched
    assert weight_bytes(quantise(digits, "int8-weight").unet) < 0.3 * weight_bytes(digits.unet)


def test_a_quantised_model_samples_with_speed_options_and_the_cache(digits):
    q = quantise(digits, "int8-weight")
    kw = dict(sampler="ddim", steps=4, seed=0, batch=2, class_labels=torch.tensor([1, 2]))
    base = sample(digits, **kw).samples
    for run in (sample(q, **kw), sample(accelerate(q, {"precision": "bf16", "channels_last": True}), **kw),
                sample(q, wrap=DeepCache(q, 2), **kw)):
        assert torch.isfinite(run.samples).all()
        assert (run.samples - base).pow(2).mean().sqrt() < 0.3 * base.pow(2).mean().sqrt()


def test_layer_errors_measure_each_layer_alone(digits, probes):
    names = quantisable_layers(digits.unet, "int8-weight")
    some = names[::8]  # every 8th layer, from the input convolution to the output end: the test stays cheap
    rows = layer_errors(digits, "int8-weight", probes=probes, layers=some)
    assert [r["layer"] for r in rows] == some
    assert all(r["rel_error"] > 0 and 0 < r["flops_share"] < 1 for r in rows)
    whole = relative_error(digits, quantise(digits, "int8-weight"), probes)
    assert max(r["rel_error"] for r in rows) < whole  # one layer alone moves the output less than all of them
    q = quantise(digits, "int8-weight")
    assert layer_errors(digits, "int8-weight", probes=probes, layers=some, quantised=q) == rows  # the same layers, reused
    with pytest.raises(SpeedOptionError, match="quantised= must be a copy of this model with every layer in 'int8-static'"):
        layer_errors(digits, "int8-static", probes=probes, layers=some, quantised=q)
    with pytest.raises(SpeedOptionError, match="not quantised by 'int8-dynamic'"):
        layer_errors(digits, "int8-dynamic", probes=probes, layers=["conv_in"])


def test_refused_with_the_reason(digits):
    with pytest.raises(SpeedOptionError, match="unknown quantisation mode 'int4'.*int8-weight, int8-dynamic, int8-static"):
        quantise(digits, "int4")
    with pytest.raises(SpeedOptionError, match="no network to quantise"):
        quantise(toy_mixture(), "int8-weight")
    with pytest.raises(SpeedOptionError, match="quantise the plain model"):
        quantise(accelerate(digits, {"precision": "bf16"}), "int8-weight")
    with pytest.raises(SpeedOptionError, match="already quantised"):
        quantise(quantise(digits, "int8-weight"), "int8-weight")
    with pytest.raises(SpeedOptionError, match="cannot be quantised with 'int8-dynamic'"):
        quantise(digits, "int8-dynamic", layers=["conv_in"])
    from companion.quantise import check_mode

    with pytest.raises(SpeedOptionError, match="CPU only.*use 'int8-weight'"):
        check_mode("int8-static", "cuda")


def test_panel_control_quantises_once_and_refuses_unknown_modes(digits):
    from companion.widgets import SamplingSetup, quant_control

    assert quant_control().options == ("none", "int8-weight", "int8-dynamic", "int8-static")
    with pytest.raises(ValueError, match="'int4' is not offered"):
        quant_control("int4")
    setup = SamplingSetup(digits)
    m1, kw = setup.sample_kwargs({"quant": "int8-weight", "speed": "bf16", "sampler": "ddim", "steps": 3, "batch": 2})
    m2, _ = setup.sample_kwargs({"quant": "int8-weight", "speed": "bf16", "sampler": "ddim", "steps": 3, "batch": 2})
    assert m1 is m2 and m1.base.quantisation["mode"] == "int8-weight" and m1.options.precision == "bf16"
    plain, _ = setup.sample_kwargs({"quant": "none", "sampler": "ddim", "steps": 3, "batch": 2})
    assert plain is digits


def test_the_panel_measures_a_quantised_copy_against_its_float_model(digits):
    from companion.provenance import model_fingerprint
    from companion.widgets import ImageDistance

    q = quantise(digits, "int8-static", calibration_steps=3, calibration_batch=4)
    assert q.original is digits and "original" not in dict(q.named_children())
    state = q.state_dict()
    assert all(torch.is_tensor(v) and not v.is_quantized for v in state.values())  # hashable like any model
    assert model_fingerprint(q) != model_fingerprint(digits)
    r = sample(q, "ddim", 4, seed=0, batch=2, class_labels=torch.tensor([1, 2]))
    d = ImageDistance(reference_steps=8)
    ref = d.reference_images(accelerate(q, {"precision": "bf16"}), r)
    own = sample(digits, "unipc", 8, x_T=r.x_T, batch=2, class_labels=torch.tensor([1, 2])).images
    assert torch.allclose(ref, own, atol=1e-5)  # the reference is the float model's converged solution
