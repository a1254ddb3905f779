"""The offline view: static faces instead of widget views, plotly figures and maths that need no network."""
import json
import re

import nbformat
import plotly.graph_objects as go

from companion.offline import WIDGET_VIEW, export_html, latex_to_mathml, pre_save_hook, static_view, strip_widget_views


def test_maths_become_mathml_and_code_stays_as_written():
    md = "Noise $\\sigma_t$ and $$x_t = \\alpha_t x_0 + \\sigma_t \\varepsilon$$ but `$COMPANION_CACHE` and ```\n$HOME\n```"
    out = latex_to_mathml(md)
    assert out.count("<math") == 2 and 'display="block"' in out and 'display="inline"' in out
    assert "`$COMPANION_CACHE`" in out and "$HOME" in out
    assert "costs $5 and $6" == latex_to_mathml("costs $5 and $6")  # money is not maths


def test_unreadable_tex_is_left_as_written():
    md = "odd $\\begin{unknownenv}x$ here"
    assert latex_to_mathml(md).count("<math") in (0, 1)  # never an empty gap: either MathML or the source
    assert "x" in latex_to_mathml(md)


def _figure_output(fig):
    return nbformat.v4.new_output("display_data", data={"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": "Figure"})


def _notebook():
    nb = nbformat.v4.new_notebook()
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    c1, c2 = nbformat.v4.new_code_cell("fig.show()"), nbformat.v4.new_code_cell("fig.show()")
    c1.outputs, c2.outputs = [_figure_output(fig)], [_figure_output(fig)]
    panel = nbformat.v4.new_code_cell("panel")
    panel.outputs = [nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
                                                                   "text/html": "<div class='static-face'>last images</div>", "text/plain": "Panel"})]
    nb.cells = [nbformat.v4.new_markdown_cell("The chain $x_t$"), c1, c2, panel]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_static_view_draws_figures_with_plotlyjs_once_and_drops_widget_views():
    view = static_view(_notebook())
    html1 = view.cells[1].outputs[0]["data"]["text/html"]
    html2 = view.cells[2].outputs[0]["data"]["text/html"]
    assert "Plotly.newPlot" in html1 and "Plotly.newPlot" in html2
    assert len(html1) > 1_000_000 > len(html2)  # plotly.js inlined in the first figure only
    assert WIDGET_VIEW not in view.cells[3].outputs[0]["data"] and "widgets" not in view.metadata
    assert "<math" in view.cells[0].source


def test_exported_page_fetches_nothing_from_the_web():
    page = export_html(_notebook())
    srcs = re.findall(r"<script[^>]*src=[\"']([^\"']+)", page)
    assert not [s for s in srcs if s.startswith(("http:", "https:", "//"))], srcs
    assert "cdnjs" not in page and "unpkg.com" not in page and "require.js" not in page.lower()
    assert "<math" in page and "static-face" in page and page.count("Plotly.newPlot") == 2


def test_pre_save_hook_keeps_the_static_face():
    nb = json.loads(nbformat.writes(_notebook()))
    model = {"type": "notebook", "content": nb}
    pre_save_hook(model, path="x.ipynb", contents_manager=None)
    data = model["content"]["cells"][3]["outputs"][0]["data"]
    assert WIDGET_VIEW not in data and "static-face" in "".join(data["text/html"])
    assert strip_widget_views(model["content"]) == 0
    pre_save_hook({"type": "file", "content": "text"})  # other files pass untouched


def test_lab_installs_the_pre_save_hook(tmp_path):
    from companion.cli import lab_command

    assert "--FileContentsManager.pre_save_hook=companion.offline.pre_save_hook" in lab_command(tmp_path, 8888)
