"""`sample(...)`: from-the-paper references, seeds, guidance, model kinds, run record, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler

from companion import oracle as O
from companion import samplers as S
from companion.models import TRAIN_SCHEDULE, DiffusionModel
from companion.sampling import SamplingError, sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 shared cores, tiny nets


@pytest.fixture(scope="module")
def oracle():
    return O.toy_mixture((1, 4, 4), std=0.05)


@pytest.fixture(scope="module")
def unet_model(tiny_unet):
    return DiffusionModel(tiny_unet(), name="tiny")


@pytest.fixture(scope="module")
def cond_model(tiny_unet):
    return DiffusionModel(tiny_unet(num_class_embeds=4), name="tiny-cond", num_classes=3)


ABAR = DDPMScheduler.from_config(TRAIN_SCHEDULE).alphas_cumprod.to(torch.float64)


# --------------------------------------------------------------------------------------------- from the papers

def ddim_from_paper(model, x_T, n):
    """Song et al. (2010.02502) eq. 12 with sigma = 0, "leading" timesteps t_i = i * (1000 // n), abar_{-1} = 1."""
    step = 1000 // n
    x = x_T.to(torch.float64)
    for t in reversed(range(0, n * step, step)):
        a_t = ABAR[t]
        a_prev = ABAR[t - step] if t - step >= 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = model.predict_noise(x.float(), t).double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def dpmpp_2m_from_paper(model, x_T, n):
    """Lu et al. (2211.01095) Algorithm 2 (DPM-Solver++(2M)): first step first order, then
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}; x <- (sigma_{i+1}/sigma_i) x - alpha_{i+1} (e^{-h} - 1) D;
    the last step goes to sigma = 0 (returns the data prediction). "linspace" timesteps."""
    ts = np.linspace(0, 999, n + 1).round()[::-1][:-1].astype(int)
    alpha = [ABAR[t].sqrt() for t in ts] + [torch.tensor(1.0, dtype=torch.float64)]
    sigma = [(1 - ABAR[t]).sqrt() for t in ts] + [torch.tensor(0.0, dtype=torch.float64)]
    lam = [torch.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]
    x = x_T.to(torch.float64)
    prev_x0, prev_h = None, None
    for i, t in enumerate(ts):
        eps = model.predict_noise(x.float(), int(t)).double()
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i == n - 1:
            x = x0  # sigma_{n} = 0: the exponential-integrator step is exactly the data prediction
            break
        h = lam[i + 1] - lam[i] if i + 1 < n else None
        if prev_x0 is None:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * torch.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


@pytest.mark.parametrize("model_name", ["oracle", "unet_model"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_the_paper(request, model_name, steps):
    model = request.getfixturevalue(model_name)
    res = sample(model, "ddim", steps, batch=4, seed=1)
    ref = ddim_from_paper(model, res.x_T, steps)
    scale = max(1.0, float(ref.abs().max()))
    assert (res.samples.double() - ref).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("model_name", ["oracle", "unet_model"])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m_matches_the_paper(request, model_name, steps):
    model = request.getfixturevalue(model_name)
    res = sample(model, "dpmpp_2m", steps, batch=4, seed=1)
    ref = dpmpp_2m_from_paper(model, res.x_T, steps)
    scale = max(1.0, float(ref.abs().max()))
    assert (res.samples.double() - ref).abs().max() <= 1e-4 * scale


# --------------------------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("key", ["ddim", "dpmpp_2m", "ddpm", "euler_a", "dpmpp_2m_sde", "dpm2_a"])
def test_same_seed_same_images_other_seed_other_images(oracle, key):
    a = sample(oracle, key, 8, seed=5, batch=4).images
    b = sample(oracle, key, 8, seed=5, batch=4).images
    c = sample(oracle, key, 8, seed=6, batch=4).images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_stochastic_noise_differs_from_deterministic_path(oracle):
    det = sample(oracle, "ddim", 10, seed=2, batch=4)
    sto = sample(oracle, "ddim", 10, seed=2, batch=4, eta=1.0)
    assert torch.equal(det.x_T, sto.x_T)
    assert not det.record.stochastic and sto.record.stochastic
    assert (det.images - sto.images).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- run record and trajectory

def test_run_record(unet_model):
    res = sample(unet_model, "heun", 6, batch=3, seed=0, spacing="karras")
    r = res.record
    assert (r.sampler, r.steps, r.nfe, r.batch, r.seed, r.spacing) == ("heun", 6, 11, 3, 0, "karras")
    assert r.scheduler_class == "HeunDiscreteScheduler" and r.scheduler_config["use_karras_sigmas"] is True
    assert r.scheduler_config["beta_schedule"] == "linear" and r.scheduler_config["num_train_timesteps"] == 1000
    assert len(r.step_s) == 11 and all(s > 0 for s in r.step_s)
    assert 0 < r.network_s < r.wall_s and math.isclose(r.overhead_s, r.wall_s - r.network_s)
    assert sum(r.step_s) <= r.wall_s
    assert r.peak_mem_kind == "cpu_peak_rss_growth" and r.peak_mem_bytes >= 0
    assert r.guidance is None and r.eta is None and r.stochastic is False
    assert res.images.shape == (3, 1, 8, 8) and res.images.dtype == torch.float32
    assert set(r.to_dict()) >= {"sampler", "steps", "nfe", "wall_s", "network_s", "overhead_s", "step_s", "peak_mem_bytes",
                                "scheduler_class", "scheduler_config", "seed", "batch", "guidance", "eta", "spacing", "stochastic"}


@pytest.mark.parametrize("key", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_trajectory_holds_one_state_per_step_and_the_output(oracle, key):
    res = sample(oracle, key, 7, batch=2, return_trajectory=True)
    traj = res.trajectory
    assert len(traj) == 7 + 1
    assert traj[-1][0] == -1.0 and torch.equal(traj[-1][1], res.samples)
    ts = [t for t, _ in traj[:-1]]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 7
    # the first state is the initial noise in VP scaling
    assert torch.allclose(traj[0][1], res.x_T, rtol=1e-4)


# --------------------------------------------------------------------------------------------- guidance

def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional(cond_model):
    y = torch.tensor([0, 1, 2, 1])
    plain = sample(cond_model, "dpmpp_2m", 6, batch=4, class_labels=y)
    g1 = sample(cond_model, "dpmpp_2m", 6, batch=4, class_labels=y, guidance=1.0)
    g0 = sample(cond_model, "dpmpp_2m", 6, batch=4, class_labels=y, guidance=0.0)
    uncond = sample(cond_model, "dpmpp_2m", 6, batch=4, class_labels=torch.full((4,), 3))
    assert (plain.samples - g1.samples).abs().max() < 1e-4 * max(1, float(plain.samples.abs().max()))
    assert (uncond.samples - g0.samples).abs().max() < 1e-4 * max(1, float(uncond.samples.abs().max()))
    g3 = sample(cond_model, "dpmpp_2m", 6, batch=4, class_labels=y, guidance=3.0)
    assert (g3.samples - plain.samples).abs().max() > 1e-3
    assert plain.record.nfe == 6 and g3.record.nfe == 12


def test_cfg_defaults_to_one_label_of_each_class(cond_model):
    res = sample(cond_model, "ddim", 3, batch=5, guidance=2.0)
    assert res.class_labels.tolist() == [0, 1, 2, 0, 1]


class ComponentClassifier(torch.nn.Module):
    """The exact noise-aware classifier p(component | x_t) of the toy mixture: with scale 1 its gradient turns the
    unconditional oracle's score into the exact score of the chosen component."""

    def __init__(self, oracle):
        super().__init__()
        self.o = oracle

    def forward(self, x, t):
        o = self.o
        sigma = o.sigma_map.sigma(t.double().cpu()).reshape(-1, 1)
        a2 = 1 / (1 + sigma**2)
        var = a2 * (o.variances[None, :] + sigma**2)
        xf = x.reshape(x.shape[0], -1).double()
        sq = ((xf[:, None, :] - a2.sqrt()[:, :, None] * o.means[None]) ** 2).sum(-1)
        return (o.log_weights[None, :] - 0.5 * sq / var - 0.5 * xf.shape[1] * var.log()).to(x.dtype)


@pytest.mark.parametrize("key", list(S.REGISTRY))
def test_classifier_guidance_steers_every_sampler(oracle, key):
    target = 2
    y = torch.full((32,), target, dtype=torch.long)
    plain = sample(oracle, key, 20, batch=32, seed=4)
    steered = sample(oracle, key, 20, batch=32, seed=4, classifier=ComponentClassifier(oracle), class_labels=y)
    nearest = lambda im: torch.cdist(im.reshape(32, -1).double(), oracle.means).argmin(1)  # noqa: E731
    assert torch.isfinite(steered.images).all()
    assert (nearest(plain.images) == target).float().mean() < 0.5  # the target is one of 4 components
    assert (nearest(steered.images) == target).float().mean() >= 0.9
    assert steered.record.classifier_evals == steered.record.nfe and steered.record.classifier_scale == 1.0


# --------------------------------------------------------------------------------------------- model kinds

def test_latent_model_is_decoded_at_the_end(tiny_unet):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8).eval()
    model = DiffusionModel(tiny_unet(in_channels=2, out_channels=2, size=4), name="tiny-latent", sample_shape=(2, 4, 4),
                           image_shape=(1, 8, 8), vae=vae, latent_mean=[0.1, -0.2], latent_std=[1.5, 0.5])
    res = sample(model, "dpmpp_2m", 4, batch=2)
    assert res.samples.shape == (2, 2, 4, 4) and res.images.shape == (2, 1, 8, 8)
    assert torch.allclose(res.images, model.decode(res.samples), atol=1e-5)


def test_super_resolution_stage_uses_cond(tiny_unet):
    model = DiffusionModel(tiny_unet(in_channels=2), name="tiny-sr", sample_shape=(1, 8, 8), cond_shape=(1, 4, 4))
    lo = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    a = sample(model, "ddim", 4, batch=2, cond=lo)
    b = sample(model, "ddim", 4, batch=2, cond=-lo)
    assert a.images.shape == (2, 1, 8, 8) and (a.images - b.images).abs().max() > 1e-4
    with pytest.raises(SamplingError, match="super-resolution stage: pass cond="):
        sample(model, "ddim", 4, batch=2)


def test_progress_bar_runs(oracle):
    assert sample(oracle, "euler", 3, batch=2, progress=True).record.nfe == 3


# --------------------------------------------------------------------------------------------- bad input

def test_unknown_sampler_lists_valid_ones(oracle):
    with pytest.raises(S.SamplerError, match="unknown sampler 'k_euler'; valid samplers: ddpm, ddim"):
        sample(oracle, "k_euler", 10)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5])
def test_steps_out_of_range(oracle, steps):
    with pytest.raises(SamplingError, match=r"steps must be an int in \[1, 1000\]"):
        sample(oracle, "ddim", steps)


def test_guidance_on_an_unconditional_model(unet_model):
    with pytest.raises(SamplingError, match="guidance=3.0 needs a class-conditional model; 'tiny' is unconditional"):
        sample(unet_model, "ddim", 5, guidance=3.0)


def test_eta_on_a_sampler_without_eta(oracle):
    with pytest.raises(SamplingError, match="sampler 'euler' has no eta parameter; samplers with eta: ddim"):
        sample(oracle, "euler", 5, eta=0.5)
    with pytest.raises(SamplingError, match=r"eta must lie in \[0, 1\]"):
        sample(oracle, "ddim", 5, eta=1.5)


def test_class_labels_without_a_conditional_model_or_classifier(unet_model):
    with pytest.raises(SamplingError, match="unconditional: class_labels need classifier="):
        sample(unet_model, "ddim", 5, class_labels=torch.zeros(16, dtype=torch.long))
    with pytest.raises(SamplingError, match="classifier guidance needs class_labels="):
        sample(unet_model, "ddim", 5, classifier=torch.nn.Identity())


class NaNBelow:
    """An oracle that starts returning NaN once t drops below a threshold."""

    def __init__(self, model, t_bad):
        self.model, self.t_bad = model, t_bad

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_noise(self, x, t, **kw):
        eps = self.model.predict_noise(x, t, **kw)
        return eps * float("nan") if float(t) < self.t_bad else eps


@pytest.mark.parametrize("key", ["ddim", "heun", "dpmpp_2m"])
def test_nan_mid_run_names_the_step(oracle, key):
    with pytest.raises(SamplingError, match=r"non-finite values \(NaN/inf\) after step \d+ of \d+ \(t=\d+"):
        sample(NaNBelow(oracle, 500), key, 10, batch=2)


def test_speed_options_run_and_are_recorded():
    from diffusers import UNet2DModel

    from companion.models import DiffusionModel
    from companion.speed import SpeedOptionError

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    model = DiffusionModel(unet)
    eager = sample(model, "ddim", 3, seed=1, batch=2)
    fast = sample(model, "ddim", 3, seed=1, batch=2, speed="fp32+channels_last")
    assert eager.record.speed["label"] == "fp32" and fast.record.speed["channels_last"] is True
    assert torch.allclose(eager.samples, fast.samples, atol=1e-5)  # memory layout does not change the numbers
    if not torch.cuda.is_available():
        with pytest.raises(SpeedOptionError, match="fp16"):
            sample(model, "ddim", 3, batch=2, speed="fp16")


@pytest.mark.parametrize("sampler, spacing, steps, match", [
    ("dpmpp_2m", "leading", 500, "starts at t = 500"),
    ("unipc", "leading", 1000, "starts at t = 0"),
    ("ddim", "leading", 143, "starts at t = 852"),
    ("dpmpp_2m", "linspace", 1000, "repeats timestep"),
])
def test_grids_that_skip_the_chain_are_refused(sampler, spacing, steps, match):
    o = O.toy_mixture((1, 2, 2))
    with pytest.raises(SamplingError, match=match):
        sample(o, sampler, steps, spacing=spacing, batch=2)


def test_grids_that_sample_the_whole_chain_still_run():
    o = O.toy_mixture((1, 2, 2))
    for sampler, spacing, steps in [("dpmpp_2m", "leading", 10), ("ddim", "leading", 200), ("dpmpp_2m", "exponential", 50),
                                    ("dpmpp_2m", "trailing", 1000), ("heun", "trailing", 20), ("pndm", "leading", 20)]:
        assert torch.isfinite(sample(o, sampler, steps, spacing=spacing, batch=2).samples).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="dpm2_a", steps=2), "at least 3 steps"),
    (dict(sampler="lcm", steps=51), "at most 50 steps"),
    (dict(seed=2**64), r"seed must be an int in \[0, 2\*\*63 - 2\]"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(class_labels=torch.tensor([1.7, 2.0])), "class_labels must be integers"),
    (dict(guidance="2"), "guidance must be a number"),
])
def test_bad_input_is_refused_with_its_value(tiny_model, kwargs, match):
    kw = dict(sampler="ddim", steps=3, batch=2)
    kw.update(kwargs)
    with pytest.raises(SamplingError, match=match):
        sample(tiny_model, **kw)


def test_numpy_and_tensor_seeds_are_ints(tiny_model):
    a = sample(tiny_model, "ddim", 2, batch=2, seed=np.int64(3)).samples
    b = sample(tiny_model, "ddim", 2, batch=2, seed=torch.tensor(3)).samples
    assert torch.equal(a, b) and torch.equal(a, sample(tiny_model, "ddim", 2, batch=2, seed=3).samples)


def test_nan_from_a_latent_decoder_is_refused():
    class NaNDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = O.toy_mixture((1, 2, 2))
            self.name = "nan-decoder"

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        is_latent = True

        def decode(self, x):
            return x * float("nan")

    with pytest.raises(SamplingError, match="decoded images"):
        sample(NaNDecoder(), "ddim", 3, batch=2)
