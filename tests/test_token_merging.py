"""Token merging (ToMe for SD) in the network-call seam: the merge/unmerge pair, and runs on a tiny random pipeline."""
import pytest
import torch

pytest.importorskip("transformers", reason="the tiny pipeline's text encoder needs transformers (the test extra)")

from companion import load, sample  # noqa: E402
from companion.errors import CachingError  # noqa: E402
from companion.random_pipelines import save_tiny  # noqa: E402
from companion.token_merging import TokenMerging, bipartite_merge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(save_tiny(tmp_path_factory.mktemp("tome") / "tiny-sd"))


def cells(h, w, c, seed=0):
    """Tokens on an h x w grid, equal within each 2x2 cell, a different direction per cell."""
    g = torch.Generator().manual_seed(seed)
    per_cell = torch.randn(1, h // 2, w // 2, c, generator=g)
    return per_cell.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, h * w, c)


def test_merging_every_duplicate_token_and_unmerging_gives_the_tokens_back():
    x = cells(8, 8, 16)
    merge, unmerge = bipartite_merge(x, 8, 8, r=48)  # all three sources of each of the 16 cells
    m = merge(x)
    assert m.shape == (1, 16, 16)
    assert torch.allclose(unmerge(m), x, atol=1e-6)


def test_a_merged_token_is_the_mean_of_what_it_stands_for_and_unmerge_copies_it_back():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, generator=g)
    merge, unmerge = bipartite_merge(x, 4, 4, r=5)
    m = merge(x)
    assert m.shape == (2, 11, 8)
    back = unmerge(m)
    for b in range(2):
        # every output token equals one merged token, and each merged token is the mean of the inputs mapped to it
        groups = {}
        for i in range(16):
            j = int(((m[b] - back[b, i]).abs().sum(-1)).argmin())
            assert torch.allclose(m[b, j], back[b, i])
            groups.setdefault(j, []).append(i)
        assert len(groups) == 11 and sum(len(v) for v in groups.values()) == 16
        for j, members in groups.items():
            assert torch.allclose(m[b, j], x[b, members].mean(0), atol=1e-6)
    same, _ = bipartite_merge(x, 4, 4, r=0)
    assert same(x) is x
    with pytest.raises(ValueError, match="16 tokens do not lie on a 3x5 grid"):
        bipartite_merge(x, 3, 5, r=2)


def test_token_merging_runs_in_the_network_seam_and_leaves_the_model_as_it_was(tiny):
    kw = dict(prompt="a red car", batch=2, guidance=5.0, seed=3)
    base = sample(tiny, "dpmpp_2m", 4, **kw).images
    off = sample(tiny, "dpmpp_2m", 4, wrap=TokenMerging(tiny, 0.0, max_downsample=2), **kw).images
    assert torch.equal(off, base)  # ratio 0 is the unmerged network exactly
    tm = TokenMerging(tiny, 0.5, max_downsample=2)
    before = [a.processor for a in tm.blocks]
    merged = sample(tiny, "dpmpp_2m", 4, wrap=tm, **kw).images
    assert tm.tokens and all(t == (64, 32) for t in tm.tokens)  # 8x8 latent tokens at that level, half merged
    assert len(tm.tokens) == 4 * len(tm.blocks)  # every self-attention of every call
    assert [a.processor for a in tm.blocks] == before  # the model's own processors are back
    rms = float((merged - base).pow(2).mean().sqrt())
    assert 0 < rms < 0.5 * float(base.pow(2).mean().sqrt())
    assert torch.equal(sample(tiny, "dpmpp_2m", 4, **kw).images, base)  # and the model samples as before


def test_token_merging_refuses_what_it_cannot_merge(tiny):
    with pytest.raises(CachingError, match=r"no transformer block within max_downsample=1: its self-attention runs at "
                                           r"1/2 of the latent resolution; use max_downsample=2"):
        TokenMerging(tiny, 0.5)
    with pytest.raises(CachingError, match=r"ratio must be a number in \[0, 0.75\].*got 0.9"):
        TokenMerging(tiny, 0.9, max_downsample=2)
    with pytest.raises(CachingError, match="max_downsample must be 1, 2, 4 or 8"):
        TokenMerging(tiny, 0.5, max_downsample=3)
    with pytest.raises(CachingError, match="token merging needs transformer blocks .* model 'digits-cond' has UNet2DModel"):
        TokenMerging(load("digits-cond"), 0.5)
