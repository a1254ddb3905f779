"""``companion book``: a one-chapter book built offline and read in headless Chromium.

The chapter is a small notebook written here (an image grid, a plotly figure, maths, a glossary link and a
real panel, ``ForwardPanel``, whose static face carries its own image grid and figure). The build runs with
every non-loopback socket connection refused and recorded; the browser runs with every request that is not
for the local test server aborted and recorded. Server and Chromium are stopped by their own PIDs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from companion import book, cli

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
import jupyterlab_driver as lab  # noqa: E402  (Chromium and process handling shared with the JupyterLab tests)

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "00_small"


def small_chapter(path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook(cells=[
        new_markdown_cell("# A small chapter\n\nThe forward process keeps $\\sqrt{\\bar\\alpha_t}$ of the signal "
                          "(see [SNR](../docs/glossary.md#snr)):\n\n"
                          "$$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\varepsilon$$"),
        new_code_cell("from IPython.display import Image, display\nfrom companion.data import digits\n"
                      "from companion.plots import grid_png\nfrom companion.widgets import ForwardPanel\n\n"
                      "x0, y = digits(size=16, split='test')\ndisplay(Image(grid_png(x0[:16], nrow=8)))"),
        new_code_cell("import plotly.graph_objects as go\n\n"
                      "go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], name='a line')).show()"),
        new_code_cell("ForwardPanel(x0[:8], schedules=('linear', 'cosine'), t=250)"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)


def test_unknown_chapter_is_refused_with_the_valid_names(tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    small_chapter(tmp_path / "notebooks" / f"{CHAPTER}.ipynb")
    with pytest.raises(book.BookError, match=rf"unknown chapter\(s\) 'nope'; valid chapters: {CHAPTER}$"):
        book.select_chapters(["nope"], tmp_path / "notebooks")
    assert book.select_chapters([f"{CHAPTER}.ipynb"], tmp_path / "notebooks") == [tmp_path / "notebooks" / f"{CHAPTER}.ipynb"]
    code = cli.main(["book", "--notebooks", str(tmp_path / "notebooks"), "--out", str(tmp_path / "out"),
                     "--chapters", "00_tuor"])
    assert code == 2
    assert "unknown chapter(s) '00_tuor'; valid chapters: 00_small" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_a_folder_that_is_not_a_book_is_never_emptied(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(book.BookError, match="holds no earlier book"):
        book.prepare_out(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_external_references_names_every_page_that_loads_from_another_host(tmp_path):
    (tmp_path / "a.html").write_text('<script src="https://cdn.example.org/require.js"></script>'
                                     '<link rel="stylesheet" href="//fonts.example.org/x.css"><img src="_images/x.png">'
                                     '<a href="https://arxiv.org/abs/2210.09292">a link is not a load</a>')
    (tmp_path / "b.html").write_text('<script src="_static/plotly.min.js"></script>')
    assert book.external_references(tmp_path) == ["a.html: https://cdn.example.org/require.js",
                                                   "a.html: //fonts.example.org/x.css"]


def test_book_view_leaves_no_inlined_plotlyjs_and_no_widget_view():
    import plotly.graph_objects as go
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    face = go.Figure(go.Bar(x=[1], y=[2])).to_html(include_plotlyjs=True, full_html=False)
    cell = new_code_cell("panel", outputs=[new_output("display_data", data={
        "text/html": face, "text/plain": "panel", "application/vnd.jupyter.widget-view+json": {"model_id": "x"}})])
    view = book.book_view(new_notebook(cells=[cell]))
    data = view.cells[0].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert "Plotly.newPlot" in data["text/html"] and book._plotlyjs() not in data["text/html"]
    assert len(data["text/html"]) < len(face) - 1_000_000  # plotly.js (megabytes) is gone, the figure stays


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A one-chapter book, built with every non-loopback connection refused (and recorded)."""
    root = tmp_path_factory.mktemp("book")
    (root / "notebooks").mkdir()
    (root / "docs").mkdir()
    shutil.copyfile(ROOT / "docs" / "glossary.md", root / "docs" / "glossary.md")
    small_chapter(root / "notebooks" / f"{CHAPTER}.ipynb")
    attempts = []
    connect = socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: network blocked ({address})")
        return connect(sock, address)

    socket.socket.connect = local_only
    try:
        code = cli.main(["book", "--notebooks", str(root / "notebooks"), "--out", str(root / "out")])
    finally:
        socket.socket.connect = connect
    times = json.loads((root / "out" / "book_times.json").read_text())
    return {"code": code, "times": times, "html": root / "out" / "html", "attempts": attempts}


@pytest.mark.slow
def test_build_is_offline_and_timed(built):
    assert built["code"] == 0
    assert built["attempts"] == []
    times = built["times"]
    assert times["external_references"] == [] and book.external_references(built["html"]) == []
    assert times["sphinx_warnings"] == 0, (built["html"].parent / "sphinx-warnings.log").read_text()
    [row] = times["chapters"]
    assert row["chapter"] == CHAPTER and row["status"] == "ok" and row["execute_s"] > 0 and row["build_s"] > 0
    for page in ("index.html", "taxonomy.html", "search.html", f"notebooks/{CHAPTER}.html", "docs/glossary.html"):
        assert (built["html"] / page).is_file(), page
    # plotly.js is on the site once, not inlined into a page
    plotlyjs = book._plotlyjs()
    assert (built["html"] / "_static" / "plotly.min.js").read_text() == plotlyjs
    assert not any(plotlyjs[:2000] in p.read_text() for p in built["html"].rglob("*.html"))


def serve(html: Path, log: Path):
    """Serve ``html`` on 127.0.0.1 (its own process group); returns the process and the site's URL."""
    port = cli.free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(html)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                lab.stop_group(proc)
                raise RuntimeError(f"the HTTP server did not answer on {url}")
            time.sleep(0.1)


def _anchor_exists(html_file: Path, fragment: str) -> bool:
    return re.search(rf"""\bid=["']{re.escape(fragment)}["']""", html_file.read_text(encoding="utf-8")) is not None


# What a page holds, counted in the browser: plotly figures present and drawn, images present and loaded, MathML.
PAGE_STATE = """() => ({
  figures: document.querySelectorAll('.plotly-graph-div').length,
  drawn: [...document.querySelectorAll('.plotly-graph-div')].filter(d => d.querySelector('.main-svg')).length,
  images: document.querySelectorAll('article img').length,
  loaded: [...document.querySelectorAll('article img')].filter(i => i.complete && i.naturalWidth > 0).length,
  broken_images: [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src.slice(0, 80)),
  maths: document.querySelectorAll('math').length,
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
})"""


def read_site(html: Path, browser, tmp: Path, search: str, shots: str) -> dict:
    """Open every page of the built site ``html`` in Chromium with every request off 127.0.0.1 aborted.
    Returns each page's state, the console errors, the requests that tried to leave the machine, the links
    that do not resolve (a missing file or anchor) and the search hits for ``search``."""
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)
    server, site = serve(html, tmp / "http.log")
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    outside, states, bad_links = [], {}, []

    def route(r):
        if r.request.url.startswith(site):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    context.route("**/*", route)
    try:
        page = context.new_page()
        console = lab.ConsoleLog()
        console.attach(page)
        for rel in pages:
            page.goto(site + rel, wait_until="load")
            try:  # every figure on the page drawn, every image loaded
                page.wait_for_function("""() => [...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('.main-svg'))
                    && [...document.querySelectorAll('article img')].every(i => i.complete)""", timeout=30_000)
            except Exception:
                pass  # the state below names what is missing
            states[rel] = state = page.evaluate(PAGE_STATE)
            for link in state["links"]:
                if not link.startswith(site):
                    continue
                parts = urlsplit(link)
                target = html / unquote(parts.path[len(urlsplit(site).path):])
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file() or (parts.fragment and target.suffix == ".html"
                                            and not _anchor_exists(target, unquote(parts.fragment))):
                    bad_links.append(f"{rel} -> {link}")
        page.goto(site + f"search.html?q={search}", wait_until="load")
        page.wait_for_selector("#search-results li", timeout=30_000)
        hits = page.eval_on_selector_all("#search-results li a", "els => els.map(a => a.href)")
        lab.screenshot(page, f"{shots}-search")
        chapters = [p for p in pages if p.startswith("notebooks/")]
        if chapters:
            page.goto(site + chapters[0], wait_until="load")
            lab.screenshot(page, f"{shots}-chapter")
    finally:
        context.close()
        lab.stop_group(server)
    return {"states": states, "errors": console.errors, "outside": outside, "bad_links": sorted(set(bad_links)),
            "hits": hits}


def assert_site_reads(seen: dict) -> None:
    assert seen["outside"] == [], f"requests left the machine: {seen['outside']}"
    assert seen["errors"] == [], seen["errors"]
    assert seen["bad_links"] == [], "links that do not resolve:\n" + "\n".join(seen["bad_links"])
    for rel, state in seen["states"].items():
        assert state["drawn"] == state["figures"] and state["loaded"] == state["images"] and not state["broken_images"], (rel, state)
    assert seen["states"]["taxonomy.html"]["drawn"] >= 1


@pytest.mark.slow
def test_every_page_reads_in_chromium_offline(built, browser, tmp_path):
    seen = read_site(built["html"], browser, tmp_path, "forward", "book")
    assert_site_reads(seen)
    chapter = seen["states"][f"notebooks/{CHAPTER}.html"]
    # the plotly figure and the panel's figure are drawn; the image grid and the panel's grid are loaded
    assert chapter["drawn"] >= 2 and chapter["loaded"] >= 2 and chapter["maths"] >= 2, chapter
    assert any(f"notebooks/{CHAPTER}.html" in h for h in seen["hits"]), seen["hits"]
    assert any("docs/glossary.html#snr" in h for h in chapter["links"]), "the chapter's glossary link is missing"


@pytest.mark.slow
def test_the_whole_book_reads_in_chromium(browser, tmp_path):
    """The same checks on a whole built site: `companion book`, then COMPANION_BOOK_HTML=build/book/html."""
    html = os.environ.get("COMPANION_BOOK_HTML")
    if not html:
        pytest.skip("set COMPANION_BOOK_HTML to a site built by `companion book` (e.g. build/book/html) to check it")
    html = Path(html).resolve()
    seen = read_site(html, browser, tmp_path, "sampler", "book-full")
    assert_site_reads(seen)
    times = json.loads((html.parent / "book_times.json").read_text())
    for row in times["chapters"]:
        state = seen["states"][f"notebooks/{row['chapter']}.html"]
        assert row["status"] == "ok", row
        assert state["drawn"] + state["loaded"] >= 1, f"{row['chapter']} shows no figure and no image: {state}"
