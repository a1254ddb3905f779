"""Fixtures for the real-browser tests: one JupyterLab server and one headless Chromium per session.

The server serves a temporary copy of ``notebooks/`` (under ``notebooks/``) and of the fixture notebooks
(under ``e2e/``, with broken variants derived from ``fixtures/panel.ipynb``), from temporary Jupyter
config/runtime/data/settings folders. Chromium is Debian's ``/usr/bin/chromium`` (installed by
``.ci/setup-e2e`` when missing; the tests skip, naming why, only where it cannot be installed), started
by us and driven by Playwright over the DevTools protocol. Server and browser are stopped by their own
process-group PIDs in finalizers, whatever the tests do.

"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import jupyterlab_driver as lab

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The fixture notebooks are opened in the browser by these tests, not executed by nbval.
collect_ignore_glob = ["fixtures/*.ipynb"]

# Broken variants of the fixture panel, made by editing one line of its source: the harness must fail on them.
_CALLBACK = "def on_change(change) -> None:\n    run(slider.value, dropdown.value)"
BROKEN_VARIANTS = {
    # The observer raises AttributeError on every change: nothing redraws, no point is added.
    "panel_broken_callback.ipynb": (_CALLBACK, _CALLBACK.replace("dropdown.value)", "dropdown.values)")),
    # The panel reaches the page only as its text representation, as when the widget front end is missing.
    "panel_text_only.ipynb": ("display(panel)", "print(repr(panel))"),
}


def _write_variant(src: Path, dst: Path, old: str, new: str) -> None:
    nb = json.loads(src.read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in nb["cells"]]
    found = sum(s.count(old) for s in sources)
    assert found == 1, f"{src.name}: expected exactly one {old!r} to break, found {found}"
    for cell, source in zip(nb["cells"], sources):
        cell["source"] = source.replace(old, new)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory) -> lab.LabServer:
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "serve"
    lab.copy_tree(lab.NOTEBOOKS, root / "notebooks")
    lab.copy_tree(lab.ROOT / "assets" / "diagrams", root / "assets" / "diagrams")  # the chapters' ../assets/diagrams images
    lab.copy_tree(FIXTURES, root / "e2e")
    for name, (old, new) in BROKEN_VARIANTS.items():
        _write_variant(FIXTURES / "panel.ipynb", root / "e2e" / name, old, new)
    server = lab.start_lab(root, tmp)
    try:
        yield server
    finally:
        lab.stop_group(server.proc)
        lab.stop_kernels_of(tmp / "runtime")


class LabPage:
    """One browser page on the test server, with the front-end errors it logged."""

    def __init__(self, page, server: lab.LabServer, name: str):
        self.page, self.server, self.name = page, server, name
        self.console = lab.ConsoleLog()
        self.console.attach(page)

    def open(self, rel_path: str) -> None:
        lab.open_notebook(self.page, self.server, rel_path, workspace=self.name)

    def run_all(self, rel_path: str) -> float:
        return lab.run_all(self.page, rel_path, timeout_s=lab.RUN_TIMEOUT)

    def screenshot(self, step: str) -> Path:
        return lab.screenshot(self.page, f"{self.name}-{step}")


@pytest.fixture
def lab_page(browser, lab_server, request):
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        lp = LabPage(page, lab_server, name)
        try:
            yield lp
        finally:
            try:
                lp.screenshot("final")
            except Exception:  # the page may already be gone; the screenshot is only a diagnostic
                pass
    finally:
        context.close()
        lab_server.shutdown_kernels()  # each test starts from no running kernels (2 shared cores)
