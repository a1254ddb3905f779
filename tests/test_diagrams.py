"""The drawn diagrams: the committed SVGs are what the code draws, they are small valid SVG, the taxonomy follows
its data, and each is shown where a chapter (or the instructor guide) explains it."""
import xml.etree.ElementTree as ET
from pathlib import Path

from companion import cli, diagrams
from companion.taxonomy import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]
SHOWN_IN = {
    "taxonomy.svg": "notebooks/01_foundations.ipynb",
    "solver_step.svg": "notebooks/06_fast_solvers.ipynb",
    "progressive_distillation.svg": "notebooks/09_distillation.ipynb",
    "consistency_distillation.svg": "notebooks/09_distillation.ipynb",
    "cascade.svg": "notebooks/03_multiscale.ipynb",
}


def test_committed_diagrams_equal_the_regenerated_ones(tmp_path):
    committed = ROOT / "assets" / "diagrams"
    assert diagrams.stale(committed) == [], "run `companion diagrams` and commit assets/diagrams/"
    diagrams.write_all(tmp_path)
    for name in diagrams.DIAGRAMS:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes()
    assert sorted(p.name for p in committed.glob("*.svg")) == sorted(diagrams.DIAGRAMS)


def test_diagrams_are_small_valid_svg_with_a_title():
    for name, draw in diagrams.DIAGRAMS.items():
        text = draw()
        assert len(text.encode()) < 20_000, name
        root = ET.fromstring(text)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.find("{http://www.w3.org/2000/svg}title").text.strip()
        assert text == draw()  # deterministic


def test_taxonomy_diagram_follows_the_csv():
    text = diagrams.taxonomy()
    for _, row in load_taxonomy().iterrows():
        assert f"{row['method']} ({row['year']})".replace("&", "&amp;") in text
        assert row["chapter"] in text


def test_each_diagram_is_shown_where_it_is_explained():
    for name, where in SHOWN_IN.items():
        assert f"assets/diagrams/{name}" in (ROOT / where).read_text(encoding="utf-8"), (name, where)


def test_check_command_flags_a_changed_file(tmp_path, capsys):
    assert cli.main(["diagrams", "--out", str(tmp_path)]) == 0
    assert cli.main(["diagrams", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "cascade.svg").write_text("<svg/>", encoding="utf-8")
    assert cli.main(["diagrams", "--check", "--out", str(tmp_path)]) == 1
    assert "cascade.svg: differs" in capsys.readouterr().out
