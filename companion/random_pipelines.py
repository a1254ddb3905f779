"""Text-to-image pipelines with random weights, built from configs: no download, the shapes of the real ones.

The cost of a forward pass does not depend on the weights' values, so a pipeline built from a published config
times like the published model; ``size="tiny"`` builds an SD-shaped pipeline small enough for a CPU, which the
real-models chapter drives when no GPU or network is there (its images are noise: it shows the anatomy of a
text-to-image call — prompt encoding, the loop, the latent decoder — not pictures). The CLIP tokenizer is a
letter tokenizer written locally (:func:`companion.pipelines.letter_tokenizer`).
"""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch

from .models import load
from .pipelines import letter_tokenizer

KINDS = ("sd15", "sdxl", "sd3")
SIZES = ("tiny", "full")
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

# --------------------------------------------------------------------------------------------- configurations
# Key numbers of the published configs (unet/config.json, text_encoder*/config.json, vae/config.json).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
              hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
                 hidden_act="gelu")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
FULL = {
    "sd15": dict(  # runwayml/stable-diffusion-v1-5: 860M-parameter UNet, 512 px
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(SD_VAE, scaling_factor=0.18215), guidance=7.5, sampler="euler"),
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0: 2.6B-parameter UNet, 1024 px
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True), guidance=5.0, sampler="euler"),
    "sd3": dict(  # stabilityai/stable-diffusion-3-medium-diffusers: 2B-parameter MMDiT, 1024 px
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        vae=dict(SD_VAE, sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False), guidance=7.0, sampler="euler"),
}
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
TINY = dict(
    unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=32, attention_head_dim=8),
    vae=dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             latent_channels=4, norm_num_groups=4, sample_size=32), guidance=7.5, sampler="euler")


def tokenizer(folder: str | Path):
    """The letter tokenizer every random pipeline uses, written to ``folder``."""
    return letter_tokenizer(folder, model_max_length=77)


def clip(cfg: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # the hub/test extra

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=49408, max_position_embeddings=77, **cfg)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build(kind: str, size: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, tok=None,
          latent_size: int | None = None) -> "diffusers.DiffusionPipeline":
    """A pipeline of ``kind`` (sd15, sdxl, sd3) with random weights (seed 0), built on ``device`` in ``dtype``;
    ``tok``: its tokenizer (default: a letter tokenizer in a temporary folder); ``latent_size``: the default latent
    side instead of the published one (the images are 8 times larger; e.g. 32 for SD-1.5 at 256 px on a CPU)."""
    if kind not in KINDS or size not in SIZES:
        raise ValueError(f"random pipeline {kind!r} at size {size!r}: valid kinds {', '.join(KINDS)}, sizes {', '.join(SIZES)}")
    if size == "tiny" and kind != "sd15":
        raise ValueError(f"size 'tiny' builds an SD-shaped pipeline only (sd15), not {kind!r}")
    if tok is None:  # the tokenizer holds its vocabulary in memory once read, so its folder goes at once
        import tempfile

        with tempfile.TemporaryDirectory(prefix="companion-tokenizer-") as folder:
            tok = tokenizer(folder)
    device = torch.device(device)
    cfg = TINY if size == "tiny" else FULL[kind]
    if latent_size is not None:
        net = "transformer" if "transformer" in cfg else "unet"
        cfg = dict(cfg, **{net: dict(cfg[net], sample_size=int(latent_size))})
    torch.manual_seed(0)
    with torch.device(device):  # the networks are initialised where they run (an SDXL UNet in float32 is 10 GB)
        vae = diffusers.AutoencoderKL(**cfg["vae"])
        if kind == "sd15":
            nets = dict(unet=diffusers.UNet2DConditionModel(**cfg["unet"]),
                        text_encoder=clip(TINY_CLIP if size == "tiny" else CLIP_L, False))
        elif kind == "sdxl":
            nets = dict(unet=diffusers.UNet2DConditionModel(**cfg["unet"]), text_encoder=clip(CLIP_L, False),
                        text_encoder_2=clip(CLIP_BIGG, True))
        else:
            nets = dict(transformer=diffusers.SD3Transformer2DModel(**cfg["transformer"]), text_encoder=clip(CLIP_L, True),
                        text_encoder_2=clip(CLIP_BIGG, True))
    if kind == "sd15":  # schedulers keep their tables on the CPU, as loaded pipelines do
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, tokenizer=tok, scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, **SCALED_LINEAR), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False, **nets)
    elif kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, tokenizer=tok, tokenizer_2=tok, image_encoder=None, feature_extractor=None,
                                                   scheduler=diffusers.EulerDiscreteScheduler(**SCALED_LINEAR), **nets)
    else:
        pipe = diffusers.StableDiffusion3Pipeline(vae=vae, tokenizer=tok, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
                                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), **nets)
    if dtype != torch.float32:  # built in float32; cast only when asked
        pipe.to(dtype=dtype)
    if getattr(pipe.vae.config, "force_upcast", False) and dtype == torch.float16:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(folder: str | Path) -> Path:
    """The tiny SD-shaped random pipeline saved to ``folder`` (safetensors), loadable by :func:`companion.load`.
    diffusers' progress bars and transformers' notices (a CLIP image processor without torchvision) are quiet while
    it is written."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging  # the hub/test extra

    folder = Path(folder)
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        build("sd15", "tiny", tok=tokenizer(folder / "_tokenizer")).save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity(before)
    return folder


def load_tiny():
    """The tiny SD-shaped random pipeline as :func:`companion.load` gives it, through a temporary folder that is removed
    once the weights are in memory (a chapter run leaves nothing behind)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="companion-tiny-sd-") as folder:
        return load(save_tiny(Path(folder) / "tiny-sd"))
