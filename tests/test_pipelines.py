"""Text-to-image pipelines behind ``load``: tiny random pipelines built from configs, saved as safetensors, loaded
back through ``companion.models.load`` and sampled by the registry's samplers. Offline, CPU, no pretrained weights.

The components follow diffusers' own pipeline tests (``get_dummy_components``), smaller still; the CLIP tokenizer is
written here (a 26-letter vocabulary) instead of being downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="text encoders need transformers (the test extra installs it)")

import diffusers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from companion import bench, pipelines, samplers  # noqa: E402
from companion.errors import ModelError, SamplerError, SamplingError  # noqa: E402
from companion.models import DiffusionModel, feature_space_for, load  # noqa: E402
from companion.provenance import model_fingerprint  # noqa: E402
from companion.denoiser import Conditioning, Denoiser  # noqa: E402
from companion.sampling import sample, scheduler_loop  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat", "a red dog"]


# ------------------------------------------------------------------------------------------------ tiny components
def tokenizer(folder: Path):
    return pipelines.letter_tokenizer(folder, model_max_length=8)


def clip(projection: bool = False):
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=24,
                         num_attention_heads=2, num_hidden_layers=2, vocab_size=64, max_position_embeddings=8, projection_dim=16)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(**kw):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                                   sample_size=32, **kw)


def unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **{"cross_attention_dim": 16, "attention_head_dim": 4, **kw})


def scaled_linear(klass, **kw):
    return klass(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


def sd_pipe(tok, prediction="epsilon"):
    return diffusers.StableDiffusionPipeline(
        unet=unet(), vae=vae(), text_encoder=clip(), tokenizer=tok, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
        scheduler=scaled_linear(diffusers.PNDMScheduler, skip_prk_steps=True, steps_offset=1, prediction_type=prediction))


def sdxl_pipe(tok):
    net = unet(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32)
    return diffusers.StableDiffusionXLPipeline(
        unet=net, vae=vae(), text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(True), tokenizer_2=tok,
        image_encoder=None, feature_extractor=None,
        scheduler=scaled_linear(diffusers.EulerDiscreteScheduler, steps_offset=1, timestep_spacing="trailing"))


def lcm_pipe(tok):
    return diffusers.LatentConsistencyModelPipeline(
        unet=unet(time_cond_proj_dim=8), vae=vae(), text_encoder=clip(), tokenizer=tok, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        scheduler=scaled_linear(diffusers.LCMScheduler))


def sd3_pipe(tok):
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    return diffusers.StableDiffusion3Pipeline(
        transformer=net, vae=vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip(True), tokenizer=tok, text_encoder_2=clip(True), tokenizer_2=tok, text_encoder_3=None,
        tokenizer_3=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def ldm_pipe():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    torch.manual_seed(1)
    vq = diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=16,
                           norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    return diffusers.LDMPipeline(vqvae=vq, unet=net, scheduler=diffusers.DDIMScheduler())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every tiny pipeline saved with save_pretrained(safe_serialization=True): name -> folder."""
    root = tmp_path_factory.mktemp("pipelines")
    tok = tokenizer(root / "vocab")
    built = {"sd": sd_pipe(tok), "sd_v": sd_pipe(tok, "v_prediction"), "sdxl": sdxl_pipe(tok), "lcm": lcm_pipe(tok),
             "sd3": sd3_pipe(tok), "ldm": ldm_pipe()}
    for name, pipe in built.items():
        pipe.save_pretrained(root / name, safe_serialization=True)
    return {name: root / name for name in built}


@pytest.fixture(scope="module")
def models(folders):
    return {name: load(folder, device="cpu") for name, folder in folders.items()}


def expected_nfe(sampler: str, steps: int, guided: bool) -> int:
    return samplers.get(sampler).expected_nfe(steps) * (2 if guided else 1)


# ------------------------------------------------------------------------------------------------ what is downloaded
def test_allow_patterns_takes_the_needed_components_one_variant_and_safetensors_only(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": [None, None]}))
    index = pipelines.read_model_index(tmp_path)
    files = ["model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.bin",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "scheduler/scheduler_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
             "feature_extractor/preprocessor_config.json"]
    plain = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors"]
    assert pipelines.allow_patterns(index, files) == plain
    fp16 = pipelines.allow_patterns(index, files, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16 and "unet/diffusion_pytorch_model.safetensors" not in fp16
    assert "text_encoder/model.safetensors" in fp16  # no fp16 file there: the plain weights, as diffusers falls back
    sharded = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "unet/diffusion_pytorch_model-00001-of-00002.safetensors"]
    got = pipelines.allow_patterns({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"]}, sharded, "fp16")
    assert got == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                   "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                   "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    pickled = [f for f in files if not (f.startswith("text_encoder/") and f.endswith(".safetensors"))]
    with pytest.raises(ModelError, match=r"component 'text_encoder' has only pickle weights \(text_encoder/model.bin\).*safetensors only"):
        pipelines.allow_patterns(index, pickled)
    assert pipelines.allow_patterns(None, ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                                           "scheduler_config.json", "unet/config.json"]) == \
        ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]


# ------------------------------------------------------------------------------------------------ loading
def test_pipelines_load_through_the_one_loader_with_the_model_interface(models, folders):
    m = models["sd"]
    assert type(m).__name__ == "PipelineModel" and m.kind == "pipeline" and m.is_latent and m.text_conditional
    assert m.sample_shape == (4, 16, 16) and m.image_shape == (3, 32, 32) and m.device == torch.device("cpu")
    assert m.name == "sd" and len(m.sha256) == 64 and not m.conditional and m.num_classes is None
    assert models["sdxl"].sample_shape == (4, 16, 16) and models["sd3"].prediction == "flow"
    assert models["sd_v"].prediction == "v_prediction" and models["sd_v"].scheduler_config["prediction_type"] == "epsilon"
    again = load(folders["sd"])
    assert again.sha256 == m.sha256 and model_fingerprint(again) == model_fingerprint(m)
    assert models["sdxl"].sha256 != m.sha256 and model_fingerprint(models["sdxl"]) != model_fingerprint(m)
    with pytest.raises(ModelError, match="text-conditioned: it has no null class"):
        m.null_class


def test_the_tiny_random_pipeline_loads_in_memory_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    import tempfile

    from companion.random_pipelines import load_tiny, save_tiny

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where every temporary folder of the build goes
    m = load_tiny()
    assert list(scratch.iterdir()) == []  # its folder (and the tokenizer's) are gone; the model works without them
    kept = load(save_tiny(tmp_path / "tiny-sd"))
    assert m.name == kept.name == "tiny-sd" and m.sha256 == kept.sha256 and model_fingerprint(m) == model_fingerprint(kept)
    run = sample(m, "ddim", 2, prompt="a cat", batch=1, seed=0)
    assert run.images.shape == (1, *m.image_shape) and torch.isfinite(run.images).all()


def test_ldm_folder_is_a_latent_model_decoded_by_its_vq_autoencoder(models, folders):
    m = models["ldm"]
    assert isinstance(m, DiffusionModel) and m.is_latent and type(m.vae).__name__ == "VQModel"
    assert m.sample_shape == (3, 8, 8) and m.image_shape == (3, 16, 16)
    res = sample(m, "ddim", 3, batch=2)
    assert res.images.shape == (2, 3, 16, 16) and res.samples.shape == (2, 3, 8, 8) and torch.isfinite(res.images).all()
    vq = diffusers.VQModel.from_pretrained(folders["ldm"] / "vqvae")
    with torch.no_grad():  # LDMPipeline: latents / scaling_factor, then the VQ decoder (which quantises)
        torch.testing.assert_close(res.images, vq.decode(res.samples / vq.config.scaling_factor).sample, atol=1e-5, rtol=1e-5)
    assert res.record.decode_s > 0


def test_an_unsupported_pipeline_class_is_refused_by_name(tmp_path, folders):
    import shutil

    folder = tmp_path / "inpaint"
    shutil.copytree(folders["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionInpaintPipeline")))
    with pytest.raises(ModelError, match=r"'StableDiffusionInpaintPipeline', which the companion does not sample from; "
                                         r"supported pipeline classes: StableDiffusionPipeline, .*StableDiffusion3Pipeline.*LDMPipeline"):
        load(folder)


def test_torch_dtype_and_variant_pass_through(tmp_path):
    pipe = sd_pipe(tokenizer(tmp_path / "vocab"))
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(2.0)  # the fp16 variant differs, so which files were read shows
    pipe.to(torch.float16).save_pretrained(tmp_path / "sd", safe_serialization=True, variant="fp16")
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    plain = load(tmp_path / "sd")
    half = load(tmp_path / "sd", torch_dtype=torch.float16, variant="fp16")
    bf16 = load(tmp_path / "sd", torch_dtype="bf16")
    assert plain.dtype == torch.float32 and half.dtype == torch.float16 and bf16.dtype == torch.bfloat16
    assert half.card["variant"] == "fp16" and half.card["torch_dtype"] == "float16"
    torch.testing.assert_close(half.unet.conv_in.weight.float(), 2 * plain.unet.conv_in.weight, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(bf16.unet.conv_in.weight.float(), plain.unet.conv_in.weight, atol=1e-2, rtol=1e-2)
    res = sample(bf16, "euler", 2, batch=1, prompt="a cat")
    assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()
    assert len({plain.sha256, half.sha256, bf16.sha256}) == 3
    with pytest.raises(ModelError, match=r"torch_dtype='fp8' is not supported; valid: torch.float32, torch.float16, torch.bfloat16"):
        load(tmp_path / "sd", torch_dtype="fp8")
    with pytest.raises(ModelError, match=r"could not load StableDiffusionPipeline from .* \(variant 'bf16'\)"):
        load(tmp_path / "sd", variant="bf16")


def test_a_dtype_the_device_cannot_run_is_refused_with_the_fix(folders, monkeypatch):
    real = torch.nn.functional.scaled_dot_product_attention

    def no_half(q, *args, **kwargs):
        if q.dtype == torch.float16:
            raise RuntimeError('"baddbmm" not implemented for \'Half\'')
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_half)
    with pytest.raises(ModelError, match=r"torch_dtype=torch.float16 cannot run on cpu .*Half.*"
                                         r"use torch_dtype=torch.float32 or torch.bfloat16"):
        load(folders["sd"], torch_dtype=torch.float16)


def test_pipeline_options_are_refused_where_they_do_not_apply(folders):
    with pytest.raises(ModelError, match="torch_dtype apply to text-to-image pipelines.*UNet2DModel pipeline"):
        load(folders["ldm"], torch_dtype=torch.float16)
    with pytest.raises(ModelError, match="torch_dtype apply to diffusers pipelines and Hub models; 'digits-cond' is a companion asset"):
        load("digits-cond", torch_dtype=torch.float16)


def test_hub_ids_load_from_the_cache_offline_and_fail_clearly_when_absent(folders, hf_offline, monkeypatch):
    import shutil

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_offline / "hub"))  # read at import: the env var alone is late
    repo = hf_offline / "hub" / "models--someone--tiny-sd"
    commit = "0" * 40
    shutil.copytree(folders["sd"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    m = load("someone/tiny-sd", local_files_only=True)
    assert m.name == "someone/tiny-sd" and m.kind == "pipeline"
    with pytest.raises(ModelError, match=r"'someone/absent' is not in the local Hugging Face cache and local_files_only=True"):
        load("someone/absent", local_files_only=True)
    with pytest.raises(ModelError, match=r"'someone/absent' is not in the local Hugging Face cache and the Hub .* is not "
                                         r"reachable \(HF_HUB_OFFLINE is set\)"):
        load("someone/absent")


def test_hub_errors_name_their_fix():
    from huggingface_hub import errors

    def err(kind):
        return kind.__new__(kind)  # the message is ours; the exception's own fields are not read

    assert "does not exist or is private" in pipelines._hub_message("a/b", None, err(errors.RepositoryNotFoundError))
    assert "gated: accept its licence on https://huggingface.co/a/b" in pipelines._hub_message("a/b", None, err(errors.GatedRepoError))
    assert "has no revision 'v9'" in pipelines._hub_message("a/b", "v9", err(errors.RevisionNotFoundError))
    assert "no model_index.json" in pipelines._hub_message("a/b", None, err(errors.EntryNotFoundError))


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_every_compatible_sampler_runs(models, name):
    m = models[name]
    fits = pipelines.compatible_samplers(m)
    assert len(fits) == (12 if name == "sd3" else len(samplers.REGISTRY))
    for key in fits:
        steps = max(3, samplers.get(key).min_steps)
        res = sample(m, key, steps, batch=1, prompt="a cat", guidance=2.0, seed=1)
        assert res.record.nfe == expected_nfe(key, steps, guided=True), key
        assert res.images.shape == (1, *m.image_shape) and res.samples.shape == (1, *m.sample_shape), key
        assert torch.isfinite(res.images).all(), key


@pytest.mark.parametrize("name, sampler, guidance", [("sd", "ddim", 3.0), ("sd", "dpmpp_2m", None), ("sd_v", "euler", 2.0),
                                                     ("sdxl", "euler_a", 2.0), ("sd3", "euler", 3.0), ("lcm", "lcm", 4.0)])
def test_the_loop_reproduces_the_pipelines_own_call(models, name, sampler, guidance):
    """Same noise, scheduler and prompts: the companion's loop and the pipeline's __call__ give the same images."""
    m, steps, seed = models[name], 3, 5
    x_T = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    res = sample(m, sampler, steps, batch=2, prompt=PROMPTS, guidance=guidance, x_T=x_T, seed=seed)
    pipe = m.pipe
    config = dict(res.record.scheduler_config)
    if m.prediction == "v_prediction":  # the companion converts to eps; the pipeline's scheduler reads v itself
        config["prediction_type"] = "v_prediction"
    pipe.scheduler = getattr(diffusers, res.record.scheduler_class).from_config(config)
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0 if guidance is None else guidance, latents=x_T.clone(),
               output_type="pt", generator=torch.Generator().manual_seed(seed + 1)).images
    torch.testing.assert_close((res.images / 2 + 0.5).clamp(0, 1), out, atol=1e-5, rtol=1e-5)


def test_guidance_doubles_the_network_calls_and_a_negative_prompt_changes_the_image(models):
    m = models["sd"]
    plain = sample(m, "ddim", 4, batch=2, prompt="a cat")
    guided = sample(m, "ddim", 4, batch=2, prompt="a cat", guidance=3.0)
    negative = sample(m, "ddim", 4, batch=2, prompt="a cat", guidance=3.0, negative_prompt="a dog")
    assert plain.record.nfe == 4 and guided.record.nfe == 8 and guided.record.guidance == 3.0
    assert negative.record.negative_prompt == "a dog" and not torch.allclose(negative.images, guided.images)
    assert not torch.allclose(plain.images, guided.images)
    uncond = sample(m, "ddim", 4, batch=2)  # no prompt: the empty prompt, the pipeline's unconditional input
    assert uncond.record.prompt is None and not torch.allclose(uncond.images, plain.images)


def test_embedded_guidance_is_a_network_input_not_a_second_call(models):
    m = models["lcm"]
    assert m.guidance_embedded
    low = sample(m, "lcm", 2, batch=1, prompt="a cat", guidance=2.0)
    high = sample(m, "lcm", 2, batch=1, prompt="a cat", guidance=8.0)
    assert low.record.nfe == high.record.nfe == 2 and high.record.guidance_embedded and high.record.guidance == 8.0
    assert not torch.allclose(low.images, high.images)
    with pytest.raises(SamplingError, match="guidance scale as a network input.*no use for negative_prompt"):
        sample(m, "lcm", 2, batch=1, prompt="a cat", guidance=2.0, negative_prompt="a dog")


def test_a_flow_model_refuses_the_samplers_without_a_flow_form(models):
    m = models["sd3"]
    for key in ("ddim", "ddpm", "pndm", "euler_a", "lms"):
        with pytest.raises(SamplerError, match=rf"sampler '{key}' .*no flow-matching form that reaches sigma = 0; 'sd3' is a "
                                               r"flow-matching model. "
                                               r"Samplers that fit: euler, heun, dpm_solver_1"):
            sample(m, key, 3, batch=1)
    with pytest.raises(SamplerError, match=r"spacing='karras': a flow-matching model samples on its shifted sigma grid \(shift=3\)"):
        sample(m, "euler", 3, batch=1, spacing="karras")
    with pytest.raises(SamplingError, match="flow-matching model: use dtype=torch.float32"):
        sample(m, "euler", 3, batch=1, dtype=torch.float64)


def test_diffusion_only_code_refuses_a_flow_model(models):
    from companion.partial import sample_from
    from companion.reference import solve_ode
    from companion.sde import sample_sde

    m = models["sd3"]
    x = torch.randn(1, *m.sample_shape)
    for call in (lambda: sample_sde(m, "probability_flow", 3, batch=1), lambda: sample_from(m, None, None, "ddim", 3, batch=1),
                 lambda: solve_ode(m, x)):
        with pytest.raises(SamplingError, match="'sd3' is a flow-matching model.*flow sampler"):
            call()


def test_flow_samplers_integrate_the_same_ode(models):
    """Every deterministic flow sampler lands within 1% of the fine Heun solution of the same flow ODE from the same
    noise; DEIS's flow grid stops at sigma > 0, misses by more, and is therefore not offered.

    (The random network's velocity oscillates in t, so high orders show no gain at these step counts; the DPM-Solver
    family's flow grid also feeds the network integer timesteps, which floors its error near 1e-3 here.)"""
    m = models["sd3"]
    x_T = torch.randn(1, *m.sample_shape, generator=torch.Generator().manual_seed(3))
    run = lambda key, n: sample(m, key, n, batch=1, prompt="a cat", x_T=x_T).samples  # noqa: E731
    fine = run("heun", 200)
    rms = lambda x: (x - fine).pow(2).mean().sqrt().item()  # noqa: E731
    scale = fine.pow(2).mean().sqrt().item()
    for key in ("euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m_corrected", "unipc"):
        assert rms(run(key, 40)) < 0.01 * scale, key
    assert rms(run("euler", 40)) < 0.5 * rms(run("euler", 6))
    deis = samplers.get("deis")
    sched = deis.scheduler.from_config({"num_train_timesteps": 1000}, **pipelines._flow_options(deis, pipelines.flow_shift(m)))
    sched.set_timesteps(40)
    text, _ = m.text_conditioning(["a cat"], None, None)
    with torch.no_grad():
        x, _, _ = scheduler_loop(sched, Denoiser(m, Conditioning(**text)), x_T.clone())
    assert rms(x) > 0.01 * scale and "deis" not in pipelines.flow_samplers()


def test_a_prompt_needs_a_text_conditioned_model(models, tiny_unet):
    with pytest.raises(SamplingError, match=r"model 'ldm' is unconditional: it takes no prompt. Text-to-image pipelines"):
        sample(models["ldm"], "ddim", 2, batch=1, prompt="a cat")
    cond = DiffusionModel(tiny_unet(num_class_embeds=4, channels=(8, 16)), name="tiny-cond", num_classes=3)
    with pytest.raises(SamplingError, match=r"'tiny-cond' is class-conditional \(use class_labels=\): it takes no prompt"):
        sample(cond, "ddim", 2, batch=1, prompt="a cat")
    m = models["sd"]
    with pytest.raises(SamplingError, match="negative_prompt is the unconditional half of classifier-free guidance: pass guidance="):
        sample(m, "ddim", 2, batch=1, prompt="a cat", negative_prompt="a dog")
    with pytest.raises(SamplingError, match="prompt holds 2 strings but batch=3"):
        sample(m, "ddim", 2, batch=3, prompt=PROMPTS)
    with pytest.raises(SamplingError, match="speed= cannot wrap text-conditioned model 'sd'.*torch_dtype"):
        sample(m, "ddim", 2, batch=1, speed="fp32")
    with pytest.raises(ModelError, match="takes a prompt, not class labels"):
        m.predict_noise(torch.zeros(1, 4, 16, 16), 10, class_labels=torch.zeros(1, dtype=torch.long))


def test_the_pipelines_own_spacing_is_the_default(models):
    m = models["sdxl"]  # its scheduler config says trailing (the Turbo models' choice)
    assert sample(m, "euler", 1, batch=1).record.spacing == "trailing"
    assert sample(m, "ddim", 1, batch=1).record.spacing == "trailing"
    assert sample(m, "euler", 2, batch=1, spacing="karras").record.spacing == "karras"


def test_the_record_reports_the_decoder_and_the_text_encoders_apart(models):
    rec = sample(models["sdxl"], "dpmpp_2m", 4, batch=2, prompt="a cat", guidance=2.0).record
    assert rec.encode_s > 0 and rec.decode_s > 0 and len(rec.network_step_s) == len(rec.step_s) == 4
    assert all(0 < n <= s for n, s in zip(rec.network_step_s, rec.step_s))
    assert math.isclose(rec.network_s, rec.encode_s + rec.decode_s + sum(rec.network_step_s), rel_tol=1e-6)
    assert rec.prompt == "a cat" and rec.nfe == 8 and rec.overhead_s < rec.wall_s


def test_v_prediction_is_converted_to_eps(models):
    m = models["sd_v"]
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 600
    emb = m.unconditional(1)
    with torch.no_grad():
        v = m.unet(x, torch.tensor([t]), encoder_hidden_states=emb["encoder_hidden_states"]).sample
    abar = diffusers.DDPMScheduler.from_config(m.scheduler_config).alphas_cumprod[t]
    torch.testing.assert_close(m.predict_noise(x, t), (1 - abar).sqrt() * x + abar.sqrt() * v, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ LoRA
def _lora(tmp_path, pipe, name):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    net = pipe.unet
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    type(pipe).save_lora_weights(tmp_path / name, unet_lora_layers=get_peft_model_state_dict(net), safe_serialization=True)
    return net, tmp_path / name


def test_lora_is_fused_into_the_base_model(tmp_path, models, folders):
    tok = tokenizer(tmp_path / "vocab")
    adapted, folder = _lora(tmp_path, sd_pipe(tok), "lora")
    m = load(folders["sd"], lora=folder, lora_scale=1.0)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(x, torch.tensor([500]), encoder_hidden_states=m.unconditional(1)["encoder_hidden_states"]).sample
    torch.testing.assert_close(m.predict_noise(x, 500), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m.predict_noise(x, 500), models["sd"].predict_noise(x, 500))
    assert m.sha256 != models["sd"].sha256 and m.card["lora"] == str(folder)
    with pytest.raises(ModelError, match=r"could not load LoRA .* into 'sdxl' \(StableDiffusionXLPipeline\).*size mismatch.*"
                                         r"is it a LoRA for this base model\?"):
        load(folders["sdxl"], lora=folder)
    (tmp_path / "lora.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is not .safetensors; pickle checkpoints are never loaded"):
        load(folders["sd"], lora=tmp_path / "lora.bin")


def test_lora_without_peft_names_the_hub_extra(folders, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ModelError, match=r"need the peft package: pip install 'companion\[hub\]'"):
        load(folders["sd"], lora="latent-consistency/lcm-lora-sdv1-5")


# ------------------------------------------------------------------------------------------------ quality
def test_pipeline_images_are_not_scored_in_a_foreign_feature_space(models, tmp_path):
    m = models["sd"]
    with pytest.raises(ModelError, match=r"model 'sd' comes from outside the companion.*features-digits \(trained on digits, "
                                         r"1x16x16 images\); features-shapes \(trained on shapes, 3x32x32 images\).*reference_images="):
        bench.sweep(m, ["ddim"], [2], n_samples=128, metrics=("fd",), cache_dir=False, progress=False)
    with pytest.raises(ModelError, match="comes from outside the companion"):
        feature_space_for(m, "features-shapes")
    with pytest.raises(ModelError, match="ode_distance is not available for pipeline model 'sd'"):
        bench.sweep(m, ["ddim"], [2], n_samples=8, metrics=("ode_distance",), cache_dir=False, progress=False)
    timing = bench.sweep(m, ["ddim", "euler"], [2], modes=({"prompt": "a cat"},), n_samples=2, metrics=(), cache_dir=tmp_path,
                         progress=False)
    assert list(timing["nfe"]) == [2, 2] and (timing["flops_per_sample"] > 0).all()
    assert timing["mode"].iloc[0] == "prompt=a cat"


def test_clip_score_in_a_sweep_scores_each_run_against_its_own_prompt_and_keys_the_clip(models, tiny_clip, tiny_model,
                                                                                          tmp_path):
    from companion import metrics

    m, clip = models["sd"], str(tiny_clip)
    modes = ({"prompt": "a cat"}, {"prompt": "a red dog"})
    kw = dict(n_samples=4, metrics=("clip_score",), cache_dir=tmp_path, progress=False)
    df = bench.sweep(m, ["ddim"], [2], modes=modes, clip=clip, **kw)
    for row, mode in zip(df.itertuples(), modes):
        images = sample(m, sampler="ddim", steps=2, seed=0, batch=4, **mode).images
        want = metrics.clip_score(images.clamp(-1, 1), mode["prompt"], clip=clip)
        assert row.clip_score == pytest.approx(want.value, abs=1e-5)
        assert row.clip_score_low <= row.clip_score <= row.clip_score_high and row.clip_score_n == 4
        assert row.clip == clip and not row.cached
    assert df.clip_score.iloc[0] != df.clip_score.iloc[1]  # each run is scored against its own prompt
    assert bench.sweep(m, ["ddim"], [2], modes=modes, clip=clip, **kw)["cached"].all()
    # another CLIP (the same one with one weight changed in memory) is another key, never the cached row
    pair = metrics.load_clip(clip)
    with torch.no_grad():
        next(pair[0].parameters()).mul_(0.5)
    other = bench.sweep(m, ["ddim"], [2], modes=modes[:1], clip=pair, **kw)
    assert not other["cached"].any() and other.cache_key.iloc[0] != df.cache_key.iloc[0]
    with pytest.raises(ValueError, match=r"clip_score scores images against their prompt: give one in the mode.*got mode \{\}"):
        bench.sweep(m, ["ddim"], [2], clip=clip, **kw)
    with pytest.raises(ModelError, match=r"clip_score needs a text-to-image model; .* takes no prompt"):
        bench.sweep(tiny_model, ["ddim"], [2], modes=modes[:1], clip=clip, **kw)


def test_real_models_comparison_measures_each_setup_once_loaded_with_its_clip_score(folders, tiny_clip):
    from companion import metrics
    from companion.text_to_image import Setup, compare, hub_status

    calls = []

    def loader(name, **kw):
        calls.append((name, kw))
        return load(name, **kw)

    sd, lcm = str(folders["sd"]), str(folders["lcm"])
    setups = (Setup("sd ddim 3", sd, "ddim", 3, 2.0), Setup("sd dpm++ 2", sd, "dpmpp_2m", 2, 2.0),
              Setup("lcm 2", lcm, "lcm", 2, None))
    prompts, seen = ["a cat", "a red dog"], {}
    table = compare(setups, prompts, seeds=(0, 1), clip=str(tiny_clip), device="cpu", loader=loader,
                    on_row=lambda row, images: seen.setdefault(row["setup"], images))
    assert [c[0] for c in calls] == [sd, lcm]  # setups that share a model share one load
    assert list(table["nfe"]) == [6, 4, 2] and list(table["images"]) == [4, 4, 4]
    for row in table.itertuples():
        want = metrics.clip_score(seen[row.setup].clamp(-1, 1), prompts * 2, clip=str(tiny_clip))
        assert row.clip_score == pytest.approx(want.value, abs=1e-5) and row.clip_score_low <= row.clip_score <= row.clip_score_high
    assert (table["s / image"] > 0).all() and (table["encode s / image"] > 0).all() and (table["decode s / image"] > 0).all()
    assert table["speed-up vs first"].iloc[0] == 1.0
    assert table["speed-up vs first"].iloc[1] == pytest.approx(table["s / image"].iloc[0] / table["s / image"].iloc[1])
    assert table["peak GiB"].isna().all()  # a CPU has no per-run allocator peak
    # the images of a setup are the runs of its seeds, the first seed's equal to a plain sample of the same setup
    again = sample(load(sd), "ddim", 3, guidance=2.0, prompt=prompts, batch=2, seed=0).images
    assert torch.allclose(seen["sd ddim 3"][:2], again, atol=1e-5)
    with pytest.raises(ValueError, match="compare needs non-empty prompts"):
        compare(setups, ["a cat", " "], clip=str(tiny_clip))
    with pytest.raises(ValueError, match="the CLIP score needs at least 4 images: 2 prompts x 1 seeds give 2"):
        compare(setups, prompts, clip=str(tiny_clip))
    assert hub_status("cpu").startswith("no CUDA device (cpu here)")


def test_bench_command_sweeps_prompts_as_modes():
    from companion.cli import bench_modes

    assert bench_modes(None, None, None) == [{}]
    assert bench_modes(["leading", "trailing"], ["a cat", "a dog"], "blurry") == [
        {"spacing": s, "prompt": p, "negative_prompt": "blurry"} for s in ("leading", "trailing") for p in ("a cat", "a dog")]
    with pytest.raises(ValueError, match="--negative-prompt 'blurry' needs a --prompt"):
        bench_modes(None, None, "blurry")
    with pytest.raises(ValueError, match="--prompt ' ' is empty"):
        bench_modes(None, [" "], None)


def test_a_hub_lora_that_cannot_be_fetched_says_why(folders, hf_offline):
    pytest.importorskip("peft")
    with pytest.raises(ModelError, match=r"LoRA 'someone/absent-lora' is neither a local file or folder nor in the Hugging "
                                         r"Face cache, and cannot be fetched \(HF_HUB_OFFLINE is set\)"):
        load(folders["sd"], lora="someone/absent-lora")


# ------------------------------------------------------------------------------------------------ the panel with a prompt
def test_panel_with_a_prompt_drives_a_pipeline_and_shows_encode_and_decode_apart(models):
    from companion.widgets import SamplerPanel

    model = models["sd"]
    p = SamplerPanel(model, controls=("prompt", "negative_prompt", "guidance", "steps"),
                     defaults={"sampler": "euler", "steps": 2, "batch": 2, "prompt": "a cat", "guidance": 3.0},
                     quality=lambda m, r: float(r.images.abs().mean()), quality_label="mean |x|", repeats=1)
    first = p.history[-1].result.record
    assert first.prompt == "a cat" and first.negative_prompt is None and first.nfe == 4  # CFG: both halves
    assert first.encode_s > 0 and first.decode_s > 0
    assert "text encode / latent decode" in p.record.value and "a cat" in p.record.value
    p.controls["prompt"].value = "a red dog"
    assert p.wait(120)
    assert p.history[-1].result.record.prompt == "a red dog"
    assert not torch.equal(p.history[-1].result.images, p.history[-2].result.images)  # the prompt reaches the network
    p.controls["negative_prompt"].value = "blurry"
    assert p.wait(120)
    assert p.history[-1].result.record.negative_prompt == "blurry"


def test_the_panels_image_distance_on_a_pipeline_is_to_the_converged_solution_of_the_same_prompt(models):
    from companion.reference import ReferenceSolutions
    from companion.widgets import ImageDistance

    m = models["sd"]
    dist = ImageDistance(reference_steps=20, cache=ReferenceSolutions())
    run = sample(m, "dpmpp_2m", 3, batch=2, prompt="a cat", guidance=3.0, seed=4)
    ref = sample(m, "unipc", 20, batch=2, prompt="a cat", guidance=3.0, x_T=run.x_T, spacing="trailing").images
    want = float((run.images.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().sqrt())
    assert dist(m, run) == pytest.approx(want, rel=1e-5) and want > 0
    other = sample(m, "unipc", 20, batch=2, prompt="a red dog", guidance=3.0, x_T=run.x_T, spacing="trailing").images
    assert not torch.allclose(ref, other)  # so the prompt is part of the reference, not only of the run
    finer = sample(m, "dpmpp_2m", 12, batch=2, prompt="a cat", guidance=3.0, seed=4)
    assert dist(m, finer) < dist(m, run)  # more steps of the same ODE land nearer its converged solution
    with pytest.raises(ValueError, match="DOP853 reference carries no text"):
        dist.cache.get(m, run.x_T, method="dop853", prompt="a cat")


def test_a_prompt_control_on_a_model_without_text_is_refused(models):
    from companion.widgets import SamplerPanel

    with pytest.raises(ValueError, match=r"need a text-conditioned pipeline.*take\(s\) no prompt"):
        SamplerPanel(models["ldm"], controls=("prompt", "steps"), defaults={"sampler": "ddim", "steps": 2, "batch": 1})
