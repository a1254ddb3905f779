"""Every notebook opens in JupyterLab without a front-end error in the browser console.

Opening means what a reader does first: load the notebook page, let its kernel start, and let the saved
outputs render (a saved widget output without its widget state, or a broken renderer, logs errors here).
"""
from __future__ import annotations

import re
import time

import pytest

import jupyterlab_driver as lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# Console errors that are not the notebook's fault. Each entry names why it is harmless here.
KNOWN_BENIGN = [
    # The test machine has no internet: anything fetched from outside 127.0.0.1 fails to load.
    re.compile(r"net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|CONNECTION_REFUSED|ADDRESS_UNREACHABLE)"),
]
SETTLE_S = 1.5  # saved outputs keep rendering for a moment after the kernel reports idle


def real_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if not any(p.search(e) for p in KNOWN_BENIGN)]


def test_console_errors_are_seen(lab_page):
    """The console collector sees an error raised by page script, so an empty list means something."""
    lab_page.open("e2e/panel.ipynb")
    lab_page.page.evaluate("() => { console.error('e2e probe: console.error'); setTimeout(() => { throw new Error('e2e probe: uncaught'); }); }")
    deadline = time.monotonic() + 5
    while len(lab_page.console.errors) < 2 and time.monotonic() < deadline:
        lab_page.page.wait_for_timeout(100)  # lets Playwright deliver the page's events
    assert any("e2e probe: console.error" in e for e in lab_page.console.errors), lab_page.console.errors
    assert any("e2e probe: uncaught" in e for e in lab_page.console.errors), lab_page.console.errors


@pytest.mark.parametrize("notebook", lab.repo_notebooks(), ids=lambda p: p.name)
def test_notebook_opens_without_console_error(lab_page, notebook):
    nb = f"notebooks/{notebook.name}"
    lab_page.open(nb)
    lab_page.page.wait_for_timeout(SETTLE_S * 1000)
    lab_page.screenshot("opened")
    errors = real_errors(lab_page.console.errors)
    assert not errors, f"{nb}: front-end errors in the browser console:\n" + "\n".join(errors)
