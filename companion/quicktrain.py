"""Training in seconds: a small denoiser of the 8x8 digits, trained inside a notebook (the training chapter).

The bundled models take an hour of CPU each; a reader cannot watch that. Here the data are scikit-learn's digits
at their native 8x8 (64 numbers per image) and the network is a residual MLP of about 0.24 M parameters, so one
optimisation step at batch 128 takes a few milliseconds on two CPU cores and digits appear within seconds. The
levers of efficient training are switches of one :class:`TrainConfig`:

- ``prediction``: what the network outputs, ``"epsilon"`` (the noise), ``"sample"`` (x0) or ``"v_prediction"``
  (v = alpha eps - sigma x0). Every choice is trained with the mean squared error of its own target; the samplers
  always see eps (:class:`companion.models.DiffusionModel` converts).
- ``weighting``: ``"uniform"`` (each target's plain MSE) or ``"min_snr"`` (Hang et al., arXiv 2303.09556): the
  per-timestep loss weighted so that, expressed as an x0 error, its weight is ``min(SNR(t), gamma)``. Written in
  each target's own space that is ``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma)`` for x0 and
  ``min(SNR, gamma) / (SNR + 1)`` for v (:func:`loss_weight`).
- ``ema``: the decay of the exponential moving average of the weights the run keeps beside the raw weights
  (:class:`TrainingRun` samples from either).

Samples are judged exactly like every other digits model: upsampled bilinearly to 16x16 (how the 16-pixel data
set is made from the same 8x8 digits) and scored in the bundled feature network's space (:func:`judge`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import data, metrics
from .metrics import Measurement
from .models import DiffusionModel
from .sampling import sample
from .schedules import PARAMETERISATIONS, TRAIN_SCHEDULE, alphas_cumprod, training_target  # noqa: F401 (re-exported)
from .train import optimise

WEIGHTINGS = ("uniform", "min_snr")
SIZE = 8           # the digits' native resolution: what the tiny network models
JUDGE_SIZE = 16    # the resolution the feature network (and every other digits model) is judged at
NUM_CLASSES = 10


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the tiny digits denoiser. ``steps`` optimisation steps of ``batch`` images."""

    prediction: str = "epsilon"
    weighting: str = "uniform"
    gamma: float = 5.0          # min-SNR's clip (the paper's default)
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    width: int = 128
    blocks: int = 3
    class_dropout: float = 0.1  # share of labels replaced by the null class: classifier-free guidance works
    seed: int = 0

    def __post_init__(self):
        if self.prediction not in PARAMETERISATIONS:
            raise ValueError(f"prediction={self.prediction!r} is not valid; choose one of {', '.join(PARAMETERISATIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is not valid; choose one of {', '.join(WEIGHTINGS)}")
        for name in ("steps", "batch", "width", "blocks", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, lo, hi in (("lr", 0.0, 1.0), ("ema", 0.0, 1.0), ("class_dropout", 0.0, 1.0)):
            v = getattr(self, name)
            if not lo <= float(v) < hi or (name == "lr" and v == 0):
                raise ValueError(f"{name} must lie in {'(' if name == 'lr' else '['}{lo:g}, {hi:g}), got {v!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")

    def label(self) -> str:
        """A short name for tables and legends, e.g. ``"v, min-SNR"``."""
        short = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[self.prediction]
        return short + (f", min-SNR-{self.gamma:g}" if self.weighting == "min_snr" else "")


class TinyDenoiser(nn.Module):
    """A residual MLP over the 64 pixels with sinusoidal time and learned class embeddings.

    Called like a diffusers UNet (``net(x_t, t, class_labels=...)``) and returning the prediction tensor, so a
    :class:`companion.models.DiffusionModel` wraps it and every registry sampler runs on it. Label
    ``num_classes`` is the null class of classifier-free guidance.
    """

    def __init__(self, width: int = 128, blocks: int = 3, num_classes: int = NUM_CLASSES, size: int = SIZE):
        super().__init__()
        self.size = size
        d = size * size
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(16) / 16), persistent=False)
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width)
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
            for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))
        self.null_class = num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(b)  # a shared scalar t, or one per sample
        angles = t.to(x.dtype)[:, None] * self.freqs.to(x.dtype)[None]
        if class_labels is None:
            class_labels = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
        h = self.inp(x.flatten(1)) + self.time(torch.cat([angles.sin(), angles.cos()], 1)) + self.label(class_labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(b, 1, self.size, self.size)


def loss_weight(snr: torch.Tensor, prediction: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight of the MSE of ``prediction``'s target at signal-to-noise ratio ``snr``.

    ``"uniform"``: 1 for every target (each target's plain MSE; as x0 errors these weigh SNR, 1 and SNR + 1 for
    eps, x0 and v). ``"min_snr"``: the weight that makes the x0-error weight ``min(SNR, gamma)`` for every target.
    """
    if prediction not in PARAMETERISATIONS:
        raise ValueError(f"prediction={prediction!r} is not valid; choose one of {', '.join(PARAMETERISATIONS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not valid; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction]


@dataclass
class TrainingRun:
    """A finished (or running) training run: the raw network, its EMA copy, the loss per step and the time."""

    config: TrainConfig
    net: TinyDenoiser
    ema: TinyDenoiser
    losses: list[float]
    seconds: float = 0.0
    steps_done: int = 0

    def model(self, *, use_ema: bool = True) -> DiffusionModel:
        """The run's network (EMA weights by default) as a diffusion model every sampler accepts."""
        cfg = self.config
        net = self.ema if use_ema else self.net
        card = {"recipe": "quicktrain", "config": {"data": "digits", "size": SIZE, **asdict(cfg)},
                "training_steps": self.steps_done, "training_seconds": round(self.seconds, 2)}
        name = f"tiny-digits ({cfg.label()}, {'EMA' if use_ema else 'raw'} weights, {self.steps_done} steps)"
        return DiffusionModel(net, TRAIN_SCHEDULE, name=name, sample_shape=(1, SIZE, SIZE), num_classes=NUM_CLASSES,
                              prediction=cfg.prediction, card=card)


def train(config: TrainConfig = TrainConfig(), *, callback: Callable[[TrainingRun], None] | None = None,
          every: int = 250) -> TrainingRun:
    """Train the tiny denoiser on the 8x8 training digits as ``config`` says; return the :class:`TrainingRun`.

    ``callback(run)`` is called every ``every`` steps and at the end (a live loss curve or sample grid; it runs on
    the training thread, so it should be quick). Deterministic for a given config and thread count.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (steps between callbacks), got {every!r}")
    x, y = data.digits(SIZE, "train")
    abar_table = alphas_cumprod(TRAIN_SCHEDULE).float()
    torch.manual_seed(config.seed)  # network initialisation
    net = TinyDenoiser(config.width, config.blocks).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    run = TrainingRun(config, net, ema, [])
    start = time.perf_counter()
    for step in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch,), generator=g)
        x0, labels = x[idx], y[idx]
        drop = torch.rand(config.batch, generator=g) < config.class_dropout
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        t = torch.randint(0, len(abar_table), (config.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        abar = abar_table[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        target = training_target(config.prediction, x0, eps, abar)
        per_sample = (net(x_t, t, labels) - target).pow(2).flatten(1).mean(1)
        weight = loss_weight(abar_table[t] / (1 - abar_table[t]), config.prediction, config.weighting, config.gamma)
        loss = (weight * per_sample).mean()
        optimise(net, ema, opt, loss, step, lr=config.lr, warmup=config.warmup, ema_decay=config.ema,
                 where=f"tiny digits ({config.label()})")
        run.losses.append(float(loss.detach()))
        run.steps_done = step + 1
        run.seconds = time.perf_counter() - start
        if callback is not None and (run.steps_done % every == 0 or run.steps_done == config.steps):
            callback(run)
    net.eval()
    return run


def upsample(images: torch.Tensor) -> torch.Tensor:
    """8x8 images in [-1, 1] -> 16x16 the way the 16-pixel digits are made from the same 8x8 originals
    (bilinear, then clamped to the data range)."""
    if images.shape[-2:] != (SIZE, SIZE):
        raise ValueError(f"expected {SIZE}x{SIZE} images, got {tuple(images.shape[-2:])}")
    return F.interpolate(images, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)


def draw(model: DiffusionModel, n: int = 500, *, sampler: str = "ddim", steps: int = 20, guidance: float | None = None,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples, classes balanced (0..9 repeated), by ``sampler`` with trailing spacing: (8x8 images, labels)."""
    labels = torch.arange(NUM_CLASSES).repeat(math.ceil(n / NUM_CLASSES))[:n]
    res = sample(model, sampler, steps, spacing="trailing", batch=n, class_labels=labels, guidance=guidance, seed=seed)
    return res.images, labels


def judge(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> dict[str, Measurement]:
    """Class accuracy (the feature network's classifier reads the class each sample was drawn for) and the
    bias-corrected FD to the training digits, both with 95 % intervals, of 8x8 samples judged at 16x16."""
    return metrics.evaluate_images(upsample(images), labels, metrics=("fd", "class_accuracy"), seed=seed)


def judge_real(n: int | None = None) -> dict[str, Measurement]:
    """The same judgement of held-out *real* 8x8 digits (the test split): what the judge gives the data itself.
    ``n`` limits the sample size (the first ``n`` test digits), e.g. to the size the generated sets use."""
    x, y = data.digits(SIZE, "test")
    if n is not None:
        if n > len(y):
            raise ValueError(f"n={n} is more than the {len(y)} held-out digits")
        x, y = x[:n], y[:n]
    return judge(x, y)


def variants(base: TrainConfig, **choices) -> list[TrainConfig]:
    """Configs that differ from ``base`` in one field at a time: ``variants(base, prediction=PARAMETERISATIONS)``."""
    out = []
    for name, values in choices.items():
        if name not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"{name!r} is not a TrainConfig field; valid: {', '.join(TrainConfig.__dataclass_fields__)}")
        out.extend(replace(base, **{name: v}) for v in values)
    return out


def preview(run: TrainingRun, n: int = 100, *, steps: int = 10, seed: int = 0) -> tuple[torch.Tensor, Measurement]:
    """A quick look during training: ``n`` samples of the run's EMA network (DDIM, ``steps`` steps, classes
    balanced) and their class accuracy. Cheap enough (a fraction of a second) to call every few hundred steps."""
    model = run.model()
    images, labels = draw(model, n, steps=steps, seed=seed)
    return images, metrics.class_accuracy(upsample(images), labels, n_boot=100)


def by_class(images: torch.Tensor, labels: torch.Tensor, per_class: int = 2) -> torch.Tensor:
    """``per_class`` images of each class, as rows 0..9 (the first of each class, then the second, ...): a grid of
    ``nrow=10`` shows one class per column."""
    picks = []
    for k in range(per_class):
        for c in range(NUM_CLASSES):
            idx = (labels == c).nonzero().flatten()
            if len(idx) <= k:
                raise ValueError(f"class {c} has {len(idx)} image(s); {per_class} per class were asked for")
            picks.append(int(idx[k]))
    return images[picks]
