"""Every training recipe of the bundled models, as data: ``companion train NAME``.

A :class:`Recipe` is a name, a description, the task that trains it, a config (data, network, optimisation), a
default number of steps and seed, the recipes it needs first, and the quality measurement
(:mod:`companion.quality`) recorded in the model's card. The task is a :class:`companion.train.Task` subclass,
run by the shared training loop (:func:`companion.train.run`: EMA, resumable checkpoints), or
:class:`companion.features.FeatureNet`, whose short classifier training is
:func:`companion.features.train_feature_net`.

:data:`RECIPES` lists every recipe in one table: the diffusion models, autoencoder and noise-aware
classifier, the model-design variants (:mod:`companion.design`), the distilled students
(:mod:`companion.distill`) and the feature networks the metrics measure in (:mod:`companion.features`).
:data:`GROUPS` names sequences run by one command. The tables are built here from the task modules, which
know nothing of them, and are read-only: importing a module never adds or changes a recipe.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from . import assets, distill, flows, quality, train
from .design import DESIGN_MODELS, DESIGN_VARIANTS
from .features import FeatureNet, train_feature_net
from .models import load
from .train import AutoencoderTask, DiffusionTask, FlowTask, LatentTask, NoisyClassifierTask, SRTask


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    task: type  # a companion.train.Task subclass, or companion.features.FeatureNet
    config: dict
    steps: int
    seed: int = 0
    depends_on: tuple[str, ...] = ()
    quality: Callable | None = None  # quality(model, progress) -> dict, recorded in the card after training


def unet_config(sample_size, in_ch, out_ch, channels, layers=1, attn=(False, False, True), num_classes=None,
                mid_attn=True) -> dict:
    """A diffusers ``UNet2DModel`` config: ``channels`` per level, ``attn`` says which levels have self-attention."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    cfg = dict(sample_size=sample_size, in_channels=in_ch, out_channels=out_ch, block_out_channels=list(channels),
               layers_per_block=layers, down_block_types=list(down), up_block_types=list(up), norm_num_groups=8)
    if not mid_attn:
        cfg["add_attention"] = False  # the middle block without its self-attention layer
    if num_classes is not None:
        cfg["num_class_embeds"] = num_classes + 1  # label num_classes = "no class"
    return cfg


# ---------------------------------------------------------------------------------------------------------
# the diffusion models, their autoencoder and the noise-aware classifier
# ---------------------------------------------------------------------------------------------------------
_BASE = [
    Recipe(
        "digits-cond",
        "class-conditional pixel UNet on 16x16 digits, class dropout for classifier-free guidance",
        DiffusionTask,
        dict(data="digits", size=16, num_classes=10, class_dropout=0.12, batch=64, lr=5e-4, ema=0.999, warmup=100,
             unet=unet_config(16, 1, 1, (32, 64, 64), num_classes=10)),
        steps=4500, seed=0, quality=quality.digits_cond,
    ),
    Recipe(
        "digits-noisy-clf",
        "noise-aware digits classifier clf(x_t, t) for classifier guidance (16x16, linear schedule)",
        NoisyClassifierTask,
        dict(data="digits", size=16, batch=128, lr=2e-3, ema=0.99, warmup=50,
             net=dict(in_channels=1, image_size=16, num_classes=10, channels=[32, 64, 64], t_dim=64)),
        steps=600, seed=0, quality=quality.noisy_classifier,
    ),
    Recipe(
        "shapes-ae",
        "AutoencoderKL for 32x32 shapes, f=4: 3x32x32 -> 4x8x8 latents (12x fewer numbers)",
        AutoencoderTask,
        dict(data="shapes", size=32, batch=16, lr=1e-3, ema=0.99, warmup=50, kl_weight=1e-6,
             vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64],
                      down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                      layers_per_block=1, norm_num_groups=16, sample_size=32)),
        steps=900, seed=0, quality=quality.autoencoder,
    ),
    Recipe(
        "shapes-latent",
        "latent UNet on standardised shapes-ae latents (4x8x8); decode gives 32x32 images",
        LatentTask,
        dict(data="shapes", size=32, autoencoder="shapes-ae", batch=64, lr=1e-3, ema=0.999, warmup=100, hflip=True,
             high_t={"fraction": 0.5, "min": 400}, latent_scale=4,
             unet=unet_config(8, 4, 4, (32, 64, 64), layers=1, attn=(False, False, True))),
        steps=20000, seed=0, depends_on=("shapes-ae",), quality=quality.shapes_samples,
    ),
    Recipe(
        "shapes-pixel",
        "pixel-space UNet on 32x32 shapes (v-prediction): the baseline shapes-latent is compared with",
        DiffusionTask,
        dict(data="shapes", size=32, batch=16, lr=1e-3, ema=0.999, warmup=100, hflip=True,
             prediction="v_prediction", high_t={"fraction": 0.5, "min": 400},
             unet=unet_config(32, 3, 3, (32, 64, 64), layers=1, attn=(False, False, True))),
        steps=20000, seed=0, quality=quality.shapes_samples,
    ),
    Recipe(
        "shapes-base16",
        "low-resolution base UNet on 16x16 shapes (2x2 average-pooled 32x32 images, v-prediction): stage 1 of the cascade",
        DiffusionTask,
        dict(data="shapes", size=16, batch=32, lr=1e-3, ema=0.999, warmup=100, hflip=True,
             prediction="v_prediction", high_t={"fraction": 0.5, "min": 400},
             unet=unet_config(16, 3, 3, (32, 64, 64), layers=1, attn=(False, False, True))),
        steps=3000, seed=0, quality=quality.shapes_samples,
    ),
    Recipe(
        "shapes-sr32",
        "super-resolution stage 16->32 on shapes: UNet on [x_t, bilinear-upsampled low-res] (6 channels, v-prediction)",
        SRTask,
        dict(data="shapes", size=32, low_size=16, batch=16, lr=5e-4, ema=0.999, warmup=100, hflip=True, cond_noise=0.05,
             prediction="v_prediction", unet=unet_config(32, 6, 3, (32, 64, 64), layers=1, attn=(False, False, False))),
        steps=3000, seed=0, quality=quality.super_resolution,
    ),
]

# ---------------------------------------------------------------------------------------------------------
# model design (chapter 04b): the variants of companion.design, at an equal budget
# ---------------------------------------------------------------------------------------------------------
# Same data, seed, batch, schedule and number of steps as each other, so quality and cost differences come from
# the architecture. They predict v and see the noisiest timesteps more often (as the pixel shapes models do):
# trained for eps, the base layout still put 23 % of its DDIM-20 pixels out of range after 1200 steps
# (digits-cond needed 4500 steps for that).
DESIGN_STEPS = 1200


def _design_recipes(base: Recipe) -> list[Recipe]:
    out = []
    for (key, (what, arch)), name in zip(DESIGN_VARIANTS.items(), DESIGN_MODELS):
        out.append(Recipe(
            name, f"model-design variant of digits-cond ({what}); {DESIGN_STEPS} steps like every design variant",
            DiffusionTask,
            dict(base.config, unet=unet_config(16, 1, 1, num_classes=10, **arch), weights_dtype="float16",
                 prediction="v_prediction", high_t={"fraction": 0.5, "min": 400}),
            steps=DESIGN_STEPS, seed=0,
            # the panels' default guidance only (one third of digits-cond's measuring time)
            quality=functools.partial(quality.digits_cond, guidances=(2.0,)),
        ))
    return out


# ---------------------------------------------------------------------------------------------------------
# rectified flow (companion.flows): digits-cond's data, network, optimisation and number of steps, the linear path
# ---------------------------------------------------------------------------------------------------------
def _flow_recipe(base: Recipe) -> Recipe:
    return Recipe(
        "digits-flow",
        "class-conditional rectified-flow UNet on 16x16 digits (linear path, velocity target noise - x0); "
        f"digits-cond's network and training budget ({base.steps} steps)",
        # stored in float16 like the design variants: the bundled assets stay under their 60 MB budget
        FlowTask, dict(base.config, weights_dtype="float16"), steps=base.steps, seed=base.seed,
        quality=flows.digits_flow_quality,
    )


# ---------------------------------------------------------------------------------------------------------
# distilled students (companion.distill)
# ---------------------------------------------------------------------------------------------------------
GD_GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)  # the guidance scales a guidance-distilled student is trained for


def _student_recipes() -> list[Recipe]:
    common = dict(data="digits", size=16, class_dropout=0.1, batch=64, lr=2e-4, ema=0.99, warmup=20)
    out = []
    teacher = "digits-cond"
    for n in distill.PD_STAGES:
        out.append(Recipe(
            distill.pd_name(n),
            f"progressive distillation stage: {n}-step Euler student of {teacher} at {2 * n} steps",
            distill.ProgressiveStage, dict(common, teacher=teacher, student_steps=n), steps=300, seed=0,
            depends_on=(teacher,), quality=quality.student))
        teacher = distill.pd_name(n)
    out.append(Recipe(
        "digits-cd", "consistency distillation of digits-cond: 1-4 step LCM sampling", distill.ConsistencyDistillation,
        dict(common, teacher="digits-cond", student_steps=1, target_ema=0.95), steps=2000, seed=0,
        depends_on=("digits-cond",), quality=quality.student))
    out.append(Recipe(
        "digits-gd", "guidance distillation of digits-cond: one network call per step does what classifier-free guidance "
        "does in two, for guidance scales 1, 1.5, ..., 4", distill.GuidanceDistillation,
        dict(common, teacher="digits-cond", class_dropout=0.0, student_steps=50, guidance_grid=list(GD_GRID),
             default_guidance=2.0), steps=1500, seed=0, depends_on=("digits-cond",), quality=quality.digits_cond))  # measured as its teacher is: the scale goes into the network
    # reflow fine-tunes the flow teacher with the teacher's own class dropout, so guidance keeps working on it
    out.append(Recipe(
        "digits-reflow", "reflow (2-rectified flow) of digits-flow on 4096 of its own (noise, sample) pairs: "
        "1-4 step FlowMatch Euler", distill.Reflow,
        dict(common, teacher="digits-flow", class_dropout=0.12, student_steps=1, pairs=4096,
             teacher_steps=distill.REFLOW_TEACHER_STEPS), steps=1500, seed=0,
        depends_on=("digits-flow",), quality=quality.student))
    return out


# ---------------------------------------------------------------------------------------------------------
# feature networks of the metrics (companion.features); their cards record their own test accuracy
# ---------------------------------------------------------------------------------------------------------
_FEATURES = [
    Recipe(
        "features-digits", "feature network of the digits metrics: a small CNN classifier on 16x16 digits",
        FeatureNet,
        dict(data="digits", size=16, batch=128, lr=2e-3, shift=1,
             net=dict(in_channels=1, image_size=16, num_classes=10, widths=(32, 64, 64), feature_dim=64)),
        steps=600, seed=0,
    ),
    Recipe(
        "features-shapes", "feature network of the shapes metrics: a small CNN classifier on 32x32 shapes",
        FeatureNet,
        dict(data="shapes", size=32, batch=128, lr=2e-3, shift=1,
             net=dict(in_channels=3, image_size=32, num_classes=None, widths=(32, 64, 128), feature_dim=64)),
        steps=800, seed=0,
    ),
    # The held-out judge of unconditional shapes samples (companion.quality.shapes_judge), not a metric space: one
    # stride-2 layer more than features-shapes, so a unit sees a whole large shape (corners tell a square from a
    # circle), and trained on all eight symmetries of the square, which do not change a shape's kind.
    Recipe(
        "judge-shapes", "held-out judge of shapes samples: a deeper CNN classifier of the large shape on 32x32 shapes",
        FeatureNet,
        dict(data="shapes", size=32, batch=64, lr=2e-3, shift=2, symmetries=True, role="judge",
             net=dict(in_channels=3, image_size=32, num_classes=None, widths=(32, 64, 128, 128), feature_dim=64)),
        steps=2000, seed=0,
    ),
]

RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {r.name: r for r in [*_BASE, *_design_recipes(_BASE[0]), _flow_recipe(_BASE[0]), *_student_recipes(), *_FEATURES]})

# Recipe groups: one command that runs several recipes in order.
GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "digits-pd": tuple(distill.pd_name(n) for n in distill.PD_STAGES),  # every progressive stage, each resumable
    "digits-design": tuple(DESIGN_MODELS),
})


def all_recipes() -> dict[str, Recipe]:
    """Every recipe by name (a copy of :data:`RECIPES`)."""
    return dict(RECIPES)


def recipe(name: str) -> Recipe:
    """The recipe ``name``; ``KeyError`` naming the valid recipes otherwise."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------------------
# running recipes
# ---------------------------------------------------------------------------------------------------------
def run_recipe(name: str, *, steps: int | None = None, out: str | Path | None = None, resume: bool = False,
               seed: int | None = None, progress: bool = True, config: dict | None = None,
               measure: bool = True, threads: int | None = None, install: bool = False, keep: bool = True) -> Path:
    """Train recipe ``name`` and write the model (card included) to ``out`` (default ``runs/<name>``; with
    ``install`` the bundled ``assets/models/<name>``, which is refused otherwise). ``keep``: move an existing
    checkpoint or output aside (``*.previous-<time>``) instead of overwriting it.

    ``steps``/``seed`` override the recipe's defaults; ``config`` overrides top-level config entries (e.g. a
    tiny network for tests); ``resume`` continues from ``<out>.checkpoint/``. ``measure`` runs the recipe's
    quality measurement and records it in the card. ``threads`` is the number of CPU threads torch
    uses (default :data:`companion.train.TRAIN_THREADS`). Returns the output folder.
    """
    rec = recipe(name)
    steps = rec.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    seed = rec.seed if seed is None else int(seed)
    cfg = dict(rec.config, **(config or {}))
    out = Path(out) if out is not None else train.default_out(name, install=install)
    train.check_out(out, install=install)
    with train.threads(threads):
        if rec.task is FeatureNet:  # the feature networks' own short loop: no EMA, no checkpoints
            if resume:
                raise ValueError(f"{name} trains in one go (no checkpoints to resume from); run it without --resume")
            if keep and not install:
                train.keep_previous(out)
            train_feature_net(rec.name, cfg, out, steps=steps, seed=seed, progress=progress)
        else:
            train.run(rec, cfg, steps=steps, seed=seed, out=out, resume=resume, progress=progress, install=install, keep=keep)
        if measure and rec.quality is not None:
            measure_quality(out, rec.name, progress=progress, threads=torch.get_num_threads())
    return out


def run_group(group: str, *, out_dir: str | Path | None = None, config: dict | None = None, **kwargs) -> list[Path]:
    """Run the recipes of ``group`` in order (e.g. ``digits-pd``: every progressive-distillation stage).

    With ``out_dir`` each member goes to ``out_dir/NAME`` and a member whose recipe names the previous
    member as its teacher learns from that output instead of the bundled one. Other keyword arguments go
    to :func:`run_recipe` for every member (``steps`` is per member). A finished member is trained again
    unless ``resume=True`` finds its checkpoint complete.
    """
    if group not in GROUPS:
        raise KeyError(f"unknown recipe group {group!r}; valid: {', '.join(GROUPS)}")
    outs: list[Path] = []
    if out_dir is None and not kwargs.get("install"):
        out_dir = train.runs_dir()  # members learn from the stage trained just before them, not the bundled one
    for name in GROUPS[group]:
        cfg = dict(config or {})
        out = None
        if out_dir is not None:
            out = Path(out_dir) / name
            teacher = RECIPES[name].config.get("teacher")
            if outs and teacher == outs[-1].name:
                cfg["teacher"] = str(outs[-1])
        outs.append(run_recipe(name, out=out, config=cfg, **kwargs))
    return outs


def measure_quality(folder: str | Path, recipe_name: str | None = None, *, progress: bool = False,
                    threads: int | None = None) -> dict:
    """Measure a trained model's quality with its recipe's measurement and record it in its card."""
    folder = Path(folder)
    card = assets.verify(folder)
    name = recipe_name or card.get("recipe")
    measured = {n: r.quality for n, r in RECIPES.items() if r.quality is not None}
    if name not in measured:
        raise KeyError(f"no quality measurement for {name!r}; valid: {', '.join(measured)}")
    with train.threads(threads):
        t0 = time.perf_counter()
        result = measured[name](load(folder, device="cpu"), progress)
    result["measure_seconds"] = round(time.perf_counter() - t0, 1)
    card = dict(card, quality=result)
    card.pop("files", None)
    return assets.write_card(folder, card)
