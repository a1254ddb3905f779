"""The chapters as a reader without a live kernel sees them: the HTML report, and a notebook reopened later.

Three things make an executed notebook unreadable offline, and each has one fix here:

* widget views: nbconvert (and JupyterLab, on a reopened notebook whose kernel is gone) prefer a widget view over
  every other representation, and a widget view needs the widget manager and the kernel's model ("Error
  displaying widget: model not found"). Every panel also carries a static ``text/html`` face, so
  :func:`static_view` drops the widget view wherever a static one exists, and :func:`pre_save_hook` (installed by
  ``companion lab``) does the same to the file each time the notebook is saved; the live view in the browser is
  untouched.
* plotly figures: ``fig.show()`` stores the figure as plotly's own JSON mime type, which nbconvert cannot draw,
  and plotly's HTML loads plotly.js through require.js from a CDN. :func:`static_view` renders each figure to
  HTML with plotly.js inlined once per page.
* equations: nbconvert loads MathJax from a CDN. :func:`static_view` converts the markdown cells' ``$...$`` and
  ``$$...$$`` to MathML (browsers draw it natively), and :func:`export_html` leaves out every CDN script.
"""
from __future__ import annotations

import copy
import json
import re

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PLOTLY = "application/vnd.plotly.v1+json"
STATIC = ("text/html", "image/png", "image/svg+xml")

# nbconvert's lab template with every script it would fetch from the web left out (require.js, MathJax, mermaid,
# the widget manager): the page holds only what static_view put into it.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""

# Code spans and fenced blocks are not maths: `$COMPANION_CACHE` must stay as written.
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?!\s)([^$\n]+?)(?<!\s)\$(?!\d)")


def latex_to_mathml(markdown: str) -> str:
    """``markdown`` with its ``$$...$$`` (display) and ``$...$`` (inline) maths replaced by MathML. A formula
    the converter cannot read is left as written (the reader then sees the TeX source, never an empty gap)."""
    from latex2mathml.converter import convert

    def render(tex: str, display: str) -> str:
        try:
            return convert(tex.strip(), display=display)
        except Exception:  # latex2mathml raises many kinds of error on TeX it does not know
            return None

    def sub_display(m):
        out = render(m.group(1), "block")
        return m.group(0) if out is None else f"\n\n{out}\n\n"

    def sub_inline(m):
        out = render(m.group(1), "inline")
        return m.group(0) if out is None else out

    parts = _CODE.split(markdown)
    for i in range(0, len(parts), 2):  # even parts are outside code
        parts[i] = _INLINE.sub(sub_inline, _DISPLAY.sub(sub_display, parts[i]))
    return "".join(parts)


def _plotly_html(fig_json, first: bool) -> str:
    import plotly.io as pio

    fig = pio.from_json(json.dumps(fig_json), skip_invalid=True)
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False, config={"responsive": True})


def static_view(nb):
    """A copy of ``nb`` as a reader without a live front end should see it: static faces instead of widget views,
    plotly figures as HTML (plotly.js inlined in the first), markdown maths as MathML."""
    nb = copy.deepcopy(nb)
    first_figure = True
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = latex_to_mathml(cell.source)
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and any(k in data for k in STATIC):
                del data[WIDGET_VIEW]
            if PLOTLY in data:
                data["text/html"] = _plotly_html(data.pop(PLOTLY), first_figure)
                first_figure = False
            if "text/html" in data and first_figure and "Plotly.newPlot" in "".join(data["text/html"]):
                # a static face that draws a plotly figure expects plotly.js on the page: put it in front once
                data["text/html"] = _with_plotlyjs("".join(data["text/html"]))
                first_figure = False
    nb.metadata.pop("widgets", None)
    return nb


def _with_plotlyjs(html: str) -> str:
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>' + html


def export_html(nb) -> str:
    """The executed notebook as one self-contained HTML page that needs no network (see the module notes)."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"companion_offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="companion_offline.html.j2")
    body, _ = exporter.from_notebook_node(static_view(nb))
    return body


def strip_widget_views(nb: dict) -> int:
    """Drop widget views that have a static face from a notebook (as JSON), in place; returns how many."""
    dropped = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            data = out.get("data") or {}
            if WIDGET_VIEW in data and any(k in data for k in STATIC):
                del data[WIDGET_VIEW]
                dropped += 1
    return dropped


def pre_save_hook(model, **kwargs):
    """Jupyter Server's pre-save hook: a saved notebook keeps its panels' static faces, not their widget views, so
    reopening it after the kernel is gone shows the last images and figures instead of an error box."""
    if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        strip_widget_views(model["content"])
