"""Token merging for the self-attention of a text-to-image UNet (ToMe for SD, Bolya & Hoffman, arXiv 2303.17604).

A transformer block's self-attention costs grow with the square of the number of tokens (one per latent pixel at
that block's resolution: 4096 at SD-1.5's 64x64 first level). Many tokens are near-duplicates (sky, background), so
before the attention the most similar ones are *merged* — averaged — and after it *unmerged*: each merged token's
output is copied back to every position it stood for. The split follows ToMe for SD: the image is cut into 2x2
cells, one token per cell is a destination (the top-left one here: deterministic), the others are sources; the
``ratio`` of all tokens whose source is most similar (cosine) to some destination are merged into it. Queries,
keys and values are all computed on the merged set, so both the projections and the attention shrink.

:class:`TokenMerging` plugs into the one network-call seam (``sample(..., wrap=TokenMerging(model, 0.5))``): during
each network call the self-attention processors of the blocks at the merged resolutions are swapped for merging
ones and put back after, so the model itself is never changed. ``ratio = 0`` is the unmerged network exactly.
Only transformer blocks (``attn1`` of diffusers' ``BasicTransformerBlock``: the UNets of Stable Diffusion and
SDXL) carry tokens this way; the bundled UNet2DModels' attention normalises over the tokens (group norm) and adds
its residual inside the attention call, and is refused.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.attention import BasicTransformerBlock

from .errors import CachingError


def bipartite_merge(x: torch.Tensor, h: int, w: int, r: int):
    """``(merge, unmerge)`` for tokens ``x`` (B, h*w, C) on an h x w grid: the top-left token of each 2x2 cell is a
    destination, the other three are sources; the ``r`` sources most similar (cosine) to some destination are
    averaged into it. ``merge`` maps (B, N, C) -> (B, N - r, C); ``unmerge`` maps back, copying each destination's
    value to the sources merged into it."""
    b, n, _ = x.shape
    if h * w != n:
        raise ValueError(f"{n} tokens do not lie on a {h}x{w} grid")
    grid = torch.arange(n, device=x.device).view(h, w)
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    is_dst[::2, ::2] = True
    dst_pos, src_pos = grid[is_dst], grid[~is_dst]
    r = min(int(r), len(src_pos))
    if r <= 0:
        return (lambda t: t), (lambda t: t)
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)  # (B, sources, destinations)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged_src, kept_src = order[:, :r], order[:, r:]  # indices into src_pos
        into = best_dst.gather(1, merged_src)  # indices into dst_pos

    def merge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        src, dst = t[:, src_pos], t[:, dst_pos]
        kept = src.gather(1, kept_src.unsqueeze(-1).expand(-1, -1, c))
        moving = src.gather(1, merged_src.unsqueeze(-1).expand(-1, -1, c))
        dst = dst.scatter_reduce(1, into.unsqueeze(-1).expand(-1, -1, c), moving, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        n_kept = kept_src.shape[1]
        kept, dst = t[:, :n_kept], t[:, n_kept:]
        out = t.new_empty(t.shape[0], n, c)
        out[:, dst_pos] = dst
        src = t.new_empty(t.shape[0], len(src_pos), c)
        src.scatter_(1, kept_src.unsqueeze(-1).expand(-1, -1, c), kept)
        src.scatter_(1, merged_src.unsqueeze(-1).expand(-1, -1, c), dst.gather(1, into.unsqueeze(-1).expand(-1, -1, c)))
        out[:, src_pos] = src
        return out

    return merge, unmerge


class _MergingProcessor:
    """Self-attention on the merged tokens, output unmerged; the block's own processor does the attention."""

    def __init__(self, base, owner: "TokenMerging", downsample: int):
        self.base, self.owner, self.downsample = base, owner, downsample

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or hidden_states.ndim != 3:  # cross-attention keeps every token
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        h, w = self.owner.grid(hidden_states.shape[1], self.downsample)
        merge, unmerge = bipartite_merge(hidden_states, h, w, int(self.owner.ratio * hidden_states.shape[1]))
        merged = merge(hidden_states)
        self.owner.tokens.append((hidden_states.shape[1], merged.shape[1]))
        return unmerge(self.base(attn, merged, None, attention_mask, temb, *args, **kwargs))


class TokenMerging:
    """Merge ``ratio`` of the tokens in the self-attention of every transformer block whose resolution is at most
    ``max_downsample`` times below the latent's (ToMe for SD's default: 1, the first level only).

    ``tokens``: (tokens in, tokens attended) of every merged self-attention call of the run.
    """

    def __init__(self, model, ratio: float, max_downsample: int = 1):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 0.75 + 1e-9:
            raise CachingError(f"ratio must be a number in [0, 0.75] (the share of tokens merged; at most the 3 sources "
                               f"of each 2x2 cell), got {ratio!r}")
        if max_downsample not in (1, 2, 4, 8):
            raise CachingError(f"max_downsample must be 1, 2, 4 or 8 (the latent resolution divided by a block's), got {max_downsample!r}")
        name = getattr(model, "name", type(model).__name__)
        unet = getattr(model, "unet", None)
        self.blocks = self._self_attentions(unet) if unet is not None else []
        if not self.blocks:
            kind = type(unet).__name__ if unet is not None else "no network"
            raise CachingError(f"token merging needs transformer blocks (self-attention over latent tokens, as in Stable "
                               f"Diffusion's UNet2DConditionModel); model {name!r} has {kind}, whose attention "
                               f"normalises over the tokens and adds its residual inside the call")
        self.model, self.unet, self.ratio, self.max_downsample = model, unet, float(ratio), int(max_downsample)
        self.height, self.width = (int(s) for s in model.sample_shape[-2:])
        levels = self.attention_levels(unet)
        if not any(k <= self.max_downsample for k in levels):
            raise CachingError(f"model {name!r} has no transformer block within max_downsample={max_downsample}: its "
                               f"self-attention runs at 1/{', 1/'.join(map(str, sorted(levels)))} of the latent resolution; "
                               f"use max_downsample={min(levels)} or more")
        self.tokens: list[tuple[int, int]] = []

    @staticmethod
    def attention_levels(unet) -> set[int]:
        """The downsampling factors (1, 2, 4, ...) at which the UNet's down blocks run transformer blocks."""
        return {2**i for i, b in enumerate(getattr(unet, "down_blocks", [])) if getattr(b, "attentions", None)} or {1}

    @staticmethod
    def _self_attentions(unet) -> list:
        return [m.attn1 for m in unet.modules() if isinstance(m, BasicTransformerBlock) and not m.only_cross_attention]

    def __repr__(self) -> str:
        return f"TokenMerging(ratio={self.ratio}, max_downsample={self.max_downsample})"

    def grid(self, n: int, downsample: int) -> tuple[int, int]:
        return math.ceil(self.height / downsample), math.ceil(self.width / downsample)

    def _downsample(self, n: int) -> int | None:
        for k in (1, 2, 4, 8, 16, 32):
            if math.ceil(self.height / k) * math.ceil(self.width / k) == n:
                return k
        return None

    def __call__(self, network):
        if self.ratio == 0:
            return network

        def merged_network(*args, **kwargs):
            x = args[0] if args else kwargs["x"]
            self.height, self.width = int(x.shape[-2]), int(x.shape[-1])
            originals = {attn: attn.processor for attn in self.blocks}
            hooks = []
            for attn in self.blocks:  # which resolution each block runs at is seen on its first input
                hooks.append(attn.register_forward_pre_hook(self._install, with_kwargs=True))
            try:
                return network(*args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
                for attn, proc in originals.items():
                    attn.processor = proc

        return merged_network

    def _install(self, attn, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(attn.processor, _MergingProcessor) or hidden is None or hidden.ndim != 3:
            return None
        k = self._downsample(hidden.shape[1])
        if k is not None and k <= self.max_downsample:
            attn.processor = _MergingProcessor(attn.processor, self, k)
        return None
