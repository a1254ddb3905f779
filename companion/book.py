"""The chapters as a static site (``companion book``): executed outputs, readable without a kernel or a network.

The site is built with Sphinx, MyST-NB (execution off) and sphinx-book-theme, all installed from pip (the
``book`` extra); nothing is fetched from the web, at build time or when a page is read:

* each chapter is executed first by the companion's own runner (``companion.cli.execute_notebook``, handed in by
  the command, so the sweep cache is reused exactly as ``run-notebooks`` reuses it), into the build folder: the
  repository's ``notebooks/`` stay without outputs;
* :func:`book_view` turns an executed chapter into what a page can show: :func:`companion.offline.static_view`
  (panels' static faces instead of widget views, plotly figures as HTML, maths as MathML), with every inlined
  copy of plotly.js taken out, because the site loads plotly.js once from ``_static/`` on every page;
* no page has maths for MathJax (markdown maths is MathML) and MyST-NB's widget scripts are switched off
  (``nb_ipywidgets_js``), so no CDN script is linked; :func:`external_references` checks the built pages for any.

The source tree mirrors the repository (``notebooks/``, ``docs/``, ``benchmarks/results/``), so the relative links
the chapters already use (``../docs/glossary.md#nfe``) resolve on the site as they do on GitHub. Each chapter's
time (execute, then Sphinx read + write of its page) is measured and written to ``book_times.json``.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from . import taxonomy
from .assets import notebooks_dir
from .bench import default_cache_dir
from .offline import WIDGET_VIEW, latex_to_mathml, static_view
from .provenance import machine, versions

MARKER = ".companion-book"  # marks a folder this module built (and may therefore empty and rebuild)
TITLE = "Efficient Diffusion Companion"
EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*["']((?:https?:)?//[^"']+)""", re.I)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


class BookError(ValueError):
    """A bad request to the book builder (unknown chapter, unusable output folder, a missing build tool)."""


# ----------------------------------------------------------------------------- chapters
def all_chapters(folder: Path | None = None) -> list[Path]:
    """Every chapter in ``folder`` (default: the companion's notebooks), in file-name order (= chapter order)."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("_"))
    if not found:
        raise BookError(f"no chapters (*.ipynb) in {folder}")
    return found


def select_chapters(names: list[str] | None, folder: Path | None = None) -> list[Path]:
    """The chapters named (``00_tour`` or ``00_tour.ipynb``), in chapter order; all of them when ``names`` is empty.
    An unknown name is refused with the list of valid ones."""
    chapters = all_chapters(folder)
    if not names:
        return chapters
    by_stem = {p.stem: p for p in chapters}
    unknown = [n for n in names if Path(n).stem not in by_stem or Path(n).suffix not in ("", ".ipynb")]
    if unknown:
        raise BookError(f"unknown chapter(s) {', '.join(map(repr, unknown))}; valid chapters: {', '.join(by_stem)}")
    wanted = {Path(n).stem for n in names}
    return [p for p in chapters if p.stem in wanted]


# ----------------------------------------------------------------------------- pages
def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def book_view(nb):
    """An executed chapter as a site page shows it: :func:`static_view`, then no inlined plotly.js (the site loads
    it once from ``_static/``) and no widget view left (the site has no widget manager; a widget without a static
    face shows its text form)."""
    nb = static_view(nb)
    plotlyjs = _plotlyjs()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            data.pop(WIDGET_VIEW, None)
            if "text/html" in data:
                page = "".join(data["text/html"])
                if plotlyjs in page:
                    data["text/html"] = page.replace(plotlyjs, "")
    return nb


def figure_div(fig) -> str:
    """A plotly figure as a page fragment that uses the site's one copy of plotly.js."""
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True})


def taxonomy_page(chapter_stems: set[str]) -> str:
    """The survey's taxonomy as a page: the sunburst, and one table per group (lever, method, year, arXiv, family,
    the chapter that demonstrates it, linked when that chapter is in the book, and whose placement it is)."""
    df = taxonomy.load_taxonomy()
    lines = ["# The survey's taxonomy", "",
             "The map every chapter places itself on: the survey's two groups of levers (efficient design "
             "strategies, EDS, and efficient process strategies, EPS), each lever's methods, and the chapter that "
             "demonstrates them. Rows marked *companion reading* are this companion's own placement, not the "
             "survey's (source: `assets/taxonomy.csv`).", "",
             "```{raw} html", figure_div(taxonomy.sunburst(df)), "```", ""]
    for group, name in taxonomy.GROUPS.items():
        lines += [f"## {name} ({group})", "", "| lever | method | year | arXiv | family | chapter | placement |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in df[df.group == group].sort_values(["lever", "year", "method"]).iterrows():
            chapter = (f"[{r.chapter}](notebooks/{r.chapter}.ipynb)" if r.chapter in chapter_stems else f"{r.chapter}")
            cells = [r.lever, r.method, str(r.year), f"[{r.arxiv}](https://arxiv.org/abs/{r.arxiv})", r.family,
                     chapter, r.placement]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _doc_links(markdown: str) -> list[str]:
    """Relative link targets in markdown (no URL, no pure anchor), without their anchors."""
    out = []
    for target in _LINK.findall(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue
        out.append(target.split("#")[0])
    return [t for t in out if t]


def _markdown_of(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _copy_page(src_root: Path, rel: Path, site: Path, pages: list[str]) -> None:
    """Copy a markdown page (maths as MathML) or another file a page links to into the site source, with the
    files it links to in turn; markdown pages are added to ``pages`` (they need a place in the navigation)."""
    target = site / rel
    source = src_root / rel
    if target.exists() or not source.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix != ".md":
        shutil.copyfile(source, target)
        return
    text = source.read_text(encoding="utf-8")
    target.write_text(latex_to_mathml(text), encoding="utf-8")
    pages.append(rel.with_suffix("").as_posix())
    for link in _doc_links(text):
        _copy_linked(src_root, rel.parent / link, site, pages)


def _copy_linked(src_root: Path, rel: Path, site: Path, pages: list[str]) -> None:
    resolved = Path(os.path.normpath(rel))
    if resolved.parts and resolved.parts[0] != ".." and resolved.suffix != ".ipynb":
        _copy_page(src_root, resolved, site, pages)


CONF = '''# Written by companion.book: the site configuration (regenerated on every build).
project = {title!r}
author = "the Efficient Diffusion Companion contributors"
extensions = ["myst_nb"]
html_theme = "sphinx_book_theme"
html_title = {title!r}
nb_execution_mode = "off"          # chapters arrive executed by the companion's runner
nb_ipywidgets_js = {{}}             # no widget manager from a CDN: panels show their static faces
nb_merge_streams = True
myst_heading_anchors = 3           # ../docs/glossary.md#nfe resolves to the glossary's heading
myst_enable_extensions = []        # no dollarmath: maths arrives as MathML, so no page asks for MathJax
html_static_path = ["_static"]
html_js_files = ["plotly.min.js"]  # one local copy of plotly.js for every figure on every page
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_context = {{"default_mode": "light"}}  # the theme's colour mode; unset, its script logs an error on every page
html_theme_options = {{"home_page_in_toc": True, "show_navbar_depth": 1, "show_toc_level": 2,
                      "navigation_with_keys": False, "use_download_button": False, "use_fullscreen_button": False,
                      "use_repository_button": False, "use_source_button": False, "use_issues_button": False}}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
'''


def write_source(site: Path, chapters: list[Path], executed: dict, rows: list[dict], root: Path) -> list[str]:
    """Write the Sphinx source folder ``site``: conf.py, the index with the navigation, the taxonomy page, the
    executed chapters, the glossary, instructor pages and the GPU result pages; returns the markdown pages copied."""
    site.mkdir(parents=True)
    (site / "_static").mkdir()
    (site / "_static" / "plotly.min.js").write_text(_plotlyjs(), encoding="utf-8")
    (site / "conf.py").write_text(CONF.format(title=TITLE), encoding="utf-8")
    (site / "taxonomy.md").write_text(taxonomy_page({p.stem for p in chapters}), encoding="utf-8")
    import nbformat

    (site / "notebooks").mkdir()
    pages: list[str] = []
    for path in chapters:
        nb = executed[path.stem]
        nbformat.write(nb, site / "notebooks" / path.name)
        for link in _doc_links(_markdown_of(nb)):
            _copy_linked(root, Path("notebooks") / link, site, pages)
    for rel in ["docs/glossary.md",
                *sorted(p.relative_to(root).as_posix() for p in (root / "docs" / "instructor").glob("*.md")),
                *sorted(p.relative_to(root).as_posix() for p in (root / "benchmarks" / "results").glob("gpu_*.md"))]:
        _copy_page(root, Path(rel), site, pages)

    def toctree(caption: str, entries: list[str]) -> list[str]:
        return ["```{toctree}", f":caption: {caption}", ":maxdepth: 1", "", *entries, "```", ""] if entries else []

    reference = [p for p in pages if p == "docs/glossary"]
    instructor = [p for p in pages if p.startswith("docs/instructor/")]
    gpu = [p for p in pages if p.startswith("benchmarks/results/gpu_")]
    other = [p for p in pages if p not in reference + instructor + gpu]
    table = ["| chapter | executed in (s) | status |", "|---|---|---|"]
    for row in rows:
        table.append(f"| [{row['chapter']}](notebooks/{row['chapter']}.ipynb) | {row['execute_s']:.1f} | {row['status'].replace('|', '/')} |")
    index = [f"# {TITLE}", "",
             "The companion's chapters on efficient diffusion models, executed: every figure, table and image grid "
             "below was measured when this site was built, on the machine named at the bottom of this page. "
             "The panels show their last state as static images and figures; open a chapter in JupyterLab "
             "(`companion lab`) to move their controls.", "",
             *toctree("Start", ["taxonomy"]),
             *toctree("Chapters", [f"notebooks/{p.stem}" for p in chapters]),
             *toctree("Reference", reference + other),
             *toctree("Measured on GPUs", gpu),
             *toctree("For instructors", instructor),
             "## This build", "", *table, "",
             f"Built {time.strftime('%Y-%m-%d %H:%M %Z')} on {html.escape(machine().get('processor') or '?')} "
             f"with {machine().get('cpu_count')} CPUs; chapter times include the sweep cache as it was "
             "(a warm cache skips runs measured before).", ""]
    (site / "index.md").write_text("\n".join(index), encoding="utf-8")
    return pages


# ----------------------------------------------------------------------------- Sphinx
def run_sphinx(site: Path, html_dir: Path, doctrees: Path, log: Path) -> dict[str, float]:
    """Build ``site`` into ``html_dir`` in this process; returns seconds per page (read + write) and ``_site``
    (everything else: setup, search index, static files). Warnings go to ``log``."""
    try:
        from sphinx.application import Sphinx
    except ImportError as e:
        raise BookError(f"companion book needs Sphinx and MyST-NB: pip install -e '.[book]' ({e})") from None
    times: dict[str, float] = {}

    def timed(method):
        def run(docname, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(docname, *args, **kwargs)
            finally:
                times[docname] = times.get(docname, 0.0) + time.perf_counter() - t0
        return run

    def wrap(app):
        app.builder.read_doc = timed(app.builder.read_doc)
        app.builder.write_doc = timed(app.builder.write_doc)

    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as warnings:
        app = Sphinx(str(site), str(site), str(html_dir), str(doctrees), "html", status=None, warning=warnings,
                     freshenv=True, parallel=0)
        app.connect("builder-inited", wrap)
        wrap(app)  # the builder exists already once Sphinx() returns
        app.build()
    times["_site"] = time.perf_counter() - t0 - sum(times.values())
    if app.statuscode:
        raise BookError(f"Sphinx failed (exit {app.statuscode}); see {log}")
    return times


def external_references(html_dir: Path) -> list[str]:
    """Every script, stylesheet, image or frame a built page would load from another host ("page: URL")."""
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for url in EXTERNAL.findall(page.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{page.relative_to(html_dir)}: {url}")
    return found


# ----------------------------------------------------------------------------- the command's work
def prepare_out(out: Path) -> None:
    """Make ``out`` a book build folder: created when missing, emptied when it holds an earlier book; any other
    non-empty folder (or a file) is refused rather than overwritten."""
    if out.exists() and not out.is_dir():
        raise BookError(f"--out {out} is a file; give a folder for the book")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise BookError(f"--out {out} is a non-empty folder that holds no earlier book ({MARKER} missing); "
                            "give an empty or new folder")
        for name in ("src", "html", "doctrees", "jupyter_execute"):  # jupyter_execute: MyST-NB's own output folder
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("built by companion book\n", encoding="utf-8")


def failed_chapter(path: Path, why: str):
    """A chapter that failed to execute, as it is stored, with the failure at the top (the site never shows a
    page as if it ran)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    note = nbformat.v4.new_markdown_cell(f"**This chapter failed to execute when the book was built** ({why}); "
                                         "it is shown without outputs.")
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, note)
    return nb


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def build(out: Path, chapters: list[Path], execute: Callable, summarise: Callable[[BaseException], str],
          progress: Callable[[str], None] = print) -> dict:
    """Execute ``chapters`` with ``execute(path) -> notebook`` and build the site under ``out`` (``out/html``).
    Returns the times document that is also written to ``out/book_times.json``."""
    out = Path(out).resolve()
    prepare_out(out)
    root = chapters[0].parent.parent  # the checkout (or the installed bundle) the chapters belong to
    load_start = _load()
    cache = default_cache_dir()
    cached_runs = len(list(cache.glob("*.json"))) if cache.is_dir() else 0
    t_start = time.perf_counter()
    executed, rows = {}, []
    for path in chapters:
        progress(f"executing {path.name} ...")
        t0 = time.perf_counter()
        try:
            nb, status = book_view(execute(path)), "ok"
        except Exception as e:  # report the chapter and go on with the next one
            status = summarise(e)
            nb = failed_chapter(path, status)
        executed[path.stem] = nb
        rows.append({"chapter": path.stem, "execute_s": round(time.perf_counter() - t0, 1), "status": status})
        progress(f"  {path.name}: {rows[-1]['execute_s']:.1f} s {status}")
    t_exec = time.perf_counter() - t_start
    pages = write_source(out / "src", chapters, executed, rows, root)
    progress("building the site ...")
    times = run_sphinx(out / "src", out / "html", out / "doctrees", out / "sphinx-warnings.log")
    for row in rows:
        row["build_s"] = round(times.get(f"notebooks/{row['chapter']}", 0.0), 2)
    external = external_references(out / "html")
    warnings = [ln for ln in (out / "sphinx-warnings.log").read_text(encoding="utf-8").splitlines() if ln.strip()]
    doc = {"command": "companion book", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
           "versions": versions(), "load_average_1m_at_start_and_end": [load_start, _load()],
           "sweep_cache": {"folder": str(cache), "runs_at_start": cached_runs},
           "thread_settings": {k: os.environ.get(k) for k in ("COMPANION_THREADS", "OMP_NUM_THREADS")},
           "chapters": rows, "other_pages": {k: round(v, 2) for k, v in times.items() if not k.startswith("notebooks/")},
           "markdown_pages": pages, "execute_seconds": round(t_exec, 1),
           "build_seconds": round(sum(times.values()), 1), "total_seconds": round(time.perf_counter() - t_start, 1),
           "sphinx_warnings": len(warnings), "external_references": external,
           "index": str(out / "html" / "index.html")}
    (out / "book_times.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc
