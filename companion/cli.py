"""The ``companion`` command: ``lab``, ``run-notebooks``, ``info``, ``train``, ``bench``.

Every command-line part of the companion lives here; the work itself is done by the modules it calls
(:mod:`companion.recipes` for ``train``, :mod:`companion.bench` for ``bench``). Every sub-command has
``--help``. Problems the user can fix (a missing folder, a busy port, a device that is not there) end with one
line naming the problem and the fix, and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

from . import __version__, assets, bench, book, diagrams, implement, recipes, sharding
from .device import DeviceError, accelerator_summary, describe, signals_interrupt
from .errors import ModelError
from .features import KIND as FEATURES_KIND
from .models import load
from .oracle import toy_mixture
from .orders import convergence_order
from .offline import export_html, pre_save_hook, static_view  # noqa: F401  (static_view: used by tests and the book)
from .plots import html_report
from .provenance import device_identity, machine, versions
from .train import TRAIN_THREADS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NOTEBOOKS = assets.notebooks_dir()  # the installed package's copy, or notebooks/ of a source checkout


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- info
def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def info_dict(device: str | None = None) -> dict:
    packages = ["torch", "diffusers", "torchmetrics", "numpy", "scipy", "pandas", "plotly", "ipywidgets",
                "anywidget", "jupyterlab", "nbval", "scikit-learn", "scikit-image"]
    return {
        "companion": __version__,
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in packages},
        **describe(device),
        "hub_cache": assets.hub_cache(),
        "hub_offline": assets.hub_offline(),
        "notebooks_dir": str(assets.notebooks_dir()),
        "assets_dir": str(assets.assets_dir()),
        "assets": assets.status(),
    }


def cmd_info(args) -> int:
    info = info_dict(args.device)
    bad = [r for r in info["assets"] if r["sha256"] != "ok"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if bad else 0
    print(f"companion     {info['companion']}")
    print(f"python        {info['python']}")
    for k, v in info["versions"].items():
        print(f"{k:<14}{v}")
    print(f"device        {info['device']}  (cuda available: {info['cuda_available']}; override with --device or $COMPANION_DEVICE)")
    print(f"accelerator   {accelerator_summary(info)}")
    print(f"threads       {info['torch_threads']} torch threads, {info['cpu_count']} CPUs")
    offline = "on: downloads are refused" if info["hub_offline"] else "off: downloads allowed when the network is there"
    print(f"hub cache     {info['hub_cache']}  (HF_HUB_OFFLINE {offline})")
    print(f"notebooks     {info['notebooks_dir']}")
    print(f"assets        {info['assets_dir']}")
    if not info["assets"]:
        print("              (no bundled models found)")
    for row in info["assets"]:
        print(f"  {row['name']:<22}{row['kind']:<18}{row['bytes'] / 1e6:7.2f} MB  sha256 {row['sha256']}")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- lab
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_lab_overrides() -> None:
    """Silence JupyterLab's news/update pop-ups (they try the network and cover the notebook)."""
    settings = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    path = settings / "overrides.json"
    want = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}
    try:
        current = json.loads(path.read_text()) if path.is_file() else {}
        if all(current.get(k) == v for k, v in want.items()):
            return
        settings.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**current, **want}, indent=2))
    except OSError:
        pass  # read-only environment: the pop-up is cosmetic


def lab_command(notebooks: Path, port: int) -> list[str]:
    """The JupyterLab server's command line. The token is not on it (any local user can read a process's
    arguments): the server reads it from ``$JUPYTER_TOKEN`` (see :func:`lab_env`)."""
    return [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={notebooks}",
        # saved notebooks keep the panels' static faces, not widget views that need the (gone) kernel on reopening
        "--FileContentsManager.pre_save_hook=companion.offline.pre_save_hook",
    ] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])  # containers often run as root


def lab_threads(cpu_count: int | None = None) -> int:
    """Torch threads for a kernel in a live session: every core but one, which the browser and the server need.

    Why: a kernel sized to the machine while JupyterLab sits idle takes every core, and then competes with the
    browser drawing its outputs and with the panels' background work; on the 2-core machine a panel's first run
    took 1.9-2.4 s with two threads and 0.54 s with one, and a timed self-check lost its NFE proportionality.
    """
    return max(1, (cpu_count if cpu_count is not None else os.cpu_count() or 1) - 1)


def lab_env(token: str, environ: dict | None = None) -> dict:
    """The server's (and so each kernel's) environment: the token, and the kernel's torch threads unless the
    user chose them already (``$COMPANION_THREADS`` or ``$OMP_NUM_THREADS``)."""
    env = dict(os.environ if environ is None else environ, JUPYTER_TOKEN=token)
    if not env.get("COMPANION_THREADS") and not env.get("OMP_NUM_THREADS"):
        env["COMPANION_THREADS"] = str(lab_threads())
    return env


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server started in its own session: SIGTERM to its whole process group (JupyterLab shuts its kernels
    down), SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def cmd_lab(args) -> int:
    notebooks = Path(args.notebooks).resolve()
    if not notebooks.is_dir():
        raise CliError(f"notebooks folder {notebooks} does not exist; pass --notebooks DIR or run from the repository root")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be a TCP port in [0, 65535] (0: a free one), got {args.port}")
    port = args.port or free_port()
    if not _port_free(port):
        raise CliError(f"port {port} on 127.0.0.1 is already in use; pass another --port (or 0 for a free one)")
    token = args.token or secrets.token_hex(16)
    _write_lab_overrides()
    page = f"lab/tree/{args.open}" if args.open else "lab"
    if args.open and not (notebooks / args.open).is_file():
        raise CliError(f"notebook {args.open!r} not found in {notebooks}")

    with signals_interrupt():  # any of Ctrl-C, SIGTERM, SIGHUP: take the server down with us
        proc = subprocess.Popen(lab_command(notebooks, port), env=lab_env(token), start_new_session=True)
        try:
            print(f"JupyterLab on http://127.0.0.1:{port}/{page}?token={token}", flush=True)
            print(f"(server PID {proc.pid}; stop with Ctrl-C)", flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_group(proc)


# ----------------------------------------------------------------------------- run-notebooks
def find_notebooks(paths: list[str]) -> list[Path]:
    if not paths:
        paths = [str(DEFAULT_NOTEBOOKS)]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.glob("*.ipynb") if not q.name.startswith("_"))
        elif p.is_file() and p.suffix == ".ipynb":
            out.append(p)
        else:
            raise CliError(f"{p} is neither a notebook nor a folder of notebooks")
    if not out:
        raise CliError(f"no notebooks found in {', '.join(paths)}")
    return out


def execute_notebook(path: Path, timeout: int = 600, clients: list | None = None):
    """Execute a notebook in its own folder; returns the executed notebook (the file is left untouched).
    ``clients``: a list the notebook's client is appended to, so a caller that is interrupted can stop its kernel."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    if clients is not None:
        clients.append(client)
    client.execute()
    return nb


def _kill_kernel(client, timeout: float = 10.0) -> None:
    """Stop the kernel of a notebook client from another thread: SIGTERM to its process, SIGKILL if it is still
    there after ``timeout`` seconds (the client's own event loop then sees a dead kernel and returns)."""
    process = getattr(getattr(getattr(client, "km", None), "provisioner", None), "process", None)
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def execute_interruptibly(path: Path, timeout: int = 600):
    """:func:`execute_notebook` on a worker thread, so that Ctrl-C, SIGTERM and SIGHUP reach the caller.

    Why: on the main thread nbclient takes SIGINT and SIGTERM over while a notebook runs, shuts that kernel down and
    lets the caller carry on with the next notebook, so a stopped run did not stop. Here the caller's handler raises
    KeyboardInterrupt while it waits; the notebook's kernel is stopped and the interruption goes on up."""
    import threading

    clients: list = []
    box: dict = {}

    def work():
        try:
            box["nb"] = execute_notebook(path, timeout=timeout, clients=clients)
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    worker = threading.Thread(target=work, name=f"run-notebooks {path.name}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        for client in clients:
            _kill_kernel(client)
        worker.join(30)
        raise
    if "error" in box:
        raise box["error"]
    return box["nb"]


CHECK_MARK = "NBVAL_CHECK_OUTPUT"  # nbval's comment marker (still honoured)
CHECK_TAG = "nbval-check-output"  # nbval's cell tag: keeps the marker out of the code a student reads


def is_checked(cell) -> bool:
    """Whether CI compares this code cell's output (nbval's ``nbval-check-output`` tag, or the comment marker)."""
    return CHECK_TAG in cell.get("metadata", {}).get("tags", []) or CHECK_MARK in cell.source


def store_checked_outputs(nb, path: Path) -> None:
    """Write ``nb`` to ``path`` keeping only the outputs CI compares (cells tagged ``nbval-check-output``).

    Every other output, execution count and the widget state are dropped: they hold volatile ids, timings
    and megabytes of plotly.js, and the chapters are stored clean.
    """
    import nbformat

    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if is_checked(cell):
            # nbval compares only cells that were run: a stored output needs an execution count
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = count
        else:
            cell.execution_count = None
            cell.outputs = []
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_summary(exc: BaseException, timeout: int) -> str:
    """One plain line saying why a notebook failed: a timed-out cell by its limit, an error by its last message
    line (no colour codes, no separator rules)."""
    if type(exc).__name__ == "CellTimeoutError":
        return f"FAILED: a cell ran longer than {timeout} s (raise --timeout, or make the cell faster)"
    lines = [ANSI.sub("", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("-=~^ ")]
    return f"FAILED: {type(exc).__name__}: {lines[-1][:200] if lines else ''}".rstrip(": ")


def _run_each(bar, args, rows: list, html_dir, before) -> str | None:
    """Execute the notebooks in turn, appending (name, seconds, status, html) to ``rows``; returns the name of the
    signal that interrupted the run (the notebook it stopped is not recorded and its kernel is stopped), or None."""
    for nb_path in bar:
        bar.set_postfix_str(nb_path.name)
        cold_dir = None
        if args.cold:  # each chapter starts from its own empty cache (sweeps and references): a newcomer's first run
            cold_dir = tempfile.TemporaryDirectory(prefix=f"companion-cold-{nb_path.stem}-")
            os.environ[bench.CACHE_ENV] = cold_dir.name  # inherited by the notebook's kernel
        t0 = time.perf_counter()
        status = "ok"
        try:
            nb = execute_interruptibly(nb_path, timeout=args.timeout)
        except KeyboardInterrupt as e:  # the finished notebooks are kept and reported; this one is not recorded
            print(f"\n{nb_path.name}: interrupted ({e or 'SIGINT'}) after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            return str(e) or "SIGINT"
        except Exception as e:  # report and continue with the next notebook
            status, nb = failure_summary(e, args.timeout), None
        finally:
            dt = time.perf_counter() - t0
            if cold_dir is not None:
                cold_dir.cleanup()
                if before is None:
                    os.environ.pop(bench.CACHE_ENV, None)
                else:
                    os.environ[bench.CACHE_ENV] = before
        out = ""
        if html_dir and nb is not None:
            body = export_html(nb)
            target = html_dir / (nb_path.stem + ".html")
            target.write_text(body, encoding="utf-8")
            out = str(target)
        if args.store_checked_outputs and nb is not None:
            store_checked_outputs(nb, nb_path)
        rows.append((nb_path.name, dt, status, out))
    return None


def cmd_run_notebooks(args) -> int:
    from tqdm import tqdm

    record = Path(args.record).resolve() if args.record else None
    if record is not None and record.suffix != ".json":
        raise CliError(f"--record {args.record}: give a .json file to write the run times to")
    notebooks = find_notebooks(args.paths)
    html_dir = Path(args.html).resolve() if args.html else None
    if html_dir:
        if html_dir.exists() and not html_dir.is_dir():
            raise CliError(f"--html {args.html} is a file; give a folder for the HTML reports")
        html_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(notebooks, desc="notebooks", unit="nb")
    before = os.environ.get(bench.CACHE_ENV)

    with signals_interrupt():  # the running notebook's kernel is stopped and the finished ones are reported
        interrupted = _run_each(bar, args, rows, html_dir, before)
    failed = sum(1 for r in rows if r[2] != "ok")
    if interrupted and not rows:
        print(f"\ninterrupted ({interrupted}) before any notebook finished; nothing recorded", file=sys.stderr)
        return 130
    width = max(len(r[0]) for r in rows)
    print(f"\n{'notebook':<{width}}  {'seconds':>8}  status")
    for name, dt, status, _ in rows:
        print(f"{name:<{width}}  {dt:8.1f}  {status}")
    print(f"{'total':<{width}}  {sum(r[1] for r in rows):8.1f}")
    for name, _, _, out in rows:
        if out:
            print(f"HTML report: {out}")
    if record is not None:
        if interrupted:  # the finished notebooks' times are kept beside the record, which stays as it was
            record = record.with_suffix(".interrupted.json")
        write_times(record, rows, cold=bool(args.cold), timeout=args.timeout)
        print(f"run times written to {record}" + (" (the notebooks that finished)" if interrupted else ""))
    if interrupted:
        print(f"interrupted ({interrupted}): {len(rows)} of {len(notebooks)} notebooks finished", file=sys.stderr)
        return 130
    return 1 if failed else 0


def write_times(path: Path, rows, *, cold: bool, timeout: int) -> None:
    """The chapter run-time result file: each notebook's seconds and status, with the machine, threads and
    library versions that produced them (README figures cite this file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "companion run-notebooks " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "companion run-notebooks",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "versions": versions(),
           "thread_settings": {k: os.environ.get(k) for k in ("COMPANION_THREADS", "OMP_NUM_THREADS")},
           "cold_cache": cold, "load_average_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None, "cell_timeout_s": timeout,
           "notebooks": [{"notebook": name, "seconds": round(dt, 1), "status": status} for name, dt, status, _ in rows],
           "total_seconds": round(sum(r[1] for r in rows), 1)}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- student-notebooks
def cmd_student_notebooks(args) -> int:
    """Write the student version of each notebook into ``--out``: solution blocks of ``implement-it`` cells
    replaced by a stub (:func:`companion.implement.student_notebook`), outputs cleared."""
    import nbformat

    notebooks = find_notebooks(args.paths)
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out} is a file; give a folder for the student notebooks")
    sources = {p.resolve().parent for p in notebooks}
    if out in sources:
        raise CliError(f"--out {args.out} is where the solution notebooks are; give another folder (they would be overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        try:
            student = implement.student_notebook(nb)
        except ValueError as e:
            raise CliError(f"{path.name}: {e}") from None
        nbformat.validate(student)
        nbformat.write(student, out / path.name)
        stripped = len(implement.solution_lines(nb))
        print(f"{path.name}: {stripped} solution lines replaced by stubs" if stripped else f"{path.name}: no implement-it cells, outputs cleared")
    print(f"student notebooks written to {out}")
    return 0


# ----------------------------------------------------------------------------- book
BOOK_RECORD = ROOT / "benchmarks" / "results" / "book_times.json"


def cmd_book(args) -> int:
    """Execute the chapters into the build folder and build the static site (see :mod:`companion.book`)."""
    try:
        with signals_interrupt():  # the running chapter's kernel is stopped and no site is built
            chapters = book.select_chapters(args.chapters, Path(args.notebooks))
            doc = book.build(Path(args.out), chapters, execute=lambda p: execute_interruptibly(p, timeout=args.timeout),
                             summarise=lambda e: failure_summary(e, args.timeout), progress=lambda m: print(m, flush=True))
    except book.BookError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}): the book was not built", file=sys.stderr)
        return 130
    rows = doc["chapters"]
    width = max(len(r["chapter"]) for r in rows)
    print(f"\n{'chapter':<{width}}  {'execute s':>9}  {'build s':>7}  status")
    for r in rows:
        print(f"{r['chapter']:<{width}}  {r['execute_s']:9.1f}  {r['build_s']:7.2f}  {r['status']}")
    print(f"other pages, search index, static files: {sum(doc['other_pages'].values()):.2f} s")
    print(f"total {doc['total_seconds']:.1f} s (execute {doc['execute_seconds']:.1f} s, build {doc['build_seconds']:.1f} s); "
          f"{doc['sphinx_warnings']} Sphinx warning(s); 1-min load at start, end: {doc['load_average_1m_at_start_and_end']}")
    print(f"site: {doc['index']}\ntimes: {Path(args.out).resolve() / 'book_times.json'}")
    if doc["external_references"]:
        print("error: pages load from another host:\n  " + "\n  ".join(doc["external_references"]), file=sys.stderr)
    if args.record:
        record = Path(args.record)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**doc, "command": "companion book " + " ".join(sys.argv[2:])}, indent=1) + "\n",
                          encoding="utf-8")
        print(f"times recorded in {record}")
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed or doc["external_references"] else 0


# ----------------------------------------------------------------------------- diagrams
def cmd_diagrams(args) -> int:
    """Draw the chapters' diagrams into ``--out`` (default ``assets/diagrams/``); ``--check``: only say which
    committed files differ from what the code draws (exit 1 if any)."""
    out = Path(args.out) if args.out else diagrams.diagrams_dir()
    if args.check:
        stale = diagrams.stale(out)
        for name in stale:
            print(f"{out / name}: differs from what companion.diagrams draws; run `companion diagrams`")
        if not stale:
            print(f"{len(diagrams.DIAGRAMS)} diagrams in {out} are up to date")
        return 1 if stale else 0
    for path in diagrams.write_all(out):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


# ----------------------------------------------------------------------------- train
def add_train(subparsers) -> argparse.ArgumentParser:
    """Add ``companion train NAME [--steps N] [--out DIR] [--resume] [--seed S]`` and ``companion train --list``.

    The sub-command's handler is stored as ``func`` and returns an int exit code.
    """
    p = subparsers.add_parser("train", help="train a bundled model from its recipe",
                              description="Train a bundled model (or a group of them) from its recipe: companion train NAME.")
    p.add_argument("name", nargs="?", help=f"recipe name: {', '.join(recipes.RECIPES)}")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/NAME, or $COMPANION_RUNS/NAME)")
    p.add_argument("--install", action="store_true",
                   help="write into the bundled model's folder (assets/models/NAME), replacing the bundled model")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint and output instead of keeping them as *.previous-<time>")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads for torch (default {TRAIN_THREADS}; $COMPANION_TRAIN_THREADS); use all cores on an idle machine")
    p.add_argument("--no-measure", action="store_true", help="skip the quality measurement")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    if args.list or not args.name:
        for r in recipes.RECIPES.values():
            print(f"{r.name:18s} {r.steps:6d} steps  {r.description}")
        for g, members in recipes.GROUPS.items():
            print(f"{g:18s} {'group':>6s}        runs {', '.join(members)} in order")
        return 0 if args.list else 2
    if args.name not in recipes.RECIPES and args.name not in recipes.GROUPS:
        print(f"unknown recipe {args.name!r}; valid recipes: {', '.join([*recipes.RECIPES, *recipes.GROUPS])}", file=sys.stderr)
        return 2
    try:
        if args.name in recipes.GROUPS:
            outs = recipes.run_group(args.name, steps=args.steps, out_dir=args.out, resume=args.resume, seed=args.seed,
                                     measure=not args.no_measure, threads=args.threads, install=args.install,
                                     keep=not args.overwrite)
        else:
            outs = [recipes.run_recipe(args.name, steps=args.steps, out=args.out, resume=args.resume, seed=args.seed,
                                       measure=not args.no_measure, threads=args.threads, install=args.install,
                                       keep=not args.overwrite)]
    except (FileNotFoundError, ValueError, ModelError, assets.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # train.Interrupted: the checkpoint is saved; say where and how to go on
        print(f"\n{e}", file=sys.stderr)
        return 130
    for out in outs:
        card = assets.read_card(out)
        keys = (("recipe", "steps", "train_time_s", "final_loss", "test_accuracy") if card.get("kind") == FEATURES_KIND
                else ("recipe", "training_steps", "training_seconds", "final_loss", "quality"))
        print(json.dumps({k: card.get(k) for k in keys}, indent=2))
        print(f"saved to {out}")
    return 0


# ----------------------------------------------------------------------------- bench
def _csv(text: str, cast=str, what: str = "value") -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s, got {text!r}")
    out = []
    for t in items:
        if cast is not str and t.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(cast(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{t!r} is not a valid {what}") from None
    return out


def add_bench(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (:func:`companion.sharding.distributed_sweep` from the command line, in one process or under
    ``accelerate launch``) and ``bench merge``; their handlers return an exit code."""
    p = subparsers.add_parser("bench", help="speed/quality sweep of samplers on bundled models (CSV + HTML report)",
                              description="Sample with every model x sampler x step count, measure speed and quality, "
                                          "write bench.csv and an offline interactive report.html. Under "
                                          "`accelerate launch` (or torchrun) the runs are shared between the processes.")
    p.add_argument("--model", action="append", default=None, type=lambda s: _csv(s, str, "model"),
                   help="bundled model name or asset folder (see `companion info`); comma-separated or repeated for several")
    p.add_argument("--samplers", type=lambda s: _csv(s, str, "sampler"), help="comma-separated, e.g. ddim,dpmpp_2m")
    p.add_argument("--steps", type=lambda s: _csv(s, int, "step count"), help="comma-separated, e.g. 5,10,20,50")
    p.add_argument("--guidance", type=lambda s: _csv(s, float, "guidance scale"), default=[None],
                   help="comma-separated classifier-free guidance scales ('none' = unguided)")
    p.add_argument("--spacing", type=lambda s: _csv(s, str, "spacing"), default=None,
                   help="comma-separated timestep spacings to compare (default: each sampler's own)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image pipelines: a prompt (repeat for several; each is its own run)")
    p.add_argument("--negative-prompt", default=None, help="text-to-image pipelines: the negative prompt of every run")
    p.add_argument("--clip", default=None,
                   help=f"CLIP (Hub id or folder) of the clip_score metric (default {bench.M.CLIP_DEFAULT}; the hub extra)")
    p.add_argument("--seeds", type=lambda s: _csv(s, int, "seed"), default=[0], help="comma-separated seeds")
    p.add_argument("--n-samples", type=int, default=bench.DEFAULT_N_SAMPLES,
                   help=f"samples per run (default {bench.DEFAULT_N_SAMPLES})")
    p.add_argument("--metrics", type=lambda s: _csv(s, str, "metric"), default=list(bench.DEFAULT_METRICS),
                   help=f"comma-separated, from {','.join(bench.ALL_METRICS)}")
    p.add_argument("--cache-dir", default=None, help="run cache, writable by every process (default: <out>/cache)")
    p.add_argument("--out", help="output folder for bench.csv, report.html and log/rank-<i>.jsonl")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (under a launcher: cuda = each process's own GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_action", metavar="merge")
    m = sub.add_parser("merge", help="combine the run caches of several machines into one folder, CSV and report",
                       description="Combine sweep caches (cache folders or `bench --out` folders); refuses entries "
                                   "that disagree, naming the key field or quality column that differs.")
    m.add_argument("folders", nargs="+", metavar="DIR", help="cache folders or bench output folders")
    m.add_argument("--out", dest="merge_out", metavar="DIR", required=True, help="output folder: cache/, bench.csv, report.html")
    m.set_defaults(func=cmd_bench_merge)
    return p


def _write_bench(df: pd.DataFrame, out: Path, title: str) -> None:
    """bench.csv (written whole, then renamed into place) and report.html."""
    tmp = out / f".bench.csv.{os.getpid()}.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "bench.csv")
    html_report(df, out / "report.html", title=title)


def bench_modes(spacings, prompts, negative_prompt) -> list[dict]:
    """The sweep's modes: every spacing x every prompt (a pipeline's prompt is a ``sample`` argument like spacing)."""
    if negative_prompt is not None and not prompts:
        raise ValueError(f"--negative-prompt {negative_prompt!r} needs a --prompt")
    for p in prompts or ():
        if not p.strip():
            raise ValueError(f"--prompt {p!r} is empty; give the text to draw")
    texts = [{}] if not prompts else [
        {"prompt": p, **({} if negative_prompt is None else {"negative_prompt": negative_prompt})} for p in prompts]
    spaced = [{}] if not spacings else [{"spacing": s} for s in spacings]
    return [dict(a, **b) for a in spaced for b in texts]


def cmd_bench(args) -> int:
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "samplers", "steps", "out") if not getattr(args, k)]
    if missing:
        print(f"error: companion bench needs {', '.join(missing)} (or `companion bench merge DIR... --out DIR`)", file=sys.stderr)
        return 2
    out = Path(args.out)
    models = [m for group in args.model for m in group]
    try:
        state = sharding.state_for(args.device)
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("bench.csv", "report.html"):  # a failed sweep must not leave an older table that looks current
                (out / stale).unlink(missing_ok=True)
        state.wait_for_everyone()
    except OSError as e:
        print(f"error: cannot create output folder {out}: {e}", file=sys.stderr)
        return 2
    except (sharding.LaunchError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        modes = bench_modes(args.spacing, args.prompt, args.negative_prompt)
        t0 = time.perf_counter()
        df = sharding.distributed_sweep(models, args.samplers, args.steps, args.guidance, modes, args.seeds,
                                        n_samples=args.n_samples, metrics=args.metrics, cache_dir=args.cache_dir or out / "cache",
                                        device=args.device, log_dir=out / "log", progress=not args.no_progress, state=state,
                                        clip=args.clip)
    except (ModelError, ValueError, TypeError, sharding.LaunchError, DeviceError) as e:
        print(f"error{f' (rank {state.process_index})' if state.num_processes > 1 else ''}: {e}", file=sys.stderr)
        return 2
    if df is None:  # not the main rank: it wrote its runs to the cache and its log; the main rank writes the table
        return 0
    _write_bench(df, out, title=f"companion bench: {', '.join(models)}")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(bench.summary_table(df).to_string(index=False))
    print(f"\n{len(df)} runs ({int(df['cached'].sum())} from cache) on {state.num_processes} process(es) in "
          f"{time.perf_counter() - t0:.1f} s; wrote {out / 'bench.csv'} and {out / 'report.html'}")
    return 0


def add_quality(subparsers) -> argparse.ArgumentParser:
    """Add ``quality``: :func:`companion.sharding.sharded_quality` from the command line, in one process or under
    ``accelerate launch`` (the chunks of the sample set dealt to the processes, the metrics computed once)."""
    p = subparsers.add_parser("quality", help="image metrics of N samples of one model and sampler, drawn by every process of a launch",
                              description="Draw N samples in chunks (chunk c always from seed (seed, c), so the samples are the "
                                          "same whatever the number of processes), extract features on each process, gather "
                                          "them on the main process, compute each metric once and write a JSON file. Under "
                                          "`accelerate launch` (or torchrun) the chunks are shared between the processes.")
    p.add_argument("--model", required=True, help="bundled model name or asset folder")
    p.add_argument("--sampler", required=True, help="registry sampler, e.g. dpmpp_2m")
    p.add_argument("--steps", type=int, required=True, help="sampler steps")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample set (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: unguided)")
    p.add_argument("--metrics", type=lambda s: _csv(s, str, "metric"), default=["fd", "prdc", "class_accuracy"],
                   help="comma-separated image metrics (default fd,prdc,class_accuracy)")
    p.add_argument("--chunk", type=int, default=sharding.CHUNK,
                   help=f"samples per chunk (default {sharding.CHUNK}); part of what the samples are")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (under a launcher: cuda = each process's own GPU)")
    p.add_argument("--out", required=True, help="JSON file the main process writes")
    p.set_defaults(func=cmd_quality)
    return p


def cmd_quality(args) -> int:
    t0 = time.perf_counter()
    state = None
    try:
        state = sharding.state_for(args.device)
        device = sharding.rank_device(state, args.device)
        model = load(args.model, device=device)
        kw = {} if args.guidance is None else {"guidance": args.guidance}
        got = sharding.sharded_quality(model, args.sampler, args.steps, args.n, args.seed, metrics=tuple(args.metrics),
                                       state=state, chunk=args.chunk, **kw)
    except (ModelError, ValueError, TypeError, KeyError, sharding.LaunchError, DeviceError) as e:
        rank = f" (rank {state.process_index})" if state is not None and state.num_processes > 1 else ""
        print(f"error{rank}: {e}", file=sys.stderr)
        return 2
    if got is None:  # not the main process: its features went to the main process
        return 0
    result = {"model": model.name, "sampler": args.sampler, "steps": args.steps, "n": args.n, "seed": args.seed,
              "chunk": args.chunk, "guidance": args.guidance, "processes": state.num_processes, **device_identity(device),
              "seconds": time.perf_counter() - t0, "measurements": {k: m.as_dict() for k, m in got["measurements"].items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)  # written whole: never a partial file
    for m in got["measurements"].values():
        print(m)
    print(f"{args.n} samples on {state.num_processes} process(es) in {result['seconds']:.1f} s; wrote {out}")
    return 0


def cmd_bench_merge(args) -> int:
    out = Path(args.merge_out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        df = bench.merge_caches(args.folders, out / "cache")
    except (ValueError, OSError) as e:  # CacheConflictError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no sweep rows in {', '.join(args.folders)}", file=sys.stderr)
        return 2
    _write_bench(df, out, title=f"companion bench merge: {len(args.folders)} caches")
    devices = sorted(set(df["device_name"].astype(str))) if "device_name" in df else []
    print(f"{len(df)} rows from {len(args.folders)} caches ({len(devices)} device(s): {'; '.join(devices)}); "
          f"wrote {out / 'cache'}, {out / 'bench.csv'} and {out / 'report.html'}")
    return 0


def add_order(subparsers) -> argparse.ArgumentParser:
    """Add ``order``: measured convergence orders of deterministic samplers on an exact-score Gaussian mixture."""
    p = subparsers.add_parser("order", help="measured convergence order of deterministic samplers on a Gaussian mixture",
                              description="Error inside the trajectory against a DOP853 reference from the same noise, "
                                          "and the fitted order (see docs/dpmpp-3m-order.md).")
    p.add_argument("samplers", nargs="+", help="registry names, e.g. ddim dpmpp_2m dpmpp_3m dpmpp_3m_corrected")
    p.add_argument("--steps", type=lambda s: _csv(s, int, "step count"), default=[200, 250, 500, 1000],
                   help="comma-separated step counts that divide 1000 (default 200,250,500,1000)")
    p.add_argument("--t-stop", type=int, default=199, help="timestep inside the trajectory where the error is measured")
    p.add_argument("--dim", type=lambda s: _csv(s, int, "dimension"), default=[1, 4, 4],
                   help="sample shape of the mixture, e.g. 2 or 1,8,8 (default 1,4,4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_order)
    return p


def cmd_order(args) -> int:
    model = toy_mixture(tuple(args.dim), seed=args.seed)
    rows = []
    try:
        for name in args.samplers:
            r = convergence_order(name, model=model, steps=args.steps, t_stop=args.t_stop, seed=args.seed, batch=args.batch)
            rows.append(r)
            if not args.json:
                errs = "  ".join(f"N={n}: {e:.3e}" for n, e in zip(r["steps"], r["errors"]))
                print(f"{name:22s} order {r['order']:.2f}   {errs}", flush=True)
    except ValueError as e:  # unknown or stochastic sampler, a grid that misses t_stop
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="companion", description="Efficient Diffusion Companion: measured, interactive chapters on efficient diffusion models.")
    p.add_argument("--version", action="version", version=f"companion {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="versions, chosen device, accelerator, threads, Hub cache and offline mode, bundled assets and their sha256 status")
    s.add_argument("--device", default=None, help="device to check (auto, cpu, cuda, cuda:N, mps); default: $COMPANION_DEVICE or auto")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("lab", help="start JupyterLab on 127.0.0.1 and print its URL with the token")
    s.add_argument("--notebooks", default=str(DEFAULT_NOTEBOOKS), help="folder to serve (default: notebooks/)")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    s.add_argument("--token", default=None, help="access token (default: a random one)")
    s.add_argument("--open", default=None, metavar="NOTEBOOK", help="notebook to open, e.g. 00_tour.ipynb")
    s.set_defaults(func=cmd_lab)

    s = sub.add_parser("run-notebooks", help="execute notebooks headless, with a progress bar and a time table")
    s.add_argument("paths", nargs="*", help="notebooks or folders (default: notebooks/)")
    s.add_argument("--html", default=None, metavar="DIR", help="write an HTML report of each executed notebook into DIR")
    s.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    s.add_argument("--store-checked-outputs", action="store_true",
                   help="write the outputs of cells tagged nbval-check-output back into the notebooks (all other outputs stripped)")
    s.add_argument("--record", default=None, metavar="FILE.json",
                   help="write each notebook's run time, status, machine and versions to FILE.json (e.g. benchmarks/results/chapter_times.json)")
    s.add_argument("--cold", action="store_true", help="run every notebook against an empty, temporary sweep cache (first-run times)")
    s.set_defaults(func=cmd_run_notebooks)

    s = sub.add_parser("student-notebooks", help="write the student versions of the notebooks: implement-it solutions replaced by stubs")
    s.add_argument("paths", nargs="*", help="notebooks or folders (default: notebooks/)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the student notebooks (not the notebooks' own folder)")
    s.set_defaults(func=cmd_student_notebooks)

    s = sub.add_parser("book", help="execute the chapters and build them as a static, offline site (Sphinx + MyST-NB)",
                       description="Execute every chapter (or those named) into the build folder, reusing the sweep "
                                   "cache, and build a static site: navigation in chapter order, the taxonomy, the "
                                   "glossary, instructor and GPU result pages, executed outputs, plotly figures, "
                                   "search. Nothing is loaded from the web. Needs the 'book' extra.")
    s.add_argument("--out", default="build/book", help="build folder (default build/book); the site is OUT/html/index.html")
    s.add_argument("--chapters", nargs="+", default=None, metavar="NAME", help="chapters to include, e.g. 00_tour 06_fast_solvers (default: all)")
    s.add_argument("--notebooks", default=str(DEFAULT_NOTEBOOKS), help="folder of the chapters (default: notebooks/)")
    s.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    s.add_argument("--record", nargs="?", const=str(BOOK_RECORD), default=None, metavar="FILE.json",
                   help="also write the times to FILE.json (default benchmarks/results/book_times.json)")
    s.set_defaults(func=cmd_book)

    s = sub.add_parser("diagrams", help="draw the chapters' diagrams (SVG) into assets/diagrams/, or --check that they are current")
    s.add_argument("--out", default=None, metavar="DIR", help="folder to write into (default: assets/diagrams/)")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs from what the code draws")
    s.set_defaults(func=cmd_diagrams)

    add_train(sub)
    add_bench(sub)
    add_quality(sub)
    add_order(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, DeviceError) as e:
        print(f"companion {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
