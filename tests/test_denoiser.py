"""The one guided network call: conditioning, guidance, counting, the wrap seam and the finite check."""
from __future__ import annotations

import time

import pytest
import torch

from companion import sde
from companion.denoiser import Conditioning, Denoiser
from companion.errors import SamplingError
from companion.partial import sample_from
from companion.sampling import sample


def test_conditioning_passes_only_what_is_set():
    assert Conditioning().kwargs() == {}
    y = torch.tensor([0, 1])
    kw = Conditioning(class_labels=y, extra={"added_cond_kwargs": 1}).kwargs()
    assert set(kw) == {"class_labels", "added_cond_kwargs"} and kw["class_labels"] is y


def test_conditioning_pairs_every_input_with_its_null_for_guidance():
    y, img = torch.tensor([0, 2]), torch.ones(2, 1, 4, 4)
    text, null = torch.ones(2, 3, 8), torch.zeros(1, 3, 8)
    both = Conditioning(class_labels=y, image=img, text=text, null_text=null, extra={"e": torch.ones(2, 5), "k": "x"}).with_null(7)
    assert both.class_labels.tolist() == [0, 2, 7, 7]
    assert both.image.shape[0] == 4 and both.extra["e"].shape == (4, 5) and both.extra["k"] == "x"
    assert torch.equal(both.text[:2], text) and torch.equal(both.text[2:], null.expand(2, 3, 8))
    with pytest.raises(SamplingError, match="null_text"):
        Conditioning(text=text).with_null(None)
    with pytest.raises(SamplingError, match="null class"):
        Conditioning(class_labels=y).with_null(None)


def test_guided_call_is_the_cfg_combination_and_counts_two(tiny_model):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    d = Denoiser(tiny_model, Conditioning(class_labels=y), guidance=3.0)
    with torch.no_grad():
        got = d(x, 500)
        ec = tiny_model.predict_noise(x, 500, class_labels=y)
        eu = tiny_model.predict_noise(x, 500, class_labels=torch.full_like(y, tiny_model.null_class))
    torch.testing.assert_close(got, eu + 3.0 * (ec - eu), rtol=1e-5, atol=1e-5)
    assert d.nfe == 2 and d.network_s > 0
    plain = Denoiser(tiny_model, Conditioning(class_labels=y))
    with torch.no_grad():
        plain(x, 500)
        plain(x, 400)
    assert plain.nfe == 2


def test_unconditional_network_gets_no_labels_but_classifier_does():
    calls = []

    class Uncond(torch.nn.Module):
        conditional, num_classes, name = False, None, "u"
        scheduler_config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}

        def predict_noise(self, x, t, **kw):
            calls.append(kw)
            return torch.zeros_like(x)

    clf_labels = []

    def clf(x, t):
        clf_labels.append(True)
        return torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)

    d = Denoiser(Uncond(), Conditioning(class_labels=torch.tensor([0, 1])), classifier=clf, classifier_scale=2.0)
    eps = d(torch.ones(2, 1, 2, 2), 500)
    assert calls == [{}] and clf_labels and d.classifier_evals == 1 and d.nfe == 1
    assert eps[0].mean() < 0 < eps[1].mean()  # steered towards class 0 (larger sum) and class 1 (smaller sum)


@pytest.mark.parametrize("run", ["sample", "sample_guided", "partial", "sde"])
def test_wrap_sees_every_network_call_of_every_sampling_path(tiny_model, run):
    seen = []

    def wrap(network):
        def counted(x, t, **kw):
            seen.append(x.shape[0])
            return network(x, t, **kw)
        return counted

    if run == "sample":
        res = sample(tiny_model, "heun", 4, batch=2, wrap=wrap)
    elif run == "sample_guided":
        res = sample(tiny_model, "dpmpp_2m", 4, batch=2, guidance=2.0, wrap=wrap)
    elif run == "partial":
        res = sample_from(tiny_model, torch.zeros(2, 1, 8, 8), 400, "ddim", 3, wrap=wrap)
    else:
        res = sde.sample_sde(tiny_model, "predictor_corrector", 4, batch=2, wrap=wrap)
    per_call = 2 if run == "sample_guided" else 1
    assert len(seen) * per_call == res.record.nfe
    assert set(seen) == {2 * per_call}


def test_a_wrapped_network_changes_the_result(tiny_model):
    base = sample(tiny_model, "ddim", 3, batch=2)
    halved = sample(tiny_model, "ddim", 3, batch=2, wrap=lambda net: (lambda x, t, **kw: 0.5 * net(x, t, **kw)))
    assert not torch.allclose(base.samples, halved.samples)


def test_check_finite_names_the_run():
    Denoiser.check_finite(torch.zeros(2), "ddim")
    with pytest.raises(SamplingError, match=r"ddim: non-finite values \(NaN/inf\) after step 3"):
        Denoiser.check_finite(torch.tensor([0.0, float("nan")]), "ddim", "after step 3")


def test_sample_takes_its_initial_noise_and_refuses_a_wrong_shape(tiny_model):
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    res = sample(tiny_model, "ddim", 3, batch=2, x_T=x_T, seed=123)
    assert torch.equal(res.x_T, x_T)
    with pytest.raises(SamplingError, match=r"x_T must have shape \(2, 1, 8, 8\)"):
        sample(tiny_model, "ddim", 3, batch=2, x_T=torch.zeros(3, 1, 8, 8))


# ------------------------------------------------------------------------------ cache-sized network calls
def test_network_slices_split_large_cpu_batches_near_equally_and_leave_accelerators_alone():
    from companion.device import network_slices

    parts = network_slices(256, 3 * 32 * 32, torch.device("cpu"), limit=2 ** 16)
    sizes = [p.stop - p.start for p in parts]
    assert sum(sizes) == 256 and max(sizes) * 3072 <= 2 ** 16 and max(sizes) - min(sizes) <= 1
    assert parts[0].start == 0 and all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert network_slices(16, 3072, torch.device("cpu"), limit=2 ** 16) == [slice(0, 16)]
    assert network_slices(256, 3072, torch.device("meta"), limit=2 ** 16) == [slice(0, 256)]
    assert len(network_slices(3, 10 ** 6, torch.device("cpu"), limit=2 ** 16)) == 3  # one sample per call at least


def test_sliced_network_gives_each_sample_what_a_whole_batch_gives(tiny_unet):
    from companion.denoiser import sliced
    from companion.models import DiffusionModel

    model = DiffusionModel(tiny_unet(num_class_embeds=11), sample_shape=(1, 8, 8), num_classes=10)
    x, t = torch.randn(10, 1, 8, 8), torch.arange(10) * 90
    labels = torch.arange(10)
    calls = []

    def network(x, t, **kw):
        calls.append(len(x))
        return model.predict_noise(x, t, **kw)

    whole = model.predict_noise(x, t, class_labels=labels)
    out = sliced(network, limit=3 * 64)(x, t, class_labels=labels)
    assert calls == [3, 2, 3, 2] or sorted(calls) == [2, 2, 3, 3]
    assert torch.allclose(out, whole, atol=1e-6)
    calls.clear()
    sliced(network, limit=3 * 64)(x, 500, class_labels=labels)  # a scalar t is shared by every slice
    assert len(calls) == 4
    calls.clear()
    passthrough = sliced(lambda x, t, **kw: calls.append(len(x)) or x, limit=64)
    passthrough(x, t, added_cond={"time_ids": torch.zeros(10, 6)})  # a keyword dictionary: not sliceable, one call
    assert calls == [10]


def test_sampling_in_slices_gives_the_images_of_one_call_per_step(tiny_unet, monkeypatch):
    from companion import device
    from companion.models import DiffusionModel
    from companion.sampling import sample

    model = DiffusionModel(tiny_unet(num_class_embeds=11), sample_shape=(1, 8, 8), num_classes=10)
    labels = torch.arange(40) % 10
    monkeypatch.setattr(device, "CPU_CALL_ELEMENTS", 10 ** 12)
    whole = sample(model, "dpmpp_2m", 5, seed=0, batch=40, class_labels=labels, guidance=2.0).images
    monkeypatch.setattr(device, "CPU_CALL_ELEMENTS", 7 * 64)
    parts = sample(model, "dpmpp_2m", 5, seed=0, batch=40, class_labels=labels, guidance=2.0).images
    # a random network's images reach ~300: judged relative to their scale (float32 rounding, amplified over 5 steps)
    assert float((parts - whole).abs().max()) <= 1e-5 * float(whole.abs().max()), float((parts - whole).abs().max())


# ------------------------------------------------------------------------------ device-event timing, deferred checks
class _ClockEvent:
    """Stands in for torch.cuda.Event(enable_timing=True) on a CPU: record() reads the clock, elapsed_time is in ms."""

    made = 0

    def __init__(self):
        _ClockEvent.made += 1
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end):
        return 1000.0 * (end.at - self.at)


def test_event_timed_calls_are_read_once_after_one_sync(tiny_model):
    """With device events every loop call is timed without a sync per call; the times are read once (one sync)
    when asked for, and add up as the per-call host timing does."""
    from companion.denoiser import Conditioning

    syncs = []
    events = Denoiser(tiny_model, Conditioning(), sync=lambda: syncs.append(1), events=_ClockEvent)
    host = Denoiser(tiny_model, Conditioning(), sync=lambda: None)
    x = torch.randn(2, 1, 8, 8)
    for t in (900, 500, 100):
        torch.testing.assert_close(events(x, t), host(x, t))
    assert syncs == [] and _ClockEvent.made >= 6  # nothing synchronised while the loop ran
    assert len(events.call_s) == 3 and syncs == [1]  # read once
    assert events.network_s == pytest.approx(sum(events.call_s)) and syncs == [1]
    events.account(0.5, "decode")
    assert events.network_s == pytest.approx(sum(events.call_s) + 0.5)
    assert all(0 < s < 10 for s in events.call_s)
    rec = events.record(sampler="ddim", steps=3, wall_s=1.0, step_s=[0.1] * 3, scheduler_class="DDIMScheduler",
                        scheduler_config={}, seed=0, batch=2, spacing="trailing", stochastic=False)
    assert rec.network_step_s == events.call_s and rec.overhead_s == pytest.approx(1.0 - rec.network_s)


def test_deferred_finiteness_check_still_names_the_first_bad_step(tiny_model):
    from companion.denoiser import Conditioning
    from companion.samplers import build_scheduler
    from companion.sampling import scheduler_loop

    calls = []

    def nan_from_third(network):
        def wrapped(x, t, **kw):
            calls.append(t)
            eps = network(x, t, **kw)
            return eps * float("nan") if len(calls) >= 3 else eps
        return wrapped

    for defer in (False, True):
        calls.clear()
        sched = build_scheduler("ddim", tiny_model.scheduler_config)
        sched.set_timesteps(6)
        d = Denoiser(tiny_model, Conditioning()).wrap(nan_from_third)
        with pytest.raises(SamplingError, match=r"ddim: non-finite values \(NaN/inf\) after step 2 of 6"):
            scheduler_loop(sched, d, torch.randn(2, 1, 8, 8), what="ddim", defer_check=defer)
        # checked per step, the loop stops at the bad step; deferred, it runs to the end and reads the flags once
        assert len(calls) == (6 if defer else 3)
