#!/usr/bin/env python3
"""Set up the companion in a local virtual environment, then start it or test it.

    python3 run.py             # set up, then open JupyterLab at the tour (headless: run the tour, write HTML)
    python3 run.py --headless  # set up, execute the tour notebook, write an HTML report, print where it is
    python3 run.py test        # set up (with test extras), then run the whole test suite

Only the standard library is used here, so this works with a bare ``python3`` (>= 3.10).
Set-up is idempotent: the environment lives in ``.venv/``, and installs are skipped while
``pyproject.toml`` is unchanged (a stamp file records its hash).

Torch is installed first and on purpose. pyproject asks for a range (``torch>=...``) so that a torch already
there (Colab's, a GPU image's) is kept; but with no torch at all, pip would satisfy that range with a multi-GB
CUDA build even on machines without an NVIDIA GPU. So when the environment has no torch in the range, this
script installs TORCH_VERSION itself: without a GPU the CPU build (from a local wheel folder when pip is
configured with one, otherwise from PyTorch's CPU index). The package install that follows then keeps it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_VERSION = "2.13.0"  # the build installed where no torch in pyproject's range is there (tested with it)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def say(msg: str) -> None:
    print(f"[companion] {msg}", flush=True)


def die(msg: str, code: int = 2) -> None:
    print(f"[companion] error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def pip(*args: str) -> None:
    cmd = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", *args]
    say(" ".join(["pip install", *args]))
    if subprocess.call(cmd) != 0:
        die(f"pip install {' '.join(args)} failed; see the messages above (network or registry problem?)")


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.call(
        ["nvidia-smi", "-L"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def local_cpu_wheel() -> bool:
    """True when pip's find-links already offer a CPU torch wheel of the pinned version."""
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
        dirs += [line.split("=", 1)[1].strip().strip("'\"") for line in out.splitlines() if "find-links" in line]
    except OSError:
        pass
    for d in dirs:
        p = Path(d.replace("file://", ""))
        if p.is_dir() and any(p.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
            return True
    return False


def torch_requirement() -> str:
    """pyproject's torch version range (e.g. ``>=2.4``): the one place the supported range is written."""
    m = re.search(r'^\s*"torch\s*([<>=!~][^";]*)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    if not m:
        die("pyproject.toml lists no versioned torch requirement")
    return m.group(1).replace(" ", "")


def torch_installed() -> bool:
    """True when the environment's torch imports and lies in pyproject's range (any build: CPU or CUDA)."""
    code = ("import sys, torch; from pip._vendor.packaging.specifiers import SpecifierSet; "
            "from pip._vendor.packaging.version import Version; "
            f"sys.exit(0 if Version(torch.__version__) in SpecifierSet({torch_requirement()!r}) else 1)")
    return subprocess.call([str(PY), "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def setup(extras: str) -> None:
    if sys.version_info < (3, 10):
        die(f"Python >= 3.10 is needed, this is {sys.version.split()[0]}")
    if not PY.exists():
        say(f"creating virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".companion-installed-{extras or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and torch_installed():
        say("environment up to date (.venv)")
        return
    if not torch_installed():
        if has_nvidia_gpu():
            pip(f"torch=={TORCH_VERSION}")
        elif local_cpu_wheel():
            pip(f"torch=={TORCH_VERSION}")
        else:
            pip(f"torch=={TORCH_VERSION}", "--index-url", TORCH_CPU_INDEX)
    pip("-e", f".[{extras}]" if extras else ".")
    stamp.write_text(digest)
    say("environment ready")


def in_ci_or_headless() -> bool:
    if os.environ.get("CI"):
        return True
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return True
    return False


def main(argv: list[str]) -> int:
    usage = "usage: python3 run.py [--headless] | python3 run.py test [pytest args...]"
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "test":
        setup("test")
        os.chdir(ROOT)
        return subprocess.call([str(PY), "-m", "pytest", *argv[1:]])
    unknown = [a for a in argv if a not in ("--headless", "--lab")]
    if unknown:
        die(f"unknown option {unknown[0]!r}; {usage}")
    setup("")
    companion = [str(PY), "-m", "companion"]
    headless = "--headless" in argv or ("--lab" not in argv and in_ci_or_headless())
    if headless:
        if "--headless" not in argv:
            say("no display (or CI) detected: running headless; pass --lab to start JupyterLab anyway")
        return subprocess.call([*companion, "run-notebooks", "notebooks/00_tour.ipynb", "--html", str(ROOT / "reports")])
    return subprocess.call([*companion, "lab", "--open", "00_tour.ipynb"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
