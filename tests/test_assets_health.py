"""Asset problems are reported, never hidden: bad or card-less folders show in `info` (exit 1, JSON too), a card
that disagrees with its weights is refused by name, and the restore hint fits where the assets live."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from companion import assets
from companion.errors import ModelError
from companion.models import load

ROOT = assets.assets_dir().parent


@pytest.fixture
def copied(tmp_path, monkeypatch):
    """A private assets folder (outside any git checkout) holding a copy of digits-cond."""
    root = tmp_path / "assets"
    shutil.copytree(assets.models_dir() / "digits-cond", root / "models" / "digits-cond")
    monkeypatch.setenv(assets.ENV_VAR, str(root))
    return root / "models" / "digits-cond"


def _info_json(env_root):
    env = {"COMPANION_ASSETS": str(env_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "companion", "info", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)


def test_info_json_exits_1_on_a_bad_asset(copied):
    assert _info_json(copied.parent.parent).returncode == 0
    weights = next(copied.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = _info_json(copied.parent.parent)
    assert r.returncode == 1
    row = next(a for a in json.loads(r.stdout)["assets"] if a["name"] == "digits-cond")
    assert row["sha256"].startswith("BAD: sha256 mismatch")


def test_a_folder_without_its_card_is_reported_not_hidden(copied):
    (copied / assets.CARD).unlink()
    rows = {r["name"]: r for r in assets.status()}
    assert rows["digits-cond"]["sha256"].startswith("BAD: no companion.json")
    with pytest.raises(ModelError, match="has no companion.json"):
        load("digits-cond")


@pytest.mark.parametrize("change, match", [
    ({"sample_shape": [1, 32, 32]}, "disagrees with the network"),
    ({"num_classes": 5}, "disagrees with the network's 11 class embeddings"),
    ({"sample_shape": "1x16x16"}, "'sample_shape' must be list"),
    ({"num_classes": "ten"}, "'num_classes' must be int"),
])
def test_a_card_that_disagrees_with_its_weights_is_refused(copied, change, match):
    card = assets.read_card(copied)
    card.update(change)
    (copied / assets.CARD).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=match):
        load(copied)


def test_restore_hint_fits_where_the_assets_live(copied):
    outside = assets.restore_hint(copied / "unet" / "x.safetensors", "digits-cond")
    assert "`git" not in outside and "COMPANION_ASSETS" in outside and "companion train digits-cond --install" in outside
    if (ROOT / ".git").exists():
        inside = assets.restore_hint(ROOT / "assets" / "models" / "digits-cond" / assets.CARD, "digits-cond")
        assert f"git -C {ROOT} checkout -- assets/models/digits-cond/{assets.CARD}" in inside
