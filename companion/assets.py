"""Bundled assets on disk: where they are, their cards, and integrity checks.

Every bundled model is a folder ``assets/models/<name>/`` holding diffusers ``save_pretrained`` sub-folders
(safetensors weights + JSON configs) and a card ``companion.json``: what it is (``kind``), the recipe that
made it, seed, steps, training time, final loss, measured quality and the sha256 of every other file in
the folder. The card is the manifest entry; :func:`manifest` gathers all cards.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

from .errors import AssetError  # noqa: F401  (raised here; defined with the others)

CARD = "companion.json"
ENV_VAR = "COMPANION_ASSETS"
HUB_TIMEOUT_S = 5.0  # how long an optional download waits for the Hugging Face Hub to answer


PACKAGE_DIR = Path(__file__).resolve().parent
# An installed wheel keeps the repository's assets/, notebooks/ and docs/ under the package (pyproject maps them
# to companion/_bundled/); a source checkout or an editable install reads them at the repository's top level.
BUNDLED_DIR = PACKAGE_DIR / "_bundled"


def _bundled(name: str) -> Path:
    installed = BUNDLED_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


def assets_dir() -> Path:
    """The assets folder: ``$COMPANION_ASSETS``, else the installed package's bundled copy, else ``assets/`` beside
    the package (a source checkout)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return _bundled("assets")


def notebooks_dir() -> Path:
    """The chapters: the installed package's bundled copy, else ``notebooks/`` of the source checkout."""
    return _bundled("notebooks")


def models_dir() -> Path:
    return assets_dir() / "models"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _payload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CARD and "__pycache__" not in p.parts)


def write_card(folder: str | Path, card: dict) -> dict:
    """Write ``companion.json`` in ``folder`` with ``card`` plus the sha256 and size of every file there."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _payload_files(folder)}
    card = dict(card, files=files)
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / CARD)
    return card


def restore_hint(path: str | Path, name: str | None = None) -> str:
    """How to get a bundled file back: ``git checkout`` where the assets are a git checkout's (with the path as
    git knows it), a fresh copy otherwise; and retraining, which always works."""
    path = Path(path).resolve()
    retrain = f"retrain it with `companion train {name} --install`" if name else "retrain it with `companion train NAME --install`"
    repo = next((d for d in [path, *path.parents] if (d / ".git").exists()), None)
    if repo is not None:
        return f"restore it with `git -C {repo} checkout -- {path.relative_to(repo)}`, or {retrain}"
    where = f"$COMPANION_ASSETS ({assets_dir()})" if os.environ.get(ENV_VAR) else f"the installed assets ({assets_dir()})"
    return f"copy it again into {where} from a source checkout or reinstall the companion, or {retrain}"


def read_card(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise AssetError(f"{folder} has no {CARD}: not a companion asset folder (retrain it with `companion train`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"{path} is not valid JSON ({e}); {restore_hint(path, folder.name)}") from e


def verify(folder: str | Path) -> dict:
    """Check every file listed in the card against its sha256; raise :class:`AssetError` naming the first bad one."""
    folder = Path(folder)
    card = read_card(folder)
    for rel, meta in card.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            raise AssetError(f"missing file {p}; {restore_hint(p, card.get('name', folder.name))}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise AssetError(
                f"sha256 mismatch for {p}: expected {meta['sha256'][:12]}..., got {digest[:12]}...; "
                f"the file is corrupted or was changed: {restore_hint(p, card.get('name', folder.name))}"
            )
    return card


def folder_sha256(folder: str | Path) -> str:
    """One digest for a whole asset folder (from its card's file digests): the model identity used by caches."""
    card = read_card(folder)
    h = hashlib.sha256()
    for rel in sorted(card.get("files", {})):
        h.update(rel.encode())
        h.update(card["files"][rel]["sha256"].encode())
    return h.hexdigest()


def manifest() -> dict[str, dict]:
    """All bundled asset cards by name."""
    out = {}
    root = models_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / CARD).is_file():
                out[d.name] = read_card(d)
    return out


def status() -> list[dict]:
    """One row per bundled asset: name, kind, size in bytes and whether every sha256 matches. A folder whose card
    is missing or unreadable is listed as BAD too (it would otherwise vanish from the list)."""
    rows = []
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(".checkpoint") and ".previous-" not in d.name:
            if not (d / CARD).is_file():
                size = sum(p.stat().st_size for p in _payload_files(d))
                rows.append({"name": d.name, "kind": "?", "bytes": size,
                             "sha256": f"BAD: no {CARD}; {restore_hint(d / CARD, d.name)}"})
    for name, card in manifest().items():
        folder = models_dir() / name
        try:
            verify(folder)
            ok = "ok"
        except AssetError as e:
            ok = f"BAD: {e}"
        size = sum(m["bytes"] for m in card.get("files", {}).values())
        rows.append({"name": name, "kind": card.get("kind", "?"), "bytes": size, "sha256": ok})
    return sorted(rows, key=lambda r: r["name"])


# ---------------------------------------------------------------------------------------------------------
# optional downloads from the Hugging Face Hub (models and data sets)
# ---------------------------------------------------------------------------------------------------------
def hub_unavailable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the Hugging Face Hub can be used now, else why not (HF_HUB_OFFLINE, or no answer in ``timeout`` s).

    The one check behind every optional download (data sets in :func:`companion.data.hub_dataset`, models in
    :func:`companion.models.from_hub`), so that offline they fail fast with a reason instead of hanging.
    """
    from huggingface_hub import constants  # optional: only a download needs it

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return _hub_reachable(constants.ENDPOINT, timeout)


def hub_offline() -> bool:
    """Whether ``$HF_HUB_OFFLINE`` turns the Hub off (the values huggingface_hub reads as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache() -> str:
    """Where Hub downloads are kept (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_reachable(endpoint: str, timeout: float) -> str | None:
    """None when ``endpoint`` answers within ``timeout`` seconds, else the reason it does not."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return None
    except Exception as e:  # URLError, timeouts, DNS failures: all mean "not reachable now"
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"
