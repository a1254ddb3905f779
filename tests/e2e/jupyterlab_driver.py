"""Drive JupyterLab in headless Chromium the way a person does: open, run all, move a slider, pick a sampler.

Process handling lives here too: the JupyterLab server and Chromium are each started in their own process
group and stopped by their own PIDs (``stop_group``), so nothing is left running whatever a test does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("COMPANION_E2E_CHROMIUM", "/usr/bin/chromium"))
SETUP_SCRIPT = ROOT / ".ci" / "setup-e2e"
ARTIFACTS = ROOT / "artifacts" / "e2e"
NOTEBOOKS = ROOT / "notebooks"
# Time limits in seconds; raise them on slow machines.
RUN_TIMEOUT = float(os.environ.get("COMPANION_E2E_RUN_TIMEOUT", "300"))  # Run All of one notebook
REACT_TIMEOUT = float(os.environ.get("COMPANION_E2E_REACT_TIMEOUT", "60"))  # one panel reaction

# Chromium flags seen working offline here (platform facts): no network side traffic, a fresh profile.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--disable-crash-reporter", "--disable-breakpad", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]

# User settings for the test server: the news/update pop-up tries the network and covers the notebook;
# windowing "none" keeps every cell in the DOM so selectors see outputs below the fold.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# What a rendered panel is: one output holding a live slider, a live dropdown and a live plotly figure.
# Only live ipywidgets views carry the .jupyter-widgets classes; a text or static-HTML fallback never does.
SLIDER = ".jupyter-widgets.widget-slider:has(> label.widget-label:text-matches('^steps$', 'i'))"
DROPDOWN = ".jupyter-widgets.widget-dropdown:has(> label.widget-label:text-matches('^sampler$', 'i')) select"
PLOT = ".js-plotly-plot"
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
KERNEL_INDICATOR = ".jp-Notebook-ExecutionIndicator"

# A notebook "has a sampler panel" when a code cell builds companion.widgets.SamplerPanel.
PANEL_SOURCE = re.compile(r"\bSamplerPanel\(")


# ----------------------------------------------------------------------------- processes
def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (its own PID), then SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children may outlive the leader (kernels, renderer processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=grace_s)


def stop_kernels_of(runtime_dir: Path) -> list[int]:
    """SIGKILL kernels still running from ``runtime_dir`` (they get sessions of their own, outside the
    server's process group, and outlive a server that had to be killed). Returns the PIDs signalled."""
    killed = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(str(runtime_dir) + os.sep) for arg in cmdline):
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
                killed.append(int(proc_dir.name))
            except ProcessLookupError:
                pass
    return killed


def ensure_chromium() -> tuple[Path | None, str]:
    """Path to Chromium, installing Debian's package with .ci/setup-e2e when missing; else (None, why)."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM, ""
    if not SETUP_SCRIPT.is_file():
        return None, f"{CHROMIUM} is missing and {SETUP_SCRIPT} is not there to install it"
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600)
    if done.returncode == 0 and CHROMIUM.is_file():
        return CHROMIUM, ""
    why = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return None, f"{CHROMIUM} is missing and could not be installed ({why[-1] if why else f'exit {done.returncode}'})"


def lab_env(tmp: Path) -> dict[str, str]:
    """Environment for a throw-away JupyterLab: own config/runtime/data/settings/workspaces, venv app dir."""
    dirs = {
        "JUPYTER_CONFIG_DIR": tmp / "config", "JUPYTER_RUNTIME_DIR": tmp / "runtime", "JUPYTER_DATA_DIR": tmp / "data",
        "JUPYTERLAB_SETTINGS_DIR": tmp / "settings", "JUPYTERLAB_WORKSPACES_DIR": tmp / "workspaces",
        "IPYTHONDIR": tmp / "ipython", "MPLCONFIGDIR": tmp / "matplotlib",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name, values in LAB_SETTINGS.items():
        path = dirs["JUPYTERLAB_SETTINGS_DIR"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if k != "JUPYTERLAB_DIR"}  # keep the venv's prebuilt app dir
    env.update({k: str(v) for k, v in dirs.items()})
    env["PYTHONUNBUFFERED"] = "1"
    # Chromium renders on one core while the kernel computes: with two intra-op threads torch's spin-waiting
    # on a contended core slowed a forward pass ~30x here, so kernels started by this server use one thread.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class LabServer:
    proc: subprocess.Popen
    url: str
    token: str
    root: Path
    log: Path

    def api(self, method: str, path: str) -> object:
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        for session in self.api("GET", "sessions"):
            self.api("DELETE", f"sessions/{session['id']}")

    def notebook_url(self, rel_path: str, workspace: str) -> str:
        # A workspace of its own per page: the default one would reopen the previous test's notebooks.
        return f"{self.url}/lab/workspaces/{workspace}/tree/{rel_path}?token={self.token}"


def start_lab(root: Path, tmp: Path, timeout_s: float = 60.0) -> LabServer:
    from companion.cli import free_port, lab_command

    port, token = free_port(), os.urandom(16).hex()
    log = tmp / "jupyterlab.log"
    env = dict(lab_env(tmp), JUPYTER_TOKEN=token)  # the token stays off the command line
    with open(log, "wb") as out:
        proc = subprocess.Popen(lab_command(root, port), cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LabServer(proc, f"http://127.0.0.1:{port}", token, root, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            server.api("GET", "status")
            return server
        except OSError:
            time.sleep(0.2)
    stop_group(proc)
    raise RuntimeError(f"JupyterLab did not answer on {server.url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def start_chromium(chromium: Path, profile: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start Chromium ourselves (so we own its PID) and return it with its DevTools endpoint."""
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile.parent / "chromium.log", "wb")
    proc = subprocess.Popen([str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited with code {proc.returncode}; see {profile.parent / 'chromium.log'}")
        lines = port_file.read_text().split() if port_file.is_file() else []
        if lines:
            return proc, f"http://127.0.0.1:{lines[0]}"
        time.sleep(0.1)
    stop_group(proc)
    raise RuntimeError(f"Chromium wrote no DevTools port within {timeout_s:.0f} s")


# ----------------------------------------------------------------------------- notebooks
def repo_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if not p.name.startswith("_"))


def has_panel(notebook: Path) -> bool:
    cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    return any(c.get("cell_type") == "code" and PANEL_SOURCE.search("".join(c.get("source", []))) for c in cells)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy notebooks (and their data files) so autosave never writes outputs into the repository."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"), dirs_exist_ok=True)


# ----------------------------------------------------------------------------- the page
@dataclass
class ConsoleLog:
    """Front-end errors seen by one page: console.error calls and uncaught exceptions."""
    errors: list[str] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(
            f"console.error: {msg.text} ({msg.location.get('url', '')}:{msg.location.get('lineNumber', '')})"))
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_notebook(page, server: LabServer, rel_path: str, workspace: str, timeout_s: float = 60.0) -> None:
    """Open a notebook in a fresh workspace; wait until the server reports its kernel idle and the page agrees."""
    page.goto(server.notebook_url(rel_path, workspace), wait_until="domcontentloaded")
    page.locator(NOTEBOOK).first.wait_for(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    state = "no session"
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "select kernel" in dialog.first.inner_text().lower():
            # Shown when the page asks before the kernel specs have loaded: take the notebook's own kernel.
            dialog.first.locator(".jp-mod-accept").click()
        sessions = [s for s in server.api("GET", "sessions") if s["path"] == rel_path and s.get("kernel")]
        state = sessions[0]["kernel"]["execution_state"] if sessions else "no session"
        if (state == "idle" and not dialog.count()
                and page.locator(f"{NOTEBOOK} {KERNEL_INDICATOR}[data-status='idle']").count()):
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"{rel_path}: kernel not idle within {timeout_s:.0f} s (server: {state})")


# JS: progress of a run-all. A non-empty code cell is done when its prompt shows an execution count.
_RUN_STATE = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const cells = [...nb.querySelectorAll('.jp-CodeCell')];
  const pending = cells.filter(c => {
    const src = (c.querySelector('.cm-content') || {}).textContent || '';
    const prompt = (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '';
    return src.trim() !== '' && !/\\[\\d+\\]/.test(prompt);
  }).length;
  const errors = [...nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => /Error|Traceback/.test(t));
  const ind = nb.querySelector('.jp-Notebook-ExecutionIndicator');
  return {pending, total: cells.length, errors, status: ind ? ind.getAttribute('data-status') : null};
}"""


def run_all(page, rel_path: str, timeout_s: float = 120.0, stall_s: float = 15.0) -> float:
    """Run -> Run All Cells through the menus; wait until every cell ran and the kernel is idle.

    Fails early when cells stay pending while the kernel sits idle for ``stall_s`` (nothing is running them).
    """
    t0 = start_run_all(page)
    return wait_run_all(page, rel_path, t0, timeout_s, stall_s)


def start_run_all(page) -> float:
    """Click Run -> Run All Cells; returns the monotonic time of the click (for :func:`wait_run_all`)."""
    t0 = time.monotonic()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    return t0


def run_state(page) -> dict:
    """Progress of a run-all: pending code cells, total, errors shown, the kernel indicator's status."""
    return page.evaluate(_RUN_STATE)


def wait_run_all(page, rel_path: str, t0: float, timeout_s: float = 120.0, stall_s: float = 15.0) -> float:
    """Wait until a run-all started at ``t0`` finished: every cell ran and the kernel is idle."""
    state: dict = {}
    idle_since, last_pending = None, None
    while time.monotonic() - t0 < timeout_s:
        state = page.evaluate(_RUN_STATE)
        if state["errors"]:
            raise AssertionError(f"{rel_path}: a cell raised during Run All:\n{state['errors'][0][-2000:]}")
        if state["pending"] == 0 and state["status"] == "idle":
            return time.monotonic() - t0
        if state["status"] == "idle" and state["pending"] == last_pending:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > stall_s:
                break
        else:
            idle_since = None
        last_pending = state["pending"]
        page.wait_for_timeout(250)
    raise AssertionError(f"{rel_path}: Run All not finished after {time.monotonic() - t0:.0f} s "
                         f"({state.get('pending')} of {state.get('total')} code cells pending, kernel {state.get('status')})")


# ----------------------------------------------------------------------------- the panel
def find_panel(page, rel_path: str, timeout_s: float = 20.0):
    """The first output rendering a live panel (slider + dropdown + plotly figure), not its text fallback."""
    nb = page.locator(NOTEBOOK)
    panel = (nb.locator(".jp-OutputArea-output")
             .filter(has=page.locator(SLIDER)).filter(has=page.locator(DROPDOWN)).filter(has=page.locator(PLOT)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if panel.count():
            panel.first.scroll_into_view_if_needed()
            return panel.first
        page.wait_for_timeout(200)
    outputs = [t.strip()[:200] for t in nb.locator(".jp-OutputArea-output").all_inner_texts() if t.strip()]
    raise AssertionError(
        f"{rel_path}: no panel rendered as a live widget (an output with {SLIDER}, {DROPDOWN} and {PLOT}) "
        f"within {timeout_s:.0f} s after Run All; text outputs were: {outputs[-5:]}")


# JS: a content hash of every image in the panel (bytes behind <img> blob:/data: URLs, image-like plotly
# traces): a redraw with the same pixels keeps the hash, new pixels change it.
_IMAGE_STATE = """async (root) => {
  const fnv = (bytes) => { let h = 2166136261 >>> 0;
    for (const b of bytes) { h ^= b; h = Math.imul(h, 16777619) >>> 0; } return h.toString(16); };
  const out = [];
  for (const img of root.querySelectorAll('img')) {
    if (img.closest('.js-plotly-plot') || !img.src) continue;
    const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    out.push('img:' + fnv(buf) + ':' + buf.length);
  }
  for (const gd of root.querySelectorAll('.js-plotly-plot')) {
    for (const t of gd.data || []) {
      if (t.type === 'image' || t.type === 'heatmap') {
        out.push(t.type + ':' + fnv(new TextEncoder().encode(JSON.stringify([t.z, t.source]))));
      }
    }
  }
  return out;
}"""

# JS: points per plotly figure in the panel (scatter-like traces; arrays may be typed or base64 specs).
POINTS_JS = _POINTS = """(root) => [...root.querySelectorAll('.js-plotly-plot')].map(gd => (gd.data || [])
  .filter(t => t.type === undefined || t.type === 'scatter' || t.type === 'scattergl')
  .map(t => { const x = t.x === undefined ? t.y : t.x;
    if (x == null) return 0;
    if (Array.isArray(x) || ArrayBuffer.isView(x)) return x.length;
    if (x.shape) return [].concat(x.shape)[0];
    if (x.bdata) { const size = {f8: 8, f4: 4, i4: 4, u4: 4, i2: 2, u2: 2, i1: 1, u1: 1, float64: 8, float32: 4,
      int32: 4, uint32: 4, int16: 2, uint16: 2, int8: 1, uint8: 1}[x.dtype] || 8; return atob(x.bdata).length / size; }
    return 0; })
  .reduce((a, b) => a + b, 0))"""


@dataclass
class PanelState:
    images: list[str]
    points: list[int]


def panel_state(panel) -> PanelState:
    return PanelState(images=panel.evaluate(_IMAGE_STATE), points=panel.evaluate(_POINTS))


def wait_for_figure_data(page, panel, rel_path: str, timeout_s: float) -> None:
    """Every plotly figure in the panel must receive its traces; an empty chart is a rendering failure."""
    count = "(root) => [...root.querySelectorAll('.js-plotly-plot')].map(gd => (gd.data || []).length)"
    deadline = time.monotonic() + timeout_s
    traces = panel.evaluate(count)
    while not (traces and all(traces)) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        traces = panel.evaluate(count)
    assert traces and all(traces), (f"{rel_path}: a plotly figure in the panel rendered with no traces "
                                    f"(an empty chart; traces per figure: {traces}) within {timeout_s:.0f} s")


def wait_for_reaction(page, panel, before: PanelState, what: str, timeout_s: float) -> PanelState:
    """Wait until the images changed and a plotly figure gained a point; fail naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    now = before
    while time.monotonic() < deadline:
        now = panel_state(panel)
        grew = len(now.points) == len(before.points) and any(a > b for a, b in zip(now.points, before.points))
        if grew and now.images and now.images != before.images:
            return now
        page.wait_for_timeout(200)
    problems = []
    if not now.images:
        problems.append("the panel shows no image")
    elif now.images == before.images:
        problems.append("the image did not change")
    if not any(a > b for a, b in zip(now.points, before.points)):
        problems.append(f"the plotly figure gained no point (points per figure: {before.points} -> {now.points})")
    shown = [line for line in panel.inner_text().splitlines() if re.search(r"fail|error|exception", line, re.I)]
    raise AssertionError(f"after {what}: " + "; ".join(problems) + f" within {timeout_s:.0f} s"
                         + (f"; the panel says: {shown[:3]}" if shown else ""))


def move_steps_slider(page, panel, timeout_s: float) -> tuple[str, str]:
    """Focus the steps slider's handle and press an arrow key, as a keyboard user would."""
    slider = panel.locator(SLIDER).first
    handle = slider.locator(".noUi-handle").first
    readout = slider.locator(".widget-readout").first
    old = readout.inner_text().strip()
    at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
    handle.focus()
    handle.press("ArrowLeft" if at_max else "ArrowRight")
    deadline = time.monotonic() + timeout_s
    while readout.inner_text().strip() == old and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    new = readout.inner_text().strip()
    assert new != old, f"the steps slider's readout stayed at {old!r} after a key press on its handle"
    return old, new


def change_sampler(panel, acceptable=None) -> tuple[str, str]:
    """Pick another sampler in the dropdown: the first option (by label) that ``acceptable`` allows."""
    select = panel.locator(DROPDOWN).first
    # ipywidgets shows spaces in option labels as no-break spaces; compare them as plain text.
    labels = select.evaluate("s => [...s.options].map(o => o.textContent.replace(/\\u00a0/g, ' '))")
    current = select.evaluate("s => s.selectedIndex")
    pick = next((i for i, o in enumerate(labels) if i != current and (acceptable is None or acceptable(o))), None)
    assert pick is not None, f"the sampler dropdown offers {labels!r}: no other acceptable sampler than {labels[current]!r}"
    select.select_option(index=pick)
    return labels[current], labels[pick]


def exercise_panel(page, rel_path: str, shot_name: str, timeout_s: float, sampler_ok=None,
                   render_timeout_s: float = REACT_TIMEOUT) -> dict:
    """Find the live panel, move the steps slider, change the sampler; each must redraw and add a point.

    ``sampler_ok(label)`` limits which sampler to switch to (e.g. those whose runs add a point to the curve).
    ``timeout_s`` bounds each reaction; ``render_timeout_s`` bounds the figure's first data.
    """
    panel = find_panel(page, rel_path)
    wait_for_figure_data(page, panel, rel_path, render_timeout_s)
    start = panel_state(panel)
    screenshot(page, f"{shot_name}-1-rendered")

    steps = move_steps_slider(page, panel, timeout_s)
    after_slider = wait_for_reaction(page, panel, start, f"moving the steps slider {steps[0]} -> {steps[1]}", timeout_s)
    screenshot(page, f"{shot_name}-2-steps")

    sampler = change_sampler(panel, sampler_ok)
    after_sampler = wait_for_reaction(page, panel, after_slider, f"changing the sampler {sampler[0]} -> {sampler[1]}", timeout_s)
    screenshot(page, f"{shot_name}-3-sampler")
    return {"steps": steps, "sampler": sampler, "points": [start.points, after_slider.points, after_sampler.points]}
