"""Small classifier networks: the noise-aware classifier used by classifier guidance.

:class:`NoisyClassifier` is called as ``clf(x_t, t) -> logits (B, num_classes)`` on images noised with the
training schedule of the diffusion models (:data:`companion.schedules.TRAIN_SCHEDULE`) at timestep ``t``.
Its weights are stored in safetensors with a JSON config and a card of kind ``"noisy-classifier"``;
``companion.models.load(name)`` returns it (:data:`companion.models.KINDS` maps the kind to
:meth:`NoisyClassifier.from_folder`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import assets
from .errors import ModelError

NOISY_CLASSIFIER_KIND = "noisy-classifier"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class _Block(nn.Module):
    """conv -> GroupNorm -> timestep shift -> SiLU, twice, with a residual path."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)) + self.t_proj(temb)[:, :, None, None])
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class NoisyClassifier(nn.Module):
    """A small timestep-conditioned CNN: p(y | x_t, t) for classifier guidance.

    ``channels`` are the widths of the stages; each stage but the last halves the resolution.
    """

    kind = NOISY_CLASSIFIER_KIND

    def __init__(self, in_channels: int = 1, image_size: int = 16, num_classes: int = 10, channels=(32, 64, 64),
                 t_dim: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           channels=list(channels), t_dim=t_dim, num_train_timesteps=num_train_timesteps)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, c = [], channels[0]
        for width in channels:
            blocks.append(_Block(c, width, t_dim))
            c = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, num_classes)
        self.card: dict = {}
        self.name = "unnamed"

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config["in_channels"], self.config["image_size"], self.config["image_size"])

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"{self.name}: expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.t_mlp(timestep_embedding(t, self.config["t_dim"]))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(h.mean(dim=(2, 3)))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path, card: dict | None = None) -> dict:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        merged = {**self.card, **(card or {}), "kind": self.kind, "name": self.name, "net_config": self.config}
        merged.pop("files", None)
        self.card = assets.write_card(folder, merged)
        return self.card

    @classmethod
    def from_folder(cls, folder: str | Path, *, verify: bool = True) -> "NoisyClassifier":
        folder = Path(folder)
        card = assets.verify(folder) if verify else assets.read_card(folder)
        if card.get("kind") != cls.kind:
            raise ModelError(f"{folder} holds a {card.get('kind')!r} asset, not a {cls.kind}")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelError(f"missing {weights}; restore it with `git checkout -- {weights}` or retrain it")
        net = cls(**json.loads((folder / "config.json").read_text()))
        try:
            net.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise ModelError(f"{weights} does not match {folder / 'config.json'}: {e}") from e
        net.card = card
        net.name = card.get("name", folder.name)
        return net.eval()

