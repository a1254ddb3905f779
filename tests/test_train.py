"""companion.train and companion.recipes: recipes train end to end, resume exactly, save safetensors only, and
fail clearly; the recipe table is explicit data that no module changes."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from types import MappingProxyType

import pytest
import torch
from safetensors.torch import load_file

from companion import assets, data, models, recipes, train
from companion.cli import add_train
from companion.features import FeatureNet
from companion.models import TRAIN_SCHEDULE, DiffusionModel

TINY_UNET = dict(unet=recipes.unet_config(16, 1, 1, (8, 16, 16), num_classes=10), batch=16)


def _run(tmp_path, name="digits-cond", steps=4, sub="m", **kw):
    kw.setdefault("config", TINY_UNET if name == "digits-cond" else None)
    return recipes.run_recipe(name, steps=steps, out=tmp_path / sub, progress=False, measure=kw.pop("measure", False), **kw)


def _unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_recipes_are_complete_and_use_the_linear_schedule():
    assert set(recipes.RECIPES) >= {"digits-cond", "digits-noisy-clf", "shapes-ae", "shapes-latent", "shapes-pixel",
                                    "shapes-base16", "shapes-sr32", "features-digits", "features-shapes",
                                    "judge-shapes"}
    for name, r in recipes.RECIPES.items():
        assert r.description and r.steps > 0 and isinstance(r.seed, int), name
        assert r.task is FeatureNet or issubclass(r.task, train.Task), name
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

    a, b, c = _unet_weights(straight), _unet_weights(again), _unet_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"same seed, different weights: {k}"
        assert torch.equal(a[k], c[k]), f"resumed run differs from the straight run: {k}"
    assert assets.read_card(resumed)["final_loss"] == assets.read_card(straight)["final_loss"]
    other_seed = _run(tmp_path, steps=6, sub="seed1", seed=1)
    assert not torch.equal(_unet_weights(other_seed)["conv_in.weight"], a["conv_in.weight"])


def test_learning_rate_warms_up_holds_and_cools_down_to_zero():
    lr = [train.learning_rate(s, lr=1e-3, warmup=10, steps=100, cooldown=0.2) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # linear warm-up over 10 steps
    assert all(x == pytest.approx(1e-3) for x in lr[10:81])  # constant until the last 20 steps
    assert lr[90] == pytest.approx(0.5e-3) and lr[99] == pytest.approx(0.05e-3)  # linear towards 0 over 20 steps
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert train.learning_rate(10**6, lr=1e-3, warmup=10) == 1e-3  # no cool-down: constant for ever
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=f"cooldown={bad!r}"):
            train.learning_rate(0, lr=1e-3, warmup=10, steps=100, cooldown=bad)
    with pytest.raises(ValueError, match="steps=None"):
        train.learning_rate(0, lr=1e-3, warmup=10, cooldown=0.2)


def test_training_timesteps_follow_the_configured_range():
    sched = argparse.Namespace(config=argparse.Namespace(num_train_timesteps=1000))

    def draw(high_t, n=40000):
        task = argparse.Namespace(scheduler=sched, cfg={"high_t": high_t}, step=0)
        return train.DiffusionTask.timesteps(task, n, torch.Generator().manual_seed(0))

    uniform = draw(None)
    assert uniform.min() == 0 and uniform.max() == 999
    assert float((uniform < 400).float().mean()) == pytest.approx(0.4, abs=0.01)
    high = draw({"fraction": 0.5, "min": 400})  # half uniform, half from [400, 1000)
    assert float((high < 400).float().mean()) == pytest.approx(0.2, abs=0.01)
    window = draw({"fraction": 0.5, "min": 100, "max": 600})  # half uniform, half from [100, 600)
    inside = float(((window >= 100) & (window < 600)).float().mean())
    assert inside == pytest.approx(0.5 + 0.5 * 0.5, abs=0.01) and window.max() == 999
    for bad in ({"fraction": 0.5, "min": 600, "max": 100}, {"fraction": 0.5, "min": 0, "max": 1001},
                {"fraction": 0.0, "min": 400}):
        with pytest.raises(ValueError, match="high_t needs"):
            draw(bad, n=4)


def test_a_cooldown_extends_a_finished_constant_rate_run_exactly(tmp_path):
    cool = dict(TINY_UNET, cooldown=0.5)
    straight = _run(tmp_path, steps=6, sub="straight", config=cool)
    _run(tmp_path, steps=3, sub="extended")  # a finished run at a constant rate ...
    extended = _run(tmp_path, steps=6, sub="extended", resume=True, config=cool)  # ... whose last 3 steps cool down
    constant = _run(tmp_path, steps=6, sub="constant")

    a, b, c = _unet_weights(straight), _unet_weights(extended), _unet_weights(constant)
    assert all(torch.equal(a[k], b[k]) for k in a), "extending a run with a cool-down differs from training with one"
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])  # the cool-down changed the steps it covers
    assert assets.read_card(straight)["config"]["cooldown"] == 0.5


def test_a_run_continued_with_another_timestep_range_is_one_phased_recipe(tmp_path):
    first, then = {"fraction": 0.5, "min": 400}, {"fraction": 0.5, "min": 100, "max": 600}
    phased = _run(tmp_path, steps=6, sub="phased", config=dict(TINY_UNET, high_t=[[0, first], [3, then]]))
    _run(tmp_path, steps=3, sub="continued", config=dict(TINY_UNET, high_t=first))
    continued = _run(tmp_path, steps=6, sub="continued", resume=True, config=dict(TINY_UNET, high_t=then))
    unchanged = _run(tmp_path, steps=6, sub="unchanged", config=dict(TINY_UNET, high_t=first))

    a, b, c = _unet_weights(phased), _unet_weights(continued), _unet_weights(unchanged)
    assert all(torch.equal(a[k], b[k]) for k in a), "a phased run differs from the run it describes"
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])  # the second phase changed the training
    assert train.high_t_at([[0, first], [3, None]], 2) == first and train.high_t_at([[0, first], [3, None]], 3) is None
    for bad in ([[1, first]], [[0, first], [0, then]], [[0, first], [5, then], [3, None]], []):
        with pytest.raises(ValueError, match="high_t phases"):
            train.high_t_at(bad, 0)


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
    ae_cfg = dict(vae=dict(recipes.RECIPES["shapes-ae"].config["vae"], block_out_channels=[8, 8, 8], norm_num_groups=8), batch=8)
    ae = _run(tmp_path, "shapes-ae", steps=2, sub="ae", config=dict(ae_cfg, limit=200))
    assert assets.read_card(ae)["kind"] == "autoencoder"
    lat_cfg = dict(autoencoder=str(ae), unet=recipes.unet_config(8, 4, 4, (8, 8, 8), attn=(False, False, False)), batch=8, limit=200)
    lat = models.load(_run(tmp_path, "shapes-latent", steps=2, sub="lat", config=lat_cfg), device="cpu")
    assert lat.is_latent and lat.sample_shape == (4, 8, 8) and lat.image_shape == (3, 32, 32)
    assert lat.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)


def test_a_latent_scale_shifts_the_latents_signal_and_decodes_the_same_images(tmp_path):
    """latent_scale s makes the training latents' per-channel std s (SNR s**2 times unit-variance data at every t),
    and the saved model decodes a scaled latent to the same image as the unscaled model decodes the unscaled one."""
    ae_cfg = dict(vae=dict(recipes.RECIPES["shapes-ae"].config["vae"], block_out_channels=[8, 8, 8], norm_num_groups=8), batch=8)
    ae = _run(tmp_path, "shapes-ae", steps=2, sub="ae", config=dict(ae_cfg, limit=200))
    lat_cfg = dict(autoencoder=str(ae), unet=recipes.unet_config(8, 4, 4, (8, 8, 8), attn=(False, False, False)), batch=8, limit=200)
    rec = recipes.RECIPES["shapes-latent"]
    tasks = {s: train.LatentTask(rec, dict(rec.config, **lat_cfg, latent_scale=s)) for s in (1, 3.0)}
    for s, task in tasks.items():
        assert torch.allclose(task.z.std(dim=(0, 2, 3)), torch.full((4,), float(s)), rtol=1e-3)
        assert torch.allclose(task.z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4 * s)
    assert torch.allclose(tasks[3.0].z, 3.0 * tasks[1].z, rtol=1e-4, atol=1e-5)
    lat = {s: models.load(_run(tmp_path, "shapes-latent", steps=1, sub=f"lat{s}", config=dict(lat_cfg, latent_scale=s)), device="cpu")
           for s in (1, 3.0)}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lat[3.0].decode(3.0 * z), lat[1].decode(z), atol=1e-5)
    x = data.shapes("test", size=32)[0][:4]
    assert torch.allclose(lat[3.0].encode(x), 3.0 * lat[1].encode(x), rtol=1e-4, atol=1e-4)
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match=r"latent_scale must be a finite number > 0, got"):
            train.LatentTask(rec, dict(rec.config, **lat_cfg, latent_scale=bad))


def test_v_prediction_recipe_learns_v_and_samples_through_eps(tmp_path):
    """The same shortened recipe trained for eps and for v: each network's raw output moves towards its own
    target (measured on real images noised to t = 600), the v model says so in its card, and its predict_noise
    returns eps (the samplers' interface)."""
    from companion.schedules import alphas_cumprod

    tiny = dict(unet=recipes.unet_config(16, 3, 3, (8, 16, 16)), batch=16, limit=64)
    nets = {p: models.load(recipes.run_recipe("shapes-base16", steps=60, out=tmp_path / p, progress=False, measure=False,
                                            config=dict(tiny, prediction=p)), device="cpu")
            for p in ("epsilon", "v_prediction")}
    assert nets["v_prediction"].prediction == "v_prediction" and nets["v_prediction"].card["prediction"] == "v_prediction"
    assert nets["v_prediction"].scheduler_config["prediction_type"] == "epsilon"  # what predict_noise returns
    x = data.images("shapes", 16)[0][:32]
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
        recipes.run_recipe("digits-xl")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        recipes.run_recipe("digits-cond", steps=0)
    with pytest.raises(KeyError, match="unknown recipe group 'digits-nope'; valid: digits-pd, digits-design"):
        recipes.run_group("digits-nope")
    with pytest.raises(ValueError, match="features-digits trains in one go"):
        recipes.run_recipe("features-digits", resume=True)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="companion")
    add_train(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_unknown_name(capsys):
    assert _cli(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*recipes.RECIPES, *recipes.GROUPS])
    assert _cli(["train", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "digits-cond" in err


def test_cli_trains(tmp_path, capsys, monkeypatch):
    # the CLI path with the recipe's own network is too slow for a test: shrink the recipe's config
    tiny = dataclasses.replace(recipes.RECIPES["digits-cond"], config={**recipes.RECIPES["digits-cond"].config, **TINY_UNET})
    monkeypatch.setattr(recipes, "RECIPES", MappingProxyType({**recipes.RECIPES, "digits-cond": tiny}))
    assert _cli(["train", "digits-cond", "--steps", "2", "--out", str(tmp_path / "cli"), "--no-measure"]) == 0
    assert assets.read_card(tmp_path / "cli")["training_steps"] == 2
    assert _cli(["train", "digits-cond", "--steps", "3", "--out", str(tmp_path / "cli"), "--no-measure", "--resume"]) == 0
    assert assets.read_card(tmp_path / "cli")["training_steps"] == 3


# ------------------------------------------------------------------------------------------------ the recipe table
def test_every_recipe_resolves_to_a_task_a_config_and_its_dependencies():
    for name, r in recipes.all_recipes().items():
        assert recipes.recipe(name) is r and r.name == name
        assert isinstance(r.config, dict) and {"data", "size", "batch", "lr"} <= set(r.config), name
        assert all(dep in recipes.RECIPES for dep in r.depends_on), name
        assert r.quality is None or callable(r.quality), name
        if r.config.get("teacher"):
            assert r.config["teacher"] in r.depends_on, name


def test_groups_resolve_to_recipes_in_order():
    assert set(recipes.GROUPS) == {"digits-pd", "digits-design"}
    for group, members in recipes.GROUPS.items():
        assert members and all(m in recipes.RECIPES for m in members), group
    pd = recipes.GROUPS["digits-pd"]
    assert all(recipes.RECIPES[b].config["teacher"] == a for a, b in zip(pd, pd[1:]))  # each stage learns from the last


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(KeyError) as e:
        recipes.recipe("digits-xl")
    assert "unknown recipe 'digits-xl'; valid recipes: " in str(e.value)
    assert all(name in str(e.value) for name in recipes.RECIPES)
    with pytest.raises(KeyError, match="no quality measurement for 'features-digits'; valid: digits-cond, "):
        recipes.measure_quality(assets.models_dir() / "features-digits", "features-digits")


def test_the_tables_are_read_only_and_no_module_changes_them():
    """Importing any companion module (distill, features, design, ...) after the table leaves it as it was."""
    code = (
        "import importlib, pkgutil, companion\n"
        "from companion import recipes\n"
        "snap = lambda: repr([(n, r.task, r.config, r.steps, r.quality) for n, r in recipes.RECIPES.items()]) + repr(dict(recipes.GROUPS))\n"
        "before = snap()\n"
        "for m in pkgutil.iter_modules(companion.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('companion.' + m.name)\n"
        "assert snap() == before, 'a module changed the recipe table on import'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(TypeError):
        recipes.RECIPES["digits-new"] = recipes.RECIPES["digits-cond"]
    with pytest.raises(TypeError):
        recipes.GROUPS["digits-new"] = ("digits-cond",)
