"""The CLIP score on a tiny random CLIP written here (no download): the definition, its interval, its refusals."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from companion import metrics  # noqa: E402
from companion.pipelines import letter_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tok = letter_tokenizer(folder / "tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


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
    with pytest.raises(ValueError, match="one prompt or 3 prompts"):
        metrics.clip_score(torch.zeros(3, 3, 32, 32), ["a", "b"], clip=clip)
