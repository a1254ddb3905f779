"""Install anywhere: one version source, the publishing files, the torch range, Binder and Colab set-up, and a wheel
that carries the bundled models and notebooks into a fresh virtual environment."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml

import companion
from companion import assets, cli
from test_foundation import _tracked_copy

ROOT = Path(__file__).resolve().parent.parent
TOUR = "00_tour.ipynb"


def _run_py():
    spec = importlib.util.spec_from_file_location("companion_run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- version and publishing files
def test_version_has_one_source_and_the_command_prints_it(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "companion.__version__"}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"companion {companion.__version__}"


def test_license_citation_and_changelog_match_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"] == {"text": "MIT"} and license_text.startswith("MIT License")
    assert "Copyright (c) 2026 The Efficient Diffusion Companion authors" in license_text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == companion.__version__ and cff["license"] == "MIT"
    survey = [r for r in cff["references"] if "arXiv:2210.09292" in {i["value"] for i in r["identifiers"]}]
    assert survey and [a["family-names"] for a in survey[0]["authors"]] == ["Ulhaq", "Akhtar"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(companion.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.MULTILINE)


# ----------------------------------------------------------------------------- torch: a range, and run.py's build in it
def test_run_py_keeps_a_torch_in_range_and_replaces_one_outside(monkeypatch):
    run = _run_py()
    monkeypatch.setattr(run, "PY", Path(sys.executable))  # this environment's torch stands in for .venv's
    assert run.torch_installed()
    monkeypatch.setattr(run, "torch_requirement", lambda: ">=99")
    assert not run.torch_installed()


def test_binder_installs_run_py_torch_on_cpu_then_the_package_as_a_wheel_would():
    post = (ROOT / "binder" / "postBuild").read_text()
    assert os.access(ROOT / "binder" / "postBuild", os.X_OK)
    assert re.search(r"^TORCH_VERSION=(\S+)$", post, re.MULTILINE).group(1) == _run_py().TORCH_VERSION
    install = [ln for ln in post.splitlines() if "pip install" in ln]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install[0] and "torch==" in install[0]
    assert install[1].rstrip().endswith("install --no-cache-dir .")  # not editable: the bundled files come with it
    assert (ROOT / "binder" / "runtime.txt").read_text().strip().startswith("python-3.")


# ----------------------------------------------------------------------------- Colab cell
def _colab_cell():
    nb = nbformat.read(ROOT / "notebooks" / TOUR, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].id == "colab-install", "the tour's first code cell is the Colab install"
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(code[0].source)


def _exec_colab_cell(monkeypatch, on_colab: bool, url: str = ""):
    calls = []

    class Shell:
        def run_line_magic(self, name, line):
            calls.append((name, line))

    modules = dict(sys.modules)
    if on_colab:
        modules["google.colab"] = type(sys)("google.colab")
    else:
        modules.pop("google.colab", None)
    monkeypatch.setattr(sys, "modules", modules)
    source = _colab_cell().replace('REPO_URL = ""', f"REPO_URL = {url!r}", 1)
    exec(compile(source, "colab-cell", "exec"), {"get_ipython": Shell})
    return calls


def test_colab_cell_does_nothing_outside_colab(monkeypatch):
    assert _exec_colab_cell(monkeypatch, on_colab=False) == []


def test_colab_cell_installs_from_the_repository_url_on_colab(monkeypatch):
    with pytest.raises(ValueError, match="REPO_URL is empty"):
        _exec_colab_cell(monkeypatch, on_colab=True)
    calls = _exec_colab_cell(monkeypatch, on_colab=True, url="https://example.org/companion.git")
    assert calls == [("pip", 'install --quiet "git+{REPO_URL}"')]  # IPython expands {REPO_URL} in the magic


# ----------------------------------------------------------------------------- where the data is found
def test_installed_package_reads_its_bundled_copy_and_a_checkout_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    assert assets.assets_dir() == ROOT / "assets" and assets.notebooks_dir() == ROOT / "notebooks"
    (tmp_path / "assets").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(assets, "BUNDLED_DIR", tmp_path)
    assert assets.assets_dir() == tmp_path / "assets" and assets.notebooks_dir() == tmp_path / "notebooks"
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / "mine"))
    assert assets.assets_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- the wheel in a fresh environment
def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, output captured; past ``timeout`` the whole group (a notebook's kernel
    too) is stopped and the test fails with the output so far."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.stop_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} ran longer than {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _fresh_venv(where: Path) -> Path:
    """A new venv that sees this environment's dependencies but not its companion: a .pth line adds this
    site-packages as a plain path, so its .pth files (the editable install's finder among them) are not run."""
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(where)], timeout=120).returncode == 0
    py = where / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=120).stdout.strip()
    (Path(purelib) / "_companion_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


PROBE = """import json, os, sys
import torch
import companion
from companion import assets, load, sample

m = load("digits-cond")
r = sample(m, sampler="ddim", steps=4, seed=0, batch=2, class_labels=torch.arange(2))
print(json.dumps({"file": companion.__file__, "python": sys.executable, "assets": str(assets.assets_dir()),
                  "shape": list(r.images.shape), "finite": bool(torch.isfinite(r.images).all()), "nfe": r.record.nfe,
                  "repo_on_path": any(os.path.isdir(p) and os.path.samefile(p, REPO) for p in sys.path if p)}))"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_in_a_fresh_venv_carries_models_and_notebooks_and_runs_them(tmp_path):
    src, dist, cwd = tmp_path / "src", tmp_path / "dist", tmp_path / "cwd"
    _tracked_copy(src)  # what a clone holds: no build/, checkpoints or runs/ from this tree
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(COMPANION_THREADS="1", HF_HUB_OFFLINE="1", COMPANION_CACHE=str(tmp_path / "cache"))
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
             timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = dist.glob("companion-*.whl")
    assert wheel.name.startswith(f"companion-{companion.__version__}-")

    # every file each bundled card lists, the chapters and the glossary they link to; nothing a training run left
    names = set(zipfile.ZipFile(wheel).namelist())
    for card_path in sorted((src / "assets" / "models").glob("*/companion.json")):
        card = json.loads(card_path.read_text())
        folder = f"companion/_bundled/assets/models/{card_path.parent.name}/"
        assert {folder + "companion.json", *(folder + rel for rel in card["files"])} <= names, card_path.parent.name
    assert {f"companion/_bundled/notebooks/{p.name}" for p in (src / "notebooks").glob("*.ipynb")} <= names
    assert {"companion/_bundled/docs/glossary.md", "companion/_bundled/assets/taxonomy.csv"} <= names
    assert {f"companion/_bundled/assets/diagrams/{p.name}" for p in (src / "assets" / "diagrams").glob("*.svg")} <= names
    assert not [n for n in names if ".previous-" in n or ".checkpoint/" in n]

    py = _fresh_venv(tmp_path / "venv")
    r = _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    shutil.rmtree(src)  # nothing may be read from the source tree from here on
    cwd.mkdir()
    command = tmp_path / "venv" / "bin" / "companion"
    env["PATH"] = f"{command.parent}{os.pathsep}{env.get('PATH', '')}"
    r = _run([str(command), "--version"], cwd=cwd, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == f"companion {companion.__version__}", r.stdout + r.stderr

    # The installed tour, cut before its long DDPM-1000 demonstration (the whole tour takes minutes on a loaded
    # 2-core CPU), plus a cell that loads digits-cond from the installed assets, samples a few steps and reports
    # where the kernel found the package: run by the installed `companion run-notebooks`.
    installed = _run([str(py), "-c", "from companion import assets; print(assets.notebooks_dir())"], cwd=cwd, timeout=300, env=env)
    notebooks = Path(installed.stdout.strip())
    assert notebooks.is_relative_to(tmp_path / "venv") and (notebooks / TOUR).is_file(), installed.stdout + installed.stderr
    nb = nbformat.read(notebooks / TOUR, as_version=4)
    cut = next(i for i, c in enumerate(nb.cells) if 'load("digits-cond")' in c.source)
    probe = nbformat.v4.new_code_cell(PROBE.replace("REPO", repr(str(ROOT))), metadata={"tags": ["nbval-check-output"]})
    nb.cells = nb.cells[:cut] + [probe]
    path = cwd / "installed_tour_start.ipynb"
    nbformat.write(nb, path)
    r = _run([str(command), "run-notebooks", str(path), "--store-checked-outputs"], cwd=cwd, timeout=500, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(nbformat.read(path, as_version=4).cells[-1].outputs[0]["text"])
    venv = tmp_path / "venv"
    assert Path(out["file"]).is_relative_to(venv) and Path(out["python"]).is_relative_to(venv), out
    assert Path(out["assets"]) == Path(out["file"]).parent / "_bundled" / "assets", out
    assert not out["repo_on_path"], out
    assert out["shape"][0] == 2 and out["finite"] and out["nfe"] == 4, out
