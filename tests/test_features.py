"""The bundled feature networks: shapes, resizing, accuracy on held-out data, reproducible training."""
import pytest
import torch

from companion import assets, recipes
from companion.data import digits
from companion.features import (JUDGE, METRICS, FeatureNet, augmentation_text, default_feature_net_name, load_feature_net,
                                train_feature_net)
from companion.models import ModelError, load


@pytest.fixture(scope="module")
def net():
    return load_feature_net("features-digits")


def test_card_and_integrity(net):
    card = assets.verify(assets.models_dir() / "features-digits")  # every sha256 matches
    assert card["kind"] == "features" and card["train_split"] == "train"
    assert card["seed"] == 0 and card["steps"] > 0 and card["train_time_s"] > 0
    assert card["test_accuracy"] >= 0.95
    assert isinstance(net, FeatureNet) and net.feature_dim == 64


def test_outputs_and_resizing(net):
    x, _ = digits(16, "test")
    f, logits = net.extract(x[:8])
    assert f.shape == (8, 64) and logits.shape == (8, 10)
    # other resolutions of the same digits are resized to 16x16 and mostly keep their class
    for size in (8, 32):
        xs, ys = digits(size, "test")
        _, lg = net.extract(xs)
        assert (lg.argmax(1) == ys).float().mean() >= 0.85, size


def test_held_out_accuracy_matches_card(net):
    x, y = digits(16, "test")
    _, logits = net.extract(x)
    acc = float((logits.argmax(1) == y).float().mean())
    assert acc >= 0.95
    assert acc == pytest.approx(net.card["test_accuracy"], abs=1e-3)


def test_bad_input_is_named(net):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net.extract(torch.zeros(2, 3, 16, 16))


def test_loaded_through_models_load():
    assert isinstance(load("features-digits"), FeatureNet)


def test_unknown_name_lists_choices():
    with pytest.raises(ModelError, match="features-digits"):
        load_feature_net("features-nope")
    with pytest.raises(KeyError, match="features-digits"):
        recipes.run_recipe("nope")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        default_feature_net_name((2, 16, 16))


def test_training_is_reproducible(tmp_path):
    """The feature networks' recipes run through the one recipe table (``companion train features-digits``)."""
    a, b = (load(recipes.run_recipe("features-digits", out=tmp_path / k, steps=3, progress=False)) for k in "ab")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    card = assets.verify(tmp_path / "a")
    assert card["steps"] == 3 and card["recipe"] == "companion.features.train_feature_net"


def test_shapes_network_on_held_out_data():
    from companion.data import shapes

    net = load_feature_net("features-shapes")
    card = assets.verify(assets.models_dir() / "features-shapes")
    assert card["dataset"] == "shapes" and card["train_split"] == "train" and card["test_accuracy"] >= 0.8
    x, y = shapes("test")
    f, logits = net.extract(x[:400])
    assert f.shape == (400, 64) and logits.shape == (400, 4)
    assert (logits.argmax(1) == y[:400]).float().mean() >= 0.8


def test_shapes_judge_is_a_stronger_held_out_classifier_and_never_a_metric_space():
    from companion import models
    from companion.data import shapes

    card = assets.verify(assets.models_dir() / "judge-shapes")
    assert card["role"] == JUDGE and card["train_split"] == "train" and card["test_accuracy"] >= 0.97
    assert assets.read_card(assets.models_dir() / "features-shapes")["test_accuracy"] < card["test_accuracy"]
    x, y = shapes("test")
    _, logits = load_feature_net("judge-shapes").extract(x[:400])
    assert (logits.argmax(1) == y[:400]).float().mean() >= 0.97
    # a square turned by a quarter turn or mirrored is still a square: the judge was trained on all eight symmetries
    turned = torch.rot90(x[:400], 1, (2, 3)).flip(3)
    assert (load_feature_net("judge-shapes").extract(turned)[1].argmax(1) == y[:400]).float().mean() >= 0.97
    # the metrics never measure in a judge's space by default
    assert "judge-shapes" not in models.feature_spaces()
    assert models.feature_space_for(models.load("shapes-pixel")) == "features-shapes"


def test_feature_network_role_is_checked(tmp_path):
    cfg = dict(recipes.recipe("features-digits").config, role="referee")
    with pytest.raises(ValueError, match="unknown feature-network role 'referee'; valid: metrics, judge"):
        train_feature_net("x", cfg, tmp_path / "x", steps=1, progress=False)


@pytest.mark.parametrize("name", ["features-digits", "features-shapes", "judge-shapes"])
def test_bundled_feature_networks_are_what_their_recipes_make(name):
    rec = recipes.recipe(name)
    card = assets.read_card(assets.models_dir() / name)
    net = {k: list(v) if isinstance(v, tuple) else v for k, v in rec.config["net"].items()}
    assert card["config"] == dict(net, num_classes=card["config"]["num_classes"])
    assert (card["steps"], card["seed"], card["batch_size"], card["lr"], card["dataset"]) == (
        rec.steps, rec.seed, rec.config["batch"], rec.config["lr"], rec.config["data"])
    assert card["augmentation"] == augmentation_text(rec.config["shift"], rec.config.get("symmetries", False))
    assert card.get("role", METRICS) == rec.config.get("role", METRICS)
