"""Latency of a sampler panel: from a key press on a slider to new images, measured in the real browser.

``--mode browser`` drives JupyterLab in headless Chromium through ``tests/e2e/jupyterlab_driver.py``,
the way a reader uses the tour: it opens a notebook made of the tour's panel cell (copied verbatim from
``notebooks/00_tour.ipynb``; the bundled ``digits-cond`` model, DPM-Solver++ 2M, 10 steps, guidance 2, batch 8),
runs it with Run All, focuses the steps slider's handle and presses an arrow key. The time is taken in the page:
from the ``keydown`` event to the moment the panel's image element receives the new image (its ``src``
changes). Between presses the panel is left to finish its background work (quality, repeat timings), so each
press starts from a quiet panel, as when a reader looks at the result before moving on.

Then, for "no control is blocked by a reference": the guidance slider is moved (a new guidance needs a new
200-step reference solution, computed in the background), and as soon as its images are there the steps slider is
moved; the time from that key press to its images is what a reader waits while the reference is computed. The time
until the guidance run's point reaches the curve is recorded too.

``--mode kernel`` drives the same panel inside one process (set the slider's value, wait for the images): the
floor without browser, websocket and rendering. ``--mode both`` (default) runs the kernel part, then the browser
part, in one run, and records their ratio. Each part also splits the time: where a key press's time went (from the
panel's own timeline), and the run behind the images beside the same configuration timed again in the background.

Targets (the tour's default panel, this 2-core CPU): key press -> new images median <= 0.5 s; no control blocked
longer than 1 s by a reference. Results, with the machine's load, go to ``benchmarks/results/panel_latency.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine  # noqa: E402

TOUR = ROOT / "notebooks" / "00_tour.ipynb"
TARGET_MEDIAN_S = 0.5
TARGET_BLOCKED_S = 1.0


def tour_panel_cell() -> str:
    """The tour's panel cell, verbatim (the benchmark measures what a reader of the tour gets)."""
    cells = json.loads(TOUR.read_text(encoding="utf-8"))["cells"]
    found = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and "panel = SamplerPanel(model" in "".join(c["source"])]
    if len(found) != 1:
        raise SystemExit(f"{TOUR}: expected one cell building `panel = SamplerPanel(model, ...)`, found {len(found)}")
    return found[0]


def dist(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]
    return {"n": len(xs), "median": statistics.median(xs), "p10": q(0.1), "p90": q(0.9), "min": xs[0], "max": xs[-1]}


def load_now() -> dict:
    from companion.device import cpu_idle_fraction

    idle = cpu_idle_fraction(0.5)
    return {"load_average": os.getloadavg(), "cpu_idle_fraction_0.5s": None if idle is None else round(idle, 3)}


# ----------------------------------------------------------------------------------------------- in the browser

# JS: watch the panel's image element and status line; record keydown and new-image times in epoch ms (the
# kernel's clock). Waiting happens inside the page (a promise resolved by the observers): no polling from here,
# which would itself keep the browser busy while the run it measures competes for the CPU.
_INSTALL = """(root) => {
  const img = root.querySelector('img.companion-pixelated');
  const status = root.querySelector('.companion-status');
  if (!img || !status) throw new Error('the panel has no image (img.companion-pixelated) or status line (.companion-status)');
  const now = () => performance.timeOrigin + performance.now();
  const lat = window.__lat = {keys: [], images: [], running: [], waiters: []};
  const wake = () => { lat.waiters = lat.waiters.filter(w => !w()); };
  document.addEventListener('keydown', () => lat.keys.push(now()), true);
  new MutationObserver(() => { lat.images.push(now()); wake(); })
    .observe(img, {attributes: true, attributeFilter: ['src']});
  new MutationObserver(() => { if (/running/.test(status.textContent)) lat.running.push(now()); wake(); })
    .observe(status, {subtree: true, childList: true, characterData: true});
  lat.until = (test, ms) => new Promise(resolve => {
    const done = () => { if (test()) { resolve(true); return true; } return false; };
    if (!done()) { lat.waiters.push(done); setTimeout(() => resolve(false), ms); }
  });
  lat.status = () => status.textContent;
  return true;
}"""
_STATE = "() => ({keys: window.__lat.keys.length, images: window.__lat.images.length, running: window.__lat.running.length})"
_TIMES = "([k, i, r]) => [window.__lat.keys[k], window.__lat.images[i], window.__lat.running[r] ?? null]"
_NEW_IMAGE = "([n, ms]) => window.__lat.until(() => window.__lat.images.length > n, ms)"
_QUIET = "(ms) => window.__lat.until(() => !/measuring|running/.test(window.__lat.status()), ms)"


def slider(panel, label: str):
    return panel.locator(f".jupyter-widgets.widget-slider:has(> label.widget-label:text-matches('^{label}$', 'i'))").first


ACKS: list[float] = []  # seconds from a keydown to the panel's "running" note (the kernel got the change)
PRESSES: list[dict] = []  # every timed key press: keydown and new-image times (epoch s)


def press(page, panel, label: str, key: str, timeout_s: float = 120.0) -> float:
    """Press ``key`` on slider ``label``'s handle; seconds from the keydown to the new image's src change."""
    before = page.evaluate(_STATE)
    handle = slider(panel, label).locator(".noUi-handle").first
    handle.focus()
    handle.press(key)
    if not page.evaluate(_NEW_IMAGE, [before["images"], timeout_s * 1000]):
        raise SystemExit(f"no new image within {timeout_s:.0f} s after {key} on the {label} slider")
    t_key, t_img, t_run = page.evaluate(_TIMES, [before["keys"], before["images"], before["running"]])
    if t_run is not None and t_run <= t_img:
        ACKS.append((t_run - t_key) / 1000)
    PRESSES.append({"slider": label, "key": t_key / 1000, "image": t_img / 1000})
    return (t_img - t_key) / 1000


def wait_measured(page, panel, timeout_s: float = 300.0) -> float:
    """Seconds until the panel says nothing more (its run measured, its point on the curve)."""
    t0 = time.monotonic()
    if not page.evaluate(_QUIET, timeout_s * 1000):
        raise SystemExit(f"the panel was still measuring after {timeout_s:.0f} s")
    return time.monotonic() - t0


_HISTORY = ("import json as _json\nprint(_json.dumps([{'timeline': r.timeline, 'times': r.times} for r in panel.history]))")


def breakdown(server, tmp: Path) -> dict:
    """Where each key press's time went, from the panel's own timeline (read from the kernel) and the page's
    keydown and new-image times (one clock: the same machine)."""
    from jupyter_client import BlockingKernelClient

    (session,) = [s for s in server.api("GET", "sessions") if s.get("kernel")]
    kc = BlockingKernelClient(connection_file=str(tmp / "runtime" / f"kernel-{session['kernel']['id']}.json"))
    kc.load_connection_file()
    kc.start_channels()
    text = []
    try:
        kc.wait_for_ready(30)
        kc.execute_interactive(_HISTORY, timeout=60, output_hook=lambda m: text.append(m["content"].get("text", ""))
                               if m["msg_type"] == "stream" else None)
    finally:
        kc.stop_channels()
    runs = json.loads("".join(text))[1:]  # the first run was made when the panel was built
    if len(runs) != len(PRESSES):
        return {"error": f"{len(runs)} runs for {len(PRESSES)} key presses"}
    parts = {"keydown -> kernel has the change": [], "-> worker starts": [], "-> images sampled (the run)": [],
             "-> images drawn into the widgets": [], "-> new image in the page": []}
    for press, run in zip(PRESSES, runs):
        t = run["timeline"]
        marks = [press["key"], t["requested"], t["started"], t["sampled"], t["shown"], press["image"]]
        for name, (a, b) in zip(parts, zip(marks, marks[1:])):
            parts[name].append(b - a)
    out = {name: dist(v) for name, v in parts.items()}
    # the same configuration timed twice more in the background, after the images were drawn (side by side)
    out["the run behind the images: sample() wall time"] = dist([r["times"][0] for r in runs])
    out["its repeats in the background: sample() wall time"] = dist([t for r in runs for t in r["times"][1:]])
    return out


def browser(a) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import jupyterlab_driver as lab
    import nbformat
    from playwright.sync_api import sync_playwright

    chromium, why = lab.ensure_chromium()
    if chromium is None:
        raise SystemExit(f"the browser mode needs Chromium: {why}")
    os.environ["OMP_NUM_THREADS"] = str(a.kernel_threads)  # lab_env keeps an explicit value
    shots = Path(a.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    cell = tour_panel_cell()
    tmp = Path(tempfile.mkdtemp(prefix="panel-latency-"))
    root = tmp / "serve"
    (root / "bench").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import torch\nfrom companion import load\n\nmodel = load(\"digits-cond\")"),
                nbformat.v4.new_code_cell(cell)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    rel = "bench/panel_latency.ipynb"
    nbformat.write(nb, root / rel)
    out: dict = {"kernel_omp_threads": os.environ["OMP_NUM_THREADS"]}
    server = proc = pw = None
    try:
        server = lab.start_lab(root, tmp)
        proc, endpoint = lab.start_chromium(chromium, tmp / "chromium" / "profile")
        pw = sync_playwright().start()
        b = pw.chromium.connect_over_cdp(endpoint)
        context = b.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        lab.open_notebook(page, server, rel, workspace="panel-latency")
        out["load_before"] = load_now()
        out["run_all_s"] = lab.run_all(page, rel, timeout_s=600)
        panel = lab.find_panel(page, rel)
        lab.wait_for_figure_data(page, panel, rel, 120)
        page.evaluate(_INSTALL, panel.element_handle())
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "tour_panel_1_built.png"), full_page=True)

        steps = []
        for i in range(a.repeats):
            steps.append(press(page, panel, "steps", "ArrowRight" if i % 2 == 0 else "ArrowLeft"))
            wait_measured(page, panel)
            page.wait_for_timeout(int(a.pause * 1000))
        page.screenshot(path=str(shots / "tour_panel_2_after_steps.png"), full_page=True)
        out["steps_key_to_images_s"] = dist(steps)
        out["steps_key_to_images_all_s"] = steps
        out["steps_key_to_kernel_note_s"] = dist(ACKS)  # the part before the run starts: browser, server, kernel

        guidance, blocked, point = [], [], []
        for i in range(a.reference_rounds):
            guidance.append(press(page, panel, "guidance", "ArrowRight"))  # a new guidance: a new reference
            # the reference is being computed in the background now: the steps slider must still answer at once
            blocked.append(press(page, panel, "steps", "ArrowRight" if i % 2 == 0 else "ArrowLeft"))
            point.append(wait_measured(page, panel))
            page.wait_for_timeout(int(a.pause * 1000))
        page.screenshot(path=str(shots / "tour_panel_3_after_guidance.png"), full_page=True)
        out["guidance_key_to_images_s"] = dist(guidance)
        out["steps_key_to_images_while_a_reference_is_computed_s"] = dist(blocked)
        out["guidance_point_after_the_steps_images_s"] = dist(point)
        out["load_after"] = load_now()
        out["breakdown_s"] = breakdown(server, tmp)
        out["record_shown"] = panel.locator(".widget-html table").first.inner_text()
        out["note"] = ("steps_key_to_images = browser and kernel messaging (steps_key_to_kernel_note, about) + the "
                       "run's wall time (in record_shown: the first of the timed runs is the one behind the images) "
                       "+ sending and decoding the image")
        b.close()
    finally:
        if pw is not None:
            pw.stop()
        if proc is not None:
            lab.stop_group(proc)
        if server is not None:
            lab.stop_group(server.proc)
        lab.stop_kernels_of(tmp / "runtime")
    return out


# ----------------------------------------------------------------------------------------------- in this process


def kernel(a) -> dict:
    import torch

    torch.set_num_threads(a.kernel_threads)
    from companion import load
    from companion.widgets import SamplerPanel

    ns = {"model": load("digits-cond"), "SamplerPanel": SamplerPanel}
    cell = tour_panel_cell()
    exec(compile(cell.replace("from companion.widgets import SamplerPanel", ""), "tour-panel-cell", "exec"), ns)
    panel = ns["panel"]
    out: dict = {"load_before": load_now()}
    lat = []
    for i in range(a.repeats):
        assert panel.wait(600)
        time.sleep(a.pause)
        before = len(panel.history)
        t0 = time.perf_counter()
        panel.controls["steps"].value = 11 if i % 2 == 0 else 10
        if not panel._runner.wait_idle(120):  # the images are on the panel; the background part may go on
            raise SystemExit("no images within 120 s")
        lat.append(time.perf_counter() - t0)
        if len(panel.history) != before + 1 or panel.error.value:
            raise SystemExit(f"run {i} failed: {panel.error.value}")
    panel.wait(600)
    runs = panel.history[1:]
    out["the run behind the images: sample() wall time"] = dist([r.times[0] for r in runs])
    out["its repeats in the background: sample() wall time"] = dist([t for r in runs for t in r.times[1:]])
    out["steps_change_to_images_s"] = dist(lat)
    out["steps_change_to_images_all_s"] = lat
    out["load_after"] = load_now()
    panel.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("both", "browser", "kernel"), default="both",
                   help="both: the in-process floor, then the browser, side by side in one run")
    p.add_argument("--repeats", type=int, default=20, help="steps key presses timed")
    p.add_argument("--reference-rounds", type=int, default=3, help="guidance changes (each needs a new reference)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between a finished measurement and the next key")
    p.add_argument("--kernel-threads", type=int, default=1, help="torch threads in the kernel (the e2e harness uses 1)")
    p.add_argument("--screenshots", default=str(ROOT / "artifacts" / "panel_latency"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "panel_latency.json"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    result = {"benchmark": "panel latency: key press (browser) / value change (kernel) -> new images",
              "machine": machine(), "repeats": a.repeats, "pause_s": a.pause, "kernel_threads": a.kernel_threads,
              "target_median_s": TARGET_MEDIAN_S, "target_blocked_s": TARGET_BLOCKED_S, "panel_cell": tour_panel_cell()}
    if a.mode in ("both", "kernel"):
        if a.mode == "both":  # the kernel part runs in a child process: this one must not hold torch threads
            import subprocess

            tmp = Path(tempfile.mkdtemp(prefix="panel-latency-kernel-")) / "kernel.json"
            subprocess.run([sys.executable, __file__, "--mode", "kernel", "--repeats", str(a.repeats), "--pause",
                            str(a.pause), "--kernel-threads", str(a.kernel_threads), "--out", str(tmp)], check=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(a.kernel_threads)))
            result["kernel"] = json.loads(tmp.read_text())["kernel"]
        else:
            result["kernel"] = kernel(a)
        result["kernel"]["target_met"] = result["kernel"]["steps_change_to_images_s"]["median"] <= TARGET_MEDIAN_S
    if a.mode in ("both", "browser"):
        b = result["browser"] = browser(a)
        b["target_met"] = b["steps_key_to_images_s"]["median"] <= TARGET_MEDIAN_S
        worst = b["steps_key_to_images_while_a_reference_is_computed_s"].get("max")
        b["blocked_target_met"] = worst is not None and worst <= TARGET_BLOCKED_S
    if a.mode == "both":
        result["browser_over_kernel_median"] = (result["browser"]["steps_key_to_images_s"]["median"]
                                                / result["kernel"]["steps_change_to_images_s"]["median"])
    result["benchmark_wall_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
