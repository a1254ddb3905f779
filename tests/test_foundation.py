"""The foundation: packaging, the set-up script, the ``companion`` command, device and seed handling."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from companion import device as dev

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "companion"]


def run_cli(*args, timeout=120, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


# ----------------------------------------------------------------------------- packaging
def _req_name(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(3).replace(" ", "")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = dict(_req_name(r) for r in py["dependencies"] + py["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {"pytorch": "torch"}
    conda_side = {}
    for dep in env["dependencies"]:
        name, spec = _req_name(re.sub(r"\s+#.*$", "", dep))
        if name in ("python", "pip"):
            continue
        conda_side[conda_names.get(name, name)] = spec
    assert conda_side == pip_side


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 run.py test" in readme
    assert "python3 run.py test" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_torch_is_a_lower_bound_that_run_py_satisfies():
    # a lower bound keeps a torch that is already installed (Colab, GPU images); run.py pre-installs a build in the
    # range (CPU without a GPU) so pip never has to pick one, which would be a multi-GB CUDA build
    import importlib.util

    from packaging.specifiers import SpecifierSet

    spec = importlib.util.spec_from_file_location("run", ROOT / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [d for d in deps if _req_name(d)[0] == "torch"]
    assert torch_req and _req_name(torch_req[0])[1].startswith(">=") and "<" not in torch_req[0]
    assert run.torch_requirement() == _req_name(torch_req[0])[1]
    assert run.TORCH_VERSION in SpecifierSet(run.torch_requirement())
    banned = {"torchvision", "torch-fidelity"}
    assert not banned & {_req_name(d)[0] for d in deps}
    assert not any("torchmetrics[" in d for d in deps)


# ----------------------------------------------------------------------------- device and seeds
def test_pick_device_order_and_override(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and dev._available("mps"):
        expected = "mps"
    assert dev.pick_device().type == expected
    assert dev.pick_device("cpu").type == "cpu"
    monkeypatch.setenv(dev.ENV_VAR, "cpu")
    assert dev.pick_device().type == "cpu"
    monkeypatch.setenv(dev.ENV_VAR, "tpu")
    with pytest.raises(dev.DeviceError, match="unknown device 'tpu'.*valid choices"):
        dev.pick_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_a_clear_error():
    with pytest.raises(dev.DeviceError, match="'cuda'.*not available.*available: cpu"):
        dev.pick_device("cuda")


def test_same_seed_same_noise_different_seed_different_noise():
    a = dev.randn((4, 3), 7)
    b = dev.randn((4, 3), 7)
    c = dev.randn((4, 3), 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="seed"):
        dev.generator(-1)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("sub", [[], ["info"], ["lab"], ["run-notebooks"], ["train"], ["bench"]])
def test_every_command_has_help(sub):
    r = run_cli(*sub, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: companion" in r.stdout


def test_train_lists_every_recipe_and_group():
    r = run_cli("train", "--list")
    assert r.returncode == 0, r.stderr
    for name in ("digits-cond", "shapes-sr32", "digits-design-base", "digits-pd-4", "digits-cd", "features-digits",
                 "digits-pd", "digits-design"):
        assert name in r.stdout, name
    r = run_cli("train", "digits-nope")
    assert r.returncode == 2 and "unknown recipe 'digits-nope'; valid recipes: digits-cond" in r.stderr


def test_unknown_option_is_refused():
    r = run_cli("info", "--frobnicate")
    assert r.returncode == 2
    assert "unrecognized arguments: --frobnicate" in r.stderr


def test_info_reports_versions_device_and_assets():
    r = run_cli("info", "--json")
    assert r.returncode in (0, 1), r.stderr
    info = json.loads(r.stdout)
    assert info["versions"]["torch"].startswith("2.")
    assert info["device"] in ("cpu", "cuda", "mps")
    assert info["torch_threads"] >= 1
    for row in info["assets"]:
        assert row["sha256"] == "ok", row


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_info_with_absent_device_fails_in_one_line():
    r = run_cli("info", "--device", "cuda")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "not available" in r.stderr


def test_lab_refuses_missing_folder_and_busy_port(tmp_path):
    r = run_cli("lab", "--notebooks", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("lab", "--port", str(port))
    assert r.returncode == 2 and f"port {port}" in r.stderr and "already in use" in r.stderr


def _status_within(url: str, seconds: float) -> int | None:
    """The HTTP status of ``url`` once it answers (the server needs a moment to start), or None."""
    deadline, status = time.time() + seconds, None
    while time.time() < deadline and status != 200:
        try:
            status = urllib.request.urlopen(url, timeout=5).status
        except OSError:
            time.sleep(0.5)
    return status


def test_lab_serves_jupyterlab_on_loopback():
    proc = subprocess.Popen([*CLI, "lab", "--port", "0", "--token", "t0ken"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=t0ken", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}/lab?token=t0ken"
        assert _status_within(url, 60) == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_lab_takes_its_server_down_on_any_signal_and_keeps_the_token_private(sig):
    proc = subprocess.Popen([*CLI, "lab", "--port", "0", "--token", "s3cret"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    server_pid = None
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+/lab\?token=s3cret)", proc.stdout.readline()).group(1)
        server_pid = int(re.search(r"server PID (\d+)", proc.stdout.readline()).group(1))
        cmdline = Path(f"/proc/{server_pid}/cmdline")
        if cmdline.exists():
            assert b"s3cret" not in cmdline.read_bytes()  # other local users can read the process list
        assert _status_within(url, 60) == 200
        os.kill(proc.pid, sig)  # the launcher alone, as a terminal closing or a process manager would
        assert proc.wait(timeout=30) == 0
        deadline = time.time() + 20
        while time.time() < deadline and _alive(server_pid):
            time.sleep(0.2)
        assert not _alive(server_pid), "the JupyterLab server outlived its launcher"
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)
    finally:
        for pid in (proc.pid, server_pid):
            if pid is not None and _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def test_lab_refuses_a_port_outside_the_tcp_range():
    r = run_cli("lab", "--port", "70000")
    assert r.returncode == 2 and "--port must be a TCP port in [0, 65535]" in r.stderr and "Traceback" not in r.stderr


def test_run_notebooks_writes_html_and_a_time_table(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), nbformat.v4.new_code_cell("print(6 * 7)")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    r = run_cli("run-notebooks", str(path), "--html", str(tmp_path / "html"), timeout=300)
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "html" / "tiny.html").read_text()
    assert "42" in html
    assert re.search(r"tiny\.ipynb\s+\d+\.\d\s+ok", r.stdout)
    assert "HTML report:" in r.stdout
    # the source notebook is not modified (outputs are not written back)
    assert nbformat.read(path, as_version=4).cells[1].outputs == []


def test_run_notebooks_reports_a_failing_notebook(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, tmp_path / "bad.ipynb")
    r = run_cli("run-notebooks", str(tmp_path / "bad.ipynb"), timeout=300)
    assert r.returncode == 1
    assert "FAILED" in r.stdout and "boom" in r.stdout


# ----------------------------------------------------------------------------- fresh install
def _tracked_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fresh_virtual_environment_installs_and_runs_info(tmp_path):
    """What a newcomer does: the README's set-up on a fresh copy, then ``companion info``."""
    repo = tmp_path / "repo"
    _tracked_copy(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    base_python = shutil.which("python3", path=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)) or "python3"
    r = subprocess.run([base_python, "-c", "import run; run.setup('')"], cwd=repo, env=env, capture_output=True, text=True, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    py = repo / ".venv" / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import torch, companion; print(torch.__version__)"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        assert "+cpu" in r.stdout or "cu" not in r.stdout  # no CUDA build on a machine without a GPU
    r = subprocess.run([str(repo / ".venv" / "bin" / "companion"), "info"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch" in r.stdout and "device" in r.stdout
    # set-up is idempotent: a second run installs nothing
    r = subprocess.run([base_python, "-c", "import run; run.setup('')"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "up to date" in r.stdout


def test_store_checked_outputs_keeps_only_marked_cells(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    tagged = nbformat.v4.new_code_cell("print(round(1 / 3, 2))", metadata={"tags": ["nbval-check-output"]})
    nb.cells = [nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(round(2 / 3, 2))"), nbformat.v4.new_code_cell("print('volatile')"), tagged]
    path = tmp_path / "checked.ipynb"
    nbformat.write(nb, path)
    times = tmp_path / "results" / "times.json"
    r = run_cli("run-notebooks", str(path), "--store-checked-outputs", "--record", str(times), "--cold", timeout=300)
    assert r.returncode == 0, r.stderr
    stored = nbformat.read(path, as_version=4)
    assert stored.cells[0].outputs[0]["text"] == "0.67\n"
    assert stored.cells[0].execution_count == 1  # nbval only compares cells that were run
    assert stored.cells[1].outputs == [] and stored.cells[1].execution_count is None
    assert stored.cells[2].outputs[0]["text"] == "0.33\n" and stored.cells[2].execution_count == 2  # the tag counts as a mark
    doc = json.loads(times.read_text())
    assert [row["notebook"] for row in doc["notebooks"]] == ["checked.ipynb"] and doc["notebooks"][0]["status"] == "ok"
    assert doc["cold_cache"] is True and doc["notebooks"][0]["seconds"] > 0 and "cpu_count" in doc["machine"]


def test_cold_run_gives_every_notebook_its_own_empty_cache(tmp_path):
    """--cold times a first run: a chapter must not find what the chapter before it left in the cache."""
    import nbformat

    from companion import bench

    src = ("import os, pathlib\nc = pathlib.Path(os.environ['" + bench.CACHE_ENV + "'])\n"
           "print(sorted(p.name for p in c.iterdir()))\n(c / 'left-by-a-chapter').write_text('x')")
    for name in ("a.ipynb", "b.ipynb"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": ["nbval-check-output"]})]
        nbformat.write(nb, tmp_path / name)
    r = run_cli("run-notebooks", str(tmp_path / "a.ipynb"), str(tmp_path / "b.ipynb"), "--store-checked-outputs", "--cold",
                timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("a.ipynb", "b.ipynb"):
        assert nbformat.read(tmp_path / name, as_version=4).cells[0].outputs[0]["text"] == "[]\n", name


def _slow_notebook(path: Path, marker: Path) -> None:
    """A notebook whose one cell writes its kernel's PID to ``marker`` and then sleeps for two minutes."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(f"import os, time, pathlib\npathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\n"
                                          "time.sleep(120)")]
    nbformat.write(nb, path)


def _signal_while_a_kernel_runs(args: list[str], marker: Path, sig) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI with ``args``, send ``sig`` once the slow notebook's kernel has written its PID, and return the
    finished process and the kernel's PID after waiting (up to 20 s) for that kernel to be gone. Both processes are
    killed by their PIDs if anything fails."""
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    kernel = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (marker.is_file() and marker.read_text()):
            time.sleep(0.2)
        kernel = int(marker.read_text())
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        deadline = time.time() + 20
        while time.time() < deadline and _alive(kernel):
            time.sleep(0.2)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), kernel
    finally:
        for pid in (proc.pid, kernel):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_notebooks_stops_on_a_signal_keeps_what_finished_and_leaves_no_kernel(tmp_path, sig):
    import nbformat

    quick = nbformat.v4.new_notebook()
    quick.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    nbformat.write(quick, tmp_path / "a_quick.ipynb")
    _slow_notebook(tmp_path / "b_slow.ipynb", tmp_path / "kernel.pid")
    record = tmp_path / "times.json"
    record.write_text('{"earlier": "record"}')
    r, kernel = _signal_while_a_kernel_runs(["run-notebooks", str(tmp_path / "a_quick.ipynb"), str(tmp_path / "b_slow.ipynb"),
                                             "--record", str(record)], tmp_path / "kernel.pid", sig)
    assert r.returncode == 130, (r.stdout, r.stderr)
    assert "b_slow.ipynb: interrupted" in r.stderr and "1 of 2 notebooks finished" in r.stderr
    assert record.read_text() == '{"earlier": "record"}'  # the record is not replaced by a partial run
    partial = json.loads((tmp_path / "times.interrupted.json").read_text())
    assert [(Path(row["notebook"]).name, row["status"]) for row in partial["notebooks"]] == [("a_quick.ipynb", "ok")]
    assert not _alive(kernel), "the notebook's kernel outlived run-notebooks"


def test_book_stops_on_sigterm_without_building_and_leaves_no_kernel(tmp_path):
    pytest.importorskip("sphinx", reason="the book needs the 'book' extra")
    (tmp_path / "notebooks").mkdir()
    _slow_notebook(tmp_path / "notebooks" / "00_slow.ipynb", tmp_path / "kernel.pid")
    r, kernel = _signal_while_a_kernel_runs(["book", "--notebooks", str(tmp_path / "notebooks"), "--out", str(tmp_path / "out")],
                                            tmp_path / "kernel.pid", signal.SIGTERM)
    assert r.returncode == 130 and "interrupted (SIGTERM): the book was not built" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "out" / "html" / "index.html").exists()
    assert not _alive(kernel), "the chapter's kernel outlived companion book"


def test_run_notebooks_record_needs_a_json_file(tmp_path):
    r = run_cli("run-notebooks", str(tmp_path), "--record", str(tmp_path / "times.txt"), timeout=120)
    assert r.returncode != 0 and "--record" in r.stderr and ".json" in r.stderr


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts OS threads through /proc (Linux only)")
def test_release_cpu_threads_lets_the_callers_openmp_pool_exit():
    import threading

    if dev._gnu_openmp() is None:
        pytest.skip("torch here does not use the GNU OpenMP runtime: nothing to release")
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: no OpenMP pool is built")
    counts = {}

    def worker():
        x = torch.randn(4_000_000)
        (x * 2).sum()  # large enough for a parallel region: this thread now owns a pool of idle OpenMP threads
        counts["with_pool"] = _os_threads()
        counts["released"] = dev.release_cpu_threads()
        counts["after"] = _os_threads()
        (x * 2).sum()  # the pool is rebuilt on demand; results are unaffected
        counts["rebuilt"] = _os_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert counts["released"] is True
    assert counts["after"] == counts["with_pool"] - (torch.get_num_threads() - 1)
    assert counts["rebuilt"] == counts["with_pool"]


def test_run_notebooks_refuses_a_file_for_html_and_reports_failures_in_plain_words(tmp_path):
    import nbformat
    from nbclient.exceptions import CellTimeoutError

    from companion.cli import failure_summary

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, tmp_path / "bad.ipynb")
    f = tmp_path / "report"
    f.write_text("x")
    r = run_cli("run-notebooks", str(tmp_path / "bad.ipynb"), "--html", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
    assert failure_summary(CellTimeoutError("----"), 30) == "FAILED: a cell ran longer than 30 s (raise --timeout, or make the cell faster)"
    coloured = RuntimeError("-----\n\x1b[0;31mValueError\x1b[0m: bad value\n-----")
    assert failure_summary(coloured, 30) == "FAILED: RuntimeError: ValueError: bad value"
    r = run_cli("run-notebooks", str(tmp_path / "bad.ipynb"))
    assert r.returncode == 1 and "ValueError: boom" in r.stdout and "\x1b[" not in r.stdout


def test_lab_leaves_a_core_for_the_browser_unless_told_otherwise():
    from companion.cli import lab_env, lab_threads

    assert lab_threads(2) == 1 and lab_threads(1) == 1 and lab_threads(16) == 15
    env = lab_env("tok", {"PATH": "/bin"})
    assert env["JUPYTER_TOKEN"] == "tok" and env["COMPANION_THREADS"] == str(lab_threads())
    assert lab_env("tok", {"COMPANION_THREADS": "2"})["COMPANION_THREADS"] == "2"  # the user's choice stands
    assert "COMPANION_THREADS" not in lab_env("tok", {"OMP_NUM_THREADS": "2"})
