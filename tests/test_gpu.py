"""The GPU path: sampling on CUDA gives the CPU's results (same seed: all noise comes from CPU generators),
every speed option runs there, peak memory is recorded, and diffusers pipeline folders load onto the GPU.

Skipped without CUDA. benchmarks/device_check.sh runs this file on a GPU machine.

Tolerances. GPU kernels sum in other orders than CPU kernels; in IEEE fp32 that moves eps by about 1e-6, as
reordering convolutions on the CPU does (channels_last vs NCHW: max |d eps| 7e-7..1.1e-6, see test_speed.py).
Through 10 steps (guidance 1.5) on the random UNet below that perturbation (channels_last on the CPU) moved the
images by a relative L2 of 3.1e-7 to 3.9e-7 (ddim, dpmpp_2m, euler_a). cuDNN may also pick Winograd/FFT
convolutions, less accurate than direct ones: FP32_REL_TOL = 2e-4 leaves room for that, while a wrong noise
stream, device or dtype moves images by O(1). With PyTorch's defaults
cuDNN convolutions use TF32 (10-bit mantissa, unit roundoff 4.9e-4): TF32_REL_TOL = 2e-2. bf16/fp16 autocast:
REDUCED_REL_TOL = 5e-2 (CPU bf16 measured 0.010 on eps).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from companion.models import DiffusionModel, load
from companion.oracle import toy_mixture
from companion.sampling import sample
from companion.speed import SpeedOptions, accelerate

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False here); run benchmarks/device_check.sh on a GPU machine")

SAMPLERS = ["ddim", "dpmpp_2m", "euler_a", "heun", "unipc", "dpmpp_2m_sde"]
FP32_REL_TOL = 2e-4
TF32_REL_TOL = 2e-2
REDUCED_REL_TOL = 5e-2
STEPS = 10


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def model(tiny_unet):
    return DiffusionModel(tiny_unet(num_class_embeds=11, size=16, channels=(32, 64, 64), attention_at=(1,)), name="tiny-gpu", num_classes=10)


@pytest.fixture
def cpu_reference():
    """Images per sampler computed on the CPU in fp32 (one model, reused by the parametrised tests)."""
    cache = {}

    def get(model, sampler, **kw):
        key = (sampler, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = sample(model, sampler, steps=STEPS, batch=8, seed=5, device="cpu", **kw).images
        return cache[key]

    return get


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gpu_matches_cpu_in_ieee_fp32(model, sampler, cpu_reference):
    ref = cpu_reference(model, sampler, guidance=1.5)
    gpu = accelerate(model, SpeedOptions(precision="fp32"), "cuda")  # fp32 = IEEE: TF32 off during the network call
    res = sample(gpu, sampler, steps=STEPS, batch=8, seed=5, guidance=1.5)
    assert res.record.device.startswith("cuda")
    assert res.images.device.type == "cpu" and res.images.dtype == torch.float32
    err = rel(res.images, ref)
    assert err < FP32_REL_TOL, f"{sampler}: GPU vs CPU relative error {err:.3g}"


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_plain_gpu_path_with_pytorch_defaults(model, sampler, cpu_reference):
    """Without speed options the model runs with PyTorch's defaults (cuDNN may use TF32 on Ampere and newer)."""
    ref = cpu_reference(model, sampler)
    res = sample(model, sampler, steps=STEPS, batch=8, seed=5, device="cuda")
    assert rel(res.images, ref) < TF32_REL_TOL


def test_oracle_on_gpu_matches_cpu():
    oracle = toy_mixture()
    ref = sample(oracle, "dpmpp_2m", steps=STEPS, batch=64, seed=1, device="cpu").images
    res = sample(oracle, "dpmpp_2m", steps=STEPS, batch=64, seed=1, device="cuda")
    assert res.record.device.startswith("cuda")
    assert (res.images - ref).abs().max().item() < 1e-5  # float64 network, float32 solver on both


OPTIONS = ["tf32", "bf16", "fp16", "fp32+channels_last", "bf16+channels_last", "fp32+classic_attention", "fp32+cuda_graphs",
           "fp16+channels_last+cuda_graphs", "bf16+compile", "fp32+compile:reduce-overhead"]


@pytest.mark.parametrize("label", OPTIONS)
def test_each_speed_option_runs_on_cuda(model, label):
    opts = SpeedOptions.from_label(label)
    if opts.precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bfloat16 support")
    if opts.compile:
        import torch._dynamo as dynamo

        dynamo.reset()
    ref = sample(accelerate(model, SpeedOptions(), "cuda"), "dpmpp_2m", steps=STEPS, batch=8, seed=2, guidance=1.5).images
    fast = accelerate(model, opts, "cuda")
    assert all(fast.applied[k] for k in ("channels_last", "compile") if getattr(opts, k))
    assert fast.applied["cuda_graphs"] == opts.uses_cuda_graphs("cuda")
    for _ in range(2):  # the second run replays recorded graphs / compiled code
        res = sample(fast, "dpmpp_2m", steps=STEPS, batch=8, seed=2, guidance=1.5)
        assert torch.isfinite(res.images).all()
        err = rel(res.images, ref)
        tol = REDUCED_REL_TOL if opts.precision in ("bf16", "fp16") else TF32_REL_TOL if opts.precision == "tf32" else FP32_REL_TOL
        assert err < tol, f"{label}: relative difference to eager fp32 {err:.3g} (tolerance {tol})"
        if opts.precision in ("bf16", "fp16"):
            assert err > 1e-5, f"{label}: identical to fp32 — autocast did not act"


def test_cuda_graphs_keep_multistep_history_intact(model):
    """Multistep solvers keep earlier network outputs: graph outputs must be copies, not the replay buffer."""
    ref = sample(accelerate(model, SpeedOptions(), "cuda"), "unipc_3", steps=STEPS, batch=8, seed=4).images
    res = sample(accelerate(model, SpeedOptions(cuda_graphs=True), "cuda"), "unipc_3", steps=STEPS, batch=8, seed=4).images
    assert rel(res, ref) < FP32_REL_TOL


def test_cuda_graphs_record_a_v_prediction_model():
    """v-predicting networks convert v to eps with alpha/sigma looked up from t: that lookup must stay on the GPU."""
    student = load("digits-cd", device="cpu")
    ref = sample(accelerate(student, SpeedOptions(), "cuda"), "euler", steps=4, batch=8, seed=3, spacing="trailing").images
    fast = accelerate(student, SpeedOptions(cuda_graphs=True), "cuda")
    assert fast.applied["cuda_graphs"]
    for _ in range(2):  # the second run replays the recorded graph
        res = sample(fast, "euler", steps=4, batch=8, seed=3, spacing="trailing").images
        assert rel(res, ref) < FP32_REL_TOL


def test_peak_memory_is_recorded(model):
    model.to("cuda")
    weights = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    small = sample(model, "ddim", steps=3, batch=4, seed=0).record
    large = sample(model, "ddim", steps=3, batch=256, seed=0).record
    assert small.peak_mem_kind == large.peak_mem_kind == "cuda_max_memory_allocated"
    assert small.peak_mem_bytes >= weights
    assert large.peak_mem_bytes > small.peak_mem_bytes + 256 * 16 * 16 * 4  # activations grow with the batch


def test_saved_pipeline_folder_loads_onto_the_gpu(tmp_path, hf_offline):
    """A diffusers pipeline folder (what load('google/ddpm-cifar10-32') caches) samples on the GPU as on the CPU."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    gpu_model = load(tmp_path / "pipe", device="cuda")
    cpu_model = load(tmp_path / "pipe", device="cpu")
    assert gpu_model.device.type == "cuda"
    fast = accelerate(gpu_model, SpeedOptions(), "cuda")
    res = sample(fast, "dpmpp_2m", steps=STEPS, batch=4, seed=0)
    ref = sample(cpu_model, "dpmpp_2m", steps=STEPS, batch=4, seed=0).images
    assert rel(res.images, ref) < FP32_REL_TOL
