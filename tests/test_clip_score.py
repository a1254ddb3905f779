"""The CLIP score on a tiny random CLIP (tests/conftest.py, no download): the definition, its interval, its refusals."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from companion import metrics  # noqa: E402


def test_clip_score_is_the_clamped_cosine_of_clips_own_embeddings(tiny_clip):
    model, processor = metrics.load_clip(str(tiny_clip))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle", "a blue square", "a ring", "a green triangle", "two circles", "a square"]
    m = metrics.clip_score(images, prompts, clip=(model, processor), batch=4)
    # the same number through CLIP's separate feature calls (another code path of transformers)
    pixels = [x.numpy() for x in ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)]
    with torch.no_grad():
        enc = processor(text=prompts, images=pixels, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=enc["pixel_values"])
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if torch.is_tensor(img) else img.pooler_output
    txt = txt if torch.is_tensor(txt) else txt.pooler_output
    want = 100 * F.cosine_similarity(img, txt).clamp(min=0)
    assert m.n == 6 and m.value == pytest.approx(float(want.mean()), abs=1e-4)
    assert 0 <= m.low <= m.value <= m.high <= 100
    # from the folder path too, and one prompt for all images
    again = metrics.clip_score(images, "a red circle", clip=str(tiny_clip))
    assert again.n == 6 and 0 <= again.value <= 100


def test_clip_score_refuses_what_it_cannot_score(tiny_clip):
    clip = metrics.load_clip(str(tiny_clip))
    with pytest.raises(ValueError, match=r"RGB images \(N, 3, H, W\)"):
        metrics.clip_score(torch.zeros(2, 1, 16, 16), "a digit", clip=clip)
    with pytest.raises(ValueError, match="one prompt or 4 prompts"):
        metrics.clip_score(torch.zeros(4, 3, 32, 32), ["a", "b"], clip=clip)
    with pytest.raises(ValueError, match="clip_score needs at least 4 samples, got 3"):
        metrics.clip_score(torch.zeros(3, 3, 32, 32), "a ring", clip=clip)


# ------------------------------------------------------------------------------------------------ Inception-FID
class PixelStats(torch.nn.Module):
    """A stand-in for Inception-v3 with its interface (uint8 (N, 3, H, W) in, features out): per-channel means and
    a few pooled values of the 8-bit pixels, so the test can compute the expected features itself."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        assert x.dtype == torch.uint8
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255 * self.scale, 2).flatten(1)


def test_inception_fd_is_the_frechet_distance_of_8_bit_images_in_the_networks_space():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(160, 3, 16, 16, generator=g) * 2 - 1
    same = torch.rand(160, 3, 16, 16, generator=g) * 2 - 1
    shifted = (same * 0.5 + 0.3).clamp(-1, 1)
    net = PixelStats()
    m_same = metrics.inception_fd(same, real, inception=net, batch=50)
    m_shift = metrics.inception_fd(shifted, real, inception=net, batch=50)
    with torch.no_grad():
        want = metrics.fd_from_features(net(((shifted + 1) * 127.5).round().to(torch.uint8)).double(),
                                        metrics.Reference("x", "r", net(((real + 1) * 127.5).round().to(torch.uint8)), None))
    assert m_shift.value == pytest.approx(want.value, rel=1e-9) and m_shift.n == 160
    assert m_shift.low > m_same.high  # a shifted set is clearly farther than a second draw of the same distribution
    assert m_same.low <= 0.0 <= m_same.high  # bias-corrected: a second draw of the same distribution sits at 0
    with pytest.raises(ValueError, match=r"inception_fd needs RGB images \(N, 3, H, W\)"):
        metrics.inception_fd(torch.zeros(160, 1, 16, 16), real, inception=net)
    with pytest.raises(ValueError, match="fd needs at least 128 samples, got 10"):
        metrics.inception_fd(same[:10], real, inception=net)


def test_inception_fd_without_torch_fidelity_names_the_hub_extra():
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed here: the refusal cannot happen")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"Inception-FID needs torch-fidelity .*install the hub extra: pip install '\.\[hub\]'"):
        metrics.load_inception()
