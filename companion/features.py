"""Bundled feature networks: the spaces every image-quality metric of the companion measures in.

Inception-v3 (the FID standard) needs a weight download and torch-fidelity, neither usable offline, so the
companion trains a small CNN classifier per data set and measures Frechet distance, KID and precision/recall
in its penultimate layer. Numbers are comparable only between runs that use the same feature network
(each :class:`~companion.metrics.Measurement` names it), never with published Inception-FID values.

A feature network is a diffusers ``ModelMixin, ConfigMixin`` class, so ``save_pretrained`` writes
safetensors + config; the folder's card (kind ``"features"``) records the recipe, seed, steps, time and
test accuracy. Load with :func:`load_feature_net` or ``companion.models.load(name)``. The recipes
(``features-digits``, ``features-shapes``: data, network, optimisation, steps, seed) are data in
:mod:`companion.recipes`, like every other bundled model's; ``companion train features-digits`` runs
:func:`train_feature_net` with one.
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tqdm.auto import tqdm

from . import assets, data
from .device import network_slices
from .errors import ModelError

KIND = "features"
METRICS, JUDGE = "metrics", "judge"  # what a feature network is for: a metric space, or a held-out judge only
ROLES = (METRICS, JUDGE)


def augmentation_text(shift: int, symmetries: bool = False) -> str:
    """How a card names a feature network's training augmentation."""
    return f"random shift +-{shift} px" + (", random quarter turns and mirroring" if symmetries else "")


class FeatureNet(ModelMixin, ConfigMixin):
    """A small CNN classifier; its penultimate activations are the feature space of the metrics.

    Input: images (B, C, H, W) in [-1, 1]; inputs of another spatial size are resized (bilinear) to
    ``image_size`` first. Output of :meth:`forward`: ``(features (B, feature_dim), logits (B, num_classes))``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 1, image_size: int = 16, num_classes: int = 10,
                 widths: tuple = (32, 64, 64), feature_dim: int = 64):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            # First block keeps the resolution; the others halve it.
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return int(self.config.feature_dim)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check shape/channels and resize to the network's own resolution."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"feature network expects images (B, {cfg.in_channels}, H, W) in [-1, 1], got shape {tuple(images.shape)}"
            )
        images = images.to(device=self.device, dtype=torch.float32)
        if images.shape[-2:] != (cfg.image_size, cfg.image_size):
            images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True)
        return images

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.prepare(images)).mean(dim=(2, 3))
        feats = self.embed(h)
        return feats, self.head(feats)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of a (possibly large) image set, in eval mode, on the CPU (float32). ``batch_size``:
        images per call (default: cache-sized slices on a CPU, :func:`companion.device.network_slices`)."""
        was_training = self.training
        self.eval()
        feats, logits = [], []
        if batch_size is None:
            size = self.config.image_size
            parts = network_slices(len(images), self.config.in_channels * size * size, self.device)
            chunks = [images[p] for p in parts]
        else:
            chunks = torch.split(images, batch_size)
        for chunk in chunks:
            f, l = self(chunk)
            feats.append(f.float().cpu())
            logits.append(l.float().cpu())
        self.train(was_training)
        return torch.cat(feats), torch.cat(logits)


# --------------------------------------------------------------------------------------------- training
def _random_symmetry(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of the square's eight symmetries (a quarter turn 0-3 times, then a mirror or not) for the whole batch:
    what a shape *is* does not change under them, so a classifier of shapes should not depend on them."""
    turns, mirror = torch.randint(0, 4, (1,), generator=g).item(), torch.randint(0, 2, (1,), generator=g).item()
    x = torch.rot90(x, turns, (2, 3))
    return x.flip(3) if mirror else x


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2,), generator=g)).tolist()
    h, w = x.shape[-2:]
    return pad[..., dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = net.extract(images)
    return float((logits.argmax(1) == labels).float().mean())


def train_feature_net(name: str, config: dict, out: str | Path | None = None, *, steps: int, seed: int = 0,
                      progress: bool = True) -> FeatureNet:
    """Train a feature network on the TRAIN split (fixed seed) and save it with its card.

    ``config`` (a recipe's, see :mod:`companion.recipes`): ``data`` (an image set of
    :func:`companion.data.images`), ``size``, ``net`` (:class:`FeatureNet` arguments; ``num_classes=None``:
    as many as the data has), ``batch``, ``lr`` and ``shift`` (random translation in pixels, so generated
    digits slightly off-centre still classify); optional ``symmetries`` (True: each batch also turned by a random
    multiple of 90 degrees and mirrored or not, for classes that do not change under it, such as shapes) and
    ``role`` (:data:`METRICS`, the default: a feature space of the metrics; :data:`JUDGE`: a held-out classifier
    only, never chosen as a metric space). ``out``: target folder (default ``assets/models/<name>``).
    Returns the trained network (eval mode). The card records recipe, seed, steps, time and test accuracy.
    """
    steps, seed = int(steps), int(seed)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch, lr, shift = config["batch"], config["lr"], config["shift"]
    symmetries, role = bool(config.get("symmetries", False)), config.get("role", METRICS)
    if role not in ROLES:
        raise ValueError(f"unknown feature-network role {role!r}; valid: {', '.join(ROLES)}")
    x_train, y_train = data.images(config["data"], config["size"], "train")
    x_test, y_test = data.images(config["data"], config["size"], "test")
    net_config = dict(config["net"])
    if net_config["num_classes"] is None:
        net_config["num_classes"] = int(y_train.max()) + 1
    torch.manual_seed(seed)
    net = FeatureNet(**net_config)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=f"train {name}", disable=not progress, leave=False):
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        xb = _random_shift(x_train[idx], shift, g)
        if symmetries:
            xb = _random_symmetry(xb, g)
        _, logits = net(xb)
        loss = F.cross_entropy(logits, y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    net.eval()
    test_acc = accuracy(net, x_test, y_test)
    folder = Path(out) if out is not None else assets.models_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder / "net", safe_serialization=True)
    assets.write_card(folder, {
        "kind": KIND, "name": name, "dataset": config["data"], "recipe": "companion.features.train_feature_net",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in net_config.items()},
        "seed": seed, "steps": steps, "batch_size": batch, "lr": lr, "augmentation": augmentation_text(shift, symmetries), "role": role,
        "train_split": "train", "n_train": len(x_train), "train_time_s": round(train_s, 2),
        "final_loss": round(float(loss.detach()), 4), "test_accuracy": round(test_acc, 4), "n_test": len(x_test),
        "torch_threads": torch.get_num_threads(),
    })
    return net


# --------------------------------------------------------------------------------------------- loading
def load_feature_folder(folder: str | Path, *, verify: bool = True) -> FeatureNet:
    folder = Path(folder)
    card = assets.verify(folder) if verify else assets.read_card(folder)
    if card.get("kind") != KIND:
        raise ModelError(f"{folder} holds a {card.get('kind')!r} asset, not a feature network")
    weights = folder / "net"
    if not any(weights.glob("*.safetensors")):
        raise ModelError(f"{weights} has no .safetensors weights (pickle checkpoints are never loaded)")
    net = FeatureNet.from_pretrained(weights, use_safetensors=True).eval()
    net.name = card.get("name", folder.name)
    net.card = card
    net.sha256 = assets.folder_sha256(folder)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@lru_cache(maxsize=8)
def load_feature_net(name: str = "features-digits") -> FeatureNet:
    """A bundled feature network by name (``features-digits``, ``features-shapes``) or asset folder path.

    Cached: every metric call shares one instance per name.
    """
    folder = assets.models_dir() / name
    if not (folder / assets.CARD).is_file():
        folder = Path(name).expanduser()
    if not (folder / assets.CARD).is_file():
        known = sorted(n for n, c in assets.manifest().items() if c.get("kind") == KIND)
        hint = "; train a feature network with `companion train NAME` (`companion train --list` names them)"
        raise ModelError(f"unknown feature network {name!r}; bundled: {', '.join(known) or '(none)'}{hint}")
    return load_feature_folder(folder)


def default_feature_net_name(image_shape) -> str:
    """The bundled feature network for images of this shape: 1 channel -> digits, 3 channels -> shapes."""
    c = int(image_shape[0])
    if c == 1:
        return "features-digits"
    if c == 3:
        return "features-shapes"
    raise ValueError(f"no bundled feature network for images with {c} channels (shape {tuple(image_shape)}); valid: 1 or 3 channels")
