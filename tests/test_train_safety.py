"""Training never loses work: it writes to a run folder (the bundled models only with --install), keeps the
checkpoint and output it would overwrite, and saves a checkpoint on Ctrl-C or SIGTERM."""
from __future__ import annotations

import json
import os
import signal

import pytest

from companion import assets, cli, recipes, train

TINY_UNET = dict(unet=recipes.unet_config(16, 1, 1, (8, 16, 16), num_classes=10), batch=8)


def _train(out=None, steps=3, **kw):
    return recipes.run_recipe("digits-cond", steps=steps, out=out, config=TINY_UNET, progress=False, measure=False,
                              threads=1, **kw)


def _step(ckpt):
    return json.loads((ckpt / "state.json").read_text())["step"]


def test_default_output_is_a_run_folder_not_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv(train.RUNS_ENV, str(tmp_path / "runs"))
    before = assets.read_card(assets.models_dir() / "digits-cond")
    out = _train()
    assert out == tmp_path / "runs" / "digits-cond" and (out / assets.CARD).is_file()
    assert assets.read_card(assets.models_dir() / "digits-cond") == before
    assets.verify(assets.models_dir() / "digits-cond")  # the bundled weights are untouched


def test_writing_into_a_bundled_folder_needs_install(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "models_dir", lambda: tmp_path / "models")
    (tmp_path / "models").mkdir()
    with pytest.raises(ValueError, match="--install"):
        _train(out=tmp_path / "models" / "digits-cond")
    assert not (tmp_path / "models" / "digits-cond").exists()
    out = _train(install=True, steps=2)
    assert out == tmp_path / "models" / "digits-cond" and (out / assets.CARD).is_file()


def test_cli_refuses_the_bundled_folder_without_install(capsys):
    assert cli.main(["train", "digits-noisy-clf", "--steps", "1", "--out", str(assets.models_dir() / "digits-noisy-clf")]) == 1
    assert "--install" in capsys.readouterr().err


def test_a_new_run_keeps_the_checkpoint_and_model_it_would_overwrite(tmp_path):
    out = _train(tmp_path / "m", steps=3)
    ckpt = out.with_name(out.name + train.CHECKPOINT_SUFFIX)
    assert _step(ckpt) == 3
    _train(tmp_path / "m", steps=2)
    assert _step(ckpt) == 2
    kept = sorted(tmp_path.glob("m.checkpoint.previous-*"))
    assert len(kept) == 1 and _step(kept[0]) == 3
    assert len(list(tmp_path.glob("m.previous-*"))) == 1
    _train(tmp_path / "m", steps=1, keep=False)  # told to overwrite: nothing more is kept
    assert len(list(tmp_path.glob("m.checkpoint.previous-*"))) == 1 and _step(ckpt) == 1


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interruption_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch, how):
    real = train.ema_update

    def interrupt_at_step_2(ema, net, decay, step):
        real(ema, net, decay, step)
        if step == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", interrupt_at_step_2)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Interrupted, match="checkpoint saved") as info:
        _train(tmp_path / "m", steps=6)
    assert _step(info.value.checkpoint) in (2, 3)  # saved at the step it was stopped in
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the training's handler is gone again
    monkeypatch.setattr(train, "ema_update", real)
    out = _train(tmp_path / "m", steps=6, resume=True)
    assert _step(out.with_name("m" + train.CHECKPOINT_SUFFIX)) == 6


@pytest.mark.parametrize("damage, match", [
    ("no_tensors", "state.safetensors is missing"),
    ("bad_json", "state.json is damaged"),
    ("bad_tensors", "state.safetensors is damaged"),
    ("other_recipe", "belongs to recipe 'shapes-pixel'"),
])
def test_damaged_checkpoints_are_refused_by_name(tmp_path, damage, match):
    out = _train(tmp_path / "m", steps=2)
    ckpt = out.with_name("m" + train.CHECKPOINT_SUFFIX)
    if damage == "no_tensors":
        (ckpt / "state.safetensors").unlink()
    elif damage == "bad_json":
        (ckpt / "state.json").write_text("{not json")
    elif damage == "bad_tensors":
        (ckpt / "state.safetensors").write_bytes(b"\x00" * 20)
    else:
        meta = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps(dict(meta, recipe="shapes-pixel")))
    with pytest.raises(train.CheckpointError, match=match) as info:
        _train(tmp_path / "m", steps=4, resume=True)
    assert "without --resume" in str(info.value) or "--resume" in str(info.value)


def test_another_networks_checkpoint_is_refused_in_one_line(tmp_path):
    _train(tmp_path / "m", steps=2)
    wider = dict(TINY_UNET, unet=recipes.unet_config(16, 1, 1, (16, 32, 32), num_classes=10))
    with pytest.raises(train.CheckpointError, match=r"do not fit this network: .*of another shape") as info:
        recipes.run_recipe("digits-cond", steps=4, out=tmp_path / "m", config=wider, progress=False, measure=False,
                           threads=1, resume=True)
    assert len(str(info.value)) < 600  # not hundreds of keys
