"""Model-design variants (chapter 04b): recipes, FLOP accounting and latency measurement."""
import json

import pytest
import torch
import torch.nn.functional as F

from companion import bench, design, load, recipes


def test_cpu_attention_is_counted_by_the_flop_counter():
    # torch's own table leaves out the CPU attention kernel; QK^T and softmax-V are 2 * (2 B h N^2 d) FLOPs
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    counter = bench.flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * b * h * n * n * d


def test_design_group_changes_one_lever_per_variant():
    names = recipes.GROUPS["digits-design"]
    assert list(names) == list(design.DESIGN_MODELS) and len(names) == 5
    table = recipes.all_recipes()
    base = table["digits-design-base"].config
    assert base["unet"] == recipes.RECIPES["digits-cond"].config["unet"]  # base is the digits-cond layout
    changed = {}
    for name in names:
        rec = table[name]
        assert rec.steps == recipes.DESIGN_STEPS and rec.seed == 0
        cfg = rec.config
        assert {k: v for k, v in cfg.items() if k != "unet"} == {k: v for k, v in base.items() if k != "unet"}
        assert cfg["prediction"] == "v_prediction"
        keys = set(cfg["unet"]) | set(base["unet"])
        changed[name] = {k for k in keys if cfg["unet"].get(k) != base["unet"].get(k)}
    assert changed == {
        "digits-design-base": set(),
        "digits-design-narrow": {"block_out_channels"},
        "digits-design-deep": {"layers_per_block"},
        "digits-design-noattn": {"down_block_types", "up_block_types", "add_attention"},
        "digits-design-attn8": {"down_block_types", "up_block_types"},
    }


def _attention_flops(sizes, channels):
    # per attention layer on N tokens of C channels: q, k, v, out projections 4 * 2 N C^2, products 4 N^2 C
    return sum(8 * (s * s) * channels ** 2 + 4 * (s * s) ** 2 * channels for s in sizes)


@pytest.mark.parametrize("name, sizes", [("digits-design-base", [4, 4, 4, 4]), ("digits-design-noattn", []),
                                         ("digits-design-attn8", [8, 4, 4, 4, 4, 8, 8])])
def test_architecture_profile_matches_the_attention_formula(name, sizes):
    model = load(name)
    prof = design.architecture_profile(model)
    assert prof["attention_at"] == sizes
    assert prof["flops_attention"] == _attention_flops(sizes, 64)  # every attention level has 64 channels
    assert prof["params"] == model.card["params"]
    assert prof["flops"] == bench.flops_per_eval(model)
    assert prof["flops"] == prof["flops_convolution"] + prof["flops_attention"] + prof["flops_other"]


def test_width_and_depth_scale_the_convolution_flops():
    prof = {v: design.architecture_profile(load(f"digits-design-{v}")) for v in ("base", "narrow", "deep")}
    width = prof["base"]["flops_convolution"] / prof["narrow"]["flops_convolution"]
    depth = prof["deep"]["flops_convolution"] / prof["base"]["flops_convolution"]
    # halving C_in and C_out divides by 4, except the first (1 input channel) and last (1 output) convolutions
    assert 3.5 < width < 4.0
    # a second ResNet layer per level: more than 1x (extra layers), less than 2x (down/up-samplers are not doubled)
    assert 1.3 < depth < 2.0


def test_design_cards_record_training_and_quality():
    for name in design.DESIGN_MODELS:
        model = load(name)
        card = model.card
        assert card["training_steps"] == recipes.DESIGN_STEPS
        assert card["recipe"] == name
        q = card["quality"]
        assert 0.0 <= q["cfg_accuracy_g2"] <= 1.0 and "fd_features_digits_g2" in q
        assert card["weights_dtype"] == "float16"
        assert next(model.unet.parameters()).dtype == torch.float32  # stored in fp16, loaded as fp32


def test_network_latency_measures_and_refuses_bad_arguments(tiny_model):
    assert design.network_latency(tiny_model, batch=2, repeats=2, warmup=0) > 0
    with pytest.raises(ValueError, match="batch=0"):
        design.network_latency(tiny_model, batch=0)


def test_architecture_profile_refuses_a_model_without_a_network():
    from companion.oracle import GaussianMixtureOracle

    with pytest.raises(TypeError, match="no network"):
        design.architecture_profile(GaussianMixtureOracle(torch.zeros(2, 1, 4, 4)))


def test_a_design_recipe_trains_and_saves_half_precision_weights(tmp_path):
    out = recipes.run_recipe("digits-design-narrow", steps=2, out=tmp_path / "narrow", progress=False, measure=False, threads=1)
    card = json.loads((out / "companion.json").read_text())
    assert card["training_steps"] == 2 and card["weights_dtype"] == "float16"
    model = load(out)
    assert design.architecture_profile(model)["channels"] == "16-32-32"
