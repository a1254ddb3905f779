"""companion.train: recipes train end to end, resume exactly, save safetensors only, and fail clearly."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from companion import assets, models, train
from companion.models import TRAIN_SCHEDULE, DiffusionModel

TINY_UNET = dict(unet=train._unet(16, 1, 1, (8, 16, 16), num_classes=10), batch=16)


def _run(tmp_path, name="digits-cond", steps=4, sub="m", **kw):
    kw.setdefault("config", TINY_UNET if name == "digits-cond" else None)
    return train.run_recipe(name, steps=steps, out=tmp_path / sub, progress=False, measure=kw.pop("measure", False), **kw)


def test_recipes_are_complete_and_use_the_linear_schedule():
    assert set(train.RECIPES) >= {"digits-cond", "digits-noisy-clf", "shapes-ae", "shapes-latent", "shapes-pixel",
                                  "shapes-base16", "shapes-sr32"}
    for name, r in train.RECIPES.items():
        assert r.description and r.steps > 0 and isinstance(r.seed, int), name
        assert r.kind in train._TASKS, name
        if "unet" in r.config and r.config.get("num_classes"):
            assert r.config["unet"]["num_class_embeds"] == r.config["num_classes"] + 1  # + the "no class" label
    assert TRAIN_SCHEDULE["beta_schedule"] == "linear"


def test_shortened_recipe_trains_end_to_end_and_reloads(tmp_path, no_unpickling):
    out = _run(tmp_path)
    card = assets.verify(out)
    assert card["kind"] == "diffusion" and card["recipe"] == "digits-cond" and card["training_steps"] == 4
    assert card["seed"] == 0 and card["training_seconds"] > 0 and card["params"] > 0
    assert torch.isfinite(torch.tensor(card["final_loss"])) and 0.05 < card["final_loss"] < 5
    assert card["config"]["unet"]["block_out_channels"] == [8, 16, 16]
    model = models.load(out, device="cpu")
    assert isinstance(model, DiffusionModel) and model.num_classes == 10 and model.sample_shape == (1, 16, 16)
    assert model.scheduler_config["beta_schedule"] == "linear"
    # only safetensors and JSON are written, in the model folder and in its checkpoint
    ckpt = out.with_name(out.name + train.CHECKPOINT_SUFFIX)
    written = [p for p in list(out.rglob("*")) + list(ckpt.rglob("*")) if p.is_file()]
    assert written and all(p.suffix in (".safetensors", ".json") for p in written), written


def test_training_is_reproducible_and_resume_is_exact(tmp_path):
    straight = _run(tmp_path, steps=6, sub="straight")
    again = _run(tmp_path, steps=6, sub="again")
    _run(tmp_path, steps=3, sub="resumed")
    resumed = _run(tmp_path, steps=6, sub="resumed", resume=True)

    def weights(folder):
        return load_file(str(next((folder / "unet").glob("*.safetensors"))))

    a, b, c = weights(straight), weights(again), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"same seed, different weights: {k}"
        assert torch.equal(a[k], c[k]), f"resumed run differs from the straight run: {k}"
    assert assets.read_card(resumed)["final_loss"] == assets.read_card(straight)["final_loss"]
    other_seed = _run(tmp_path, steps=6, sub="seed1", seed=1)
    assert not torch.equal(weights(other_seed)["conv_in.weight"], a["conv_in.weight"])


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _run(tmp_path, resume=True)
    _run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="trained with seed 0, not 5"):
        _run(tmp_path, steps=4, resume=True, seed=5)


def test_noisy_classifier_recipe_trains_and_measures(tmp_path, no_unpickling):
    cfg = dict(net=dict(in_channels=1, image_size=16, num_classes=10, channels=[16, 16], t_dim=16), batch=64, warmup=5, lr=5e-3)
    out = _run(tmp_path, "digits-noisy-clf", steps=100, config=cfg, measure=True)
    card = assets.verify(out)
    acc = card["quality"]["test_accuracy_by_t"]
    assert set(acc) == {"0", "100", "250", "500", "750", "999"}
    assert acc["0"] > 0.2  # 100 steps of a tiny net already beat chance (0.1) on clean digits
    clf = models.load(out, device="cpu")
    assert clf(torch.zeros(3, 1, 16, 16), torch.tensor([0, 10, 999])).shape == (3, 10)


def test_autoencoder_and_latent_recipes_chain(tmp_path):
    ae_cfg = dict(vae=dict(train.RECIPES["shapes-ae"].config["vae"], block_out_channels=[8, 8, 8], norm_num_groups=8), batch=8)
    ae = _run(tmp_path, "shapes-ae", steps=2, sub="ae", config=dict(ae_cfg, limit=200))
    assert assets.read_card(ae)["kind"] == "autoencoder"
    lat_cfg = dict(autoencoder=str(ae), unet=train._unet(8, 4, 4, (8, 8, 8), attn=(False, False, False)), batch=8, limit=200)
    lat = models.load(_run(tmp_path, "shapes-latent", steps=2, sub="lat", config=lat_cfg), device="cpu")
    assert lat.is_latent and lat.sample_shape == (4, 8, 8) and lat.image_shape == (3, 32, 32)
    assert lat.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)


def test_v_prediction_recipe_learns_v_and_samples_through_eps(tmp_path):
    """The same shortened recipe trained for eps and for v: each network's raw output moves towards its own
    target (measured on real images noised to t = 600), the v model says so in its card, and its predict_noise
    returns eps (the samplers' interface)."""
    from companion.schedules import alphas_cumprod

    tiny = dict(unet=train._unet(16, 3, 3, (8, 16, 16)), batch=16, limit=64)
    nets = {p: models.load(train.run_recipe("shapes-base16", steps=60, out=tmp_path / p, progress=False, measure=False,
                                            config=dict(tiny, prediction=p)), device="cpu")
            for p in ("epsilon", "v_prediction")}
    assert nets["v_prediction"].prediction == "v_prediction" and nets["v_prediction"].card["prediction"] == "v_prediction"
    assert nets["v_prediction"].scheduler_config["prediction_type"] == "epsilon"  # what predict_noise returns
    x = train._images(dict(data="shapes", size=16))[0][:32]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    abar = float(alphas_cumprod("linear")[600])
    x_t = abar**0.5 * x + (1 - abar) ** 0.5 * noise
    v = abar**0.5 * noise - (1 - abar) ** 0.5 * x
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    with torch.no_grad():
        raw = {p: m.unet(x_t, torch.full((32,), 600)).sample for p, m in nets.items()}
        eps_v = nets["v_prediction"].predict_noise(x_t, 600)
    assert mse(raw["v_prediction"], v) < mse(raw["epsilon"], v)
    assert mse(raw["epsilon"], noise) < mse(raw["v_prediction"], noise)
    torch.testing.assert_close(eps_v, (1 - abar) ** 0.5 * x_t + abar**0.5 * raw["v_prediction"], atol=1e-5, rtol=0)


def test_unknown_recipe_and_bad_steps():
    with pytest.raises(KeyError, match="unknown recipe 'digits-xl'; valid recipes: digits-cond, "):
        train.run_recipe("digits-xl")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        train.run_recipe("digits-cond", steps=0)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="companion")
    train.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_unknown_name(capsys):
    assert _cli(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in train.RECIPES)
    assert _cli(["train", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "digits-cond" in err


def test_cli_trains(tmp_path, capsys, monkeypatch):
    # the CLI path with the recipe's own network is too slow for a test: shrink the recipe's config
    tiny = train.Recipe(**{**train.RECIPES["digits-cond"].__dict__, "config": {**train.RECIPES["digits-cond"].config, **TINY_UNET}})
    monkeypatch.setitem(train.RECIPES, "digits-cond", tiny)
    assert _cli(["train", "digits-cond", "--steps", "2", "--out", str(tmp_path / "cli"), "--no-measure"]) == 0
    assert assets.read_card(tmp_path / "cli")["training_steps"] == 2
    assert _cli(["train", "digits-cond", "--steps", "3", "--out", str(tmp_path / "cli"), "--no-measure", "--resume"]) == 0
    assert assets.read_card(tmp_path / "cli")["training_steps"] == 3
