"""Implement-it exercises: for each one, the chapter's solution passes, the student version (its solution replaced
by the stub) fails with a message saying it is not written yet, and wrong solutions (a sign flipped, a factor off)
fail with a message saying where they differ. The student notebooks hold no solution line and are valid nbformat."""
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from companion import cli, implement
from companion.models import load

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTER = {e.key: e.chapter for e in implement.EXERCISES.values()}


def _cell(key: str) -> str:
    """The implement-it cell of ``key``'s chapter that grades ``key`` (the one source of solution and stub)."""
    nb = nbformat.read(NOTEBOOKS / f"{CHAPTER[key]}.ipynb", as_version=4)
    cells = [c.source for c in nb.cells if implement.TAG in c.metadata.get("tags", []) and f'grade("{key}"' in c.source]
    assert len(cells) == 1, f"{CHAPTER[key]} must hold exactly one implement-it cell grading {key!r}"
    return cells[0]


@pytest.fixture(scope="module")
def model():
    return load("digits-cond")


def _run(source: str, model, capsys) -> tuple[dict, str]:
    capsys.readouterr()
    scope = {"model": model}
    exec(compile(source, "<cell>", "exec"), scope)  # noqa: S102  (the chapter's own cell, as the kernel runs it)
    return scope, capsys.readouterr().out


@pytest.mark.parametrize("key", list(implement.EXERCISES))
def test_solution_passes_student_version_and_wrong_solutions_fail(key, model, capsys):
    ex = implement.EXERCISES[key]
    source = _cell(key)
    scope, out = _run(source, model, capsys)
    assert out.startswith(f"implement {ex.key}: PASS"), out
    solution = scope[ex.key]

    # the student version: the same cell with the solution stripped
    student = implement._strip_source(source, key)
    assert implement.BEGIN not in student and "raise NotImplementedError" in student
    _, out = _run(student, model, capsys)
    assert out.startswith(f"implement {ex.key}: NOT YET — measured `{ex.key}` is not written yet"), out
    assert ex.signature in out  # the message says what to write

    # deliberately wrong solutions: the chapter's solution with its output scaled or negated
    kw = {"model": model}
    if ex.needs_model:
        wrong = {"negated": lambda *a: not solution(*a)}
    else:
        wrong = {"a factor off": lambda *a: 1.1 * solution(*a), "sign flipped": lambda *a: -solution(*a)}
    for what, fn in wrong.items():
        assert implement.grade(key, fn, **kw) is False, what
        text = capsys.readouterr().out
        assert text.startswith(f"implement {ex.key}: NOT YET — measured differs in"), text
        assert "worst at" in text and "the reference" in text

    # the known mistakes (a sign flipped in a term, a factor of a term off): each fails and is named
    for description, fn in ex.mistakes.items():
        assert implement.grade(key, fn, **kw) is False, description
        text = capsys.readouterr().out
        assert "NOT YET" in text and f"your output matches {description}" in text, text


def test_reference_cases_are_what_the_package_computes():
    # the DDIM grader's reference is diffusers' step: check one case against the closed form independently
    case = implement.cases("ddim_step")[3]
    x_t, eps, a_t, a_prev = case.args
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    assert torch.allclose(case.reference, a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, atol=1e-4)
    # the Euler-Maruyama grader reads real steps of sample_sde: consecutive cases chain (one step's output is the
    # next step's input)
    em = implement.cases("em_step")
    assert all(torch.equal(a.reference, b.args[0]) for a, b in zip(em, em[1:]))


def test_grade_reports_exceptions_none_and_shapes(capsys):
    assert implement.grade("cfg", lambda c, u, w: None) is False
    assert "returned None" in capsys.readouterr().out
    assert implement.grade("cfg", lambda c, u, w: c[:1]) is False
    assert "output of shape (1, 1, 8, 8)" in capsys.readouterr().out
    assert implement.grade("cfg", lambda c, u, w: 1 / 0) is False
    assert "raised ZeroDivisionError" in capsys.readouterr().out
    assert implement.grade("pd_target", lambda x, e, s0, s2: x * float("nan")) is False
    assert "NOT YET" in capsys.readouterr().out


def test_grade_refuses_unknown_exercises_and_non_functions():
    with pytest.raises(ValueError, match="unknown implement-it exercise 'ddpm'; valid: ddim_step, cfg"):
        implement.grade("ddpm", lambda: None)
    with pytest.raises(TypeError, match="the function you wrote"):
        implement.grade("cfg", None)


def test_student_notebooks_hold_no_solution_line_and_are_valid(tmp_path, capsys):
    assert cli.main(["student-notebooks", str(NOTEBOOKS), "--out", str(tmp_path)]) == 0
    chapters = set(CHAPTER.values())
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        solution = nbformat.read(path, as_version=4)
        student_path = tmp_path / path.name
        student = nbformat.read(student_path, as_version=4)
        nbformat.validate(student)
        text = student_path.read_text(encoding="utf-8")
        lines = implement.solution_lines(solution)
        assert bool(lines) == (path.stem in chapters), path.name
        for line in lines:
            assert json.dumps(line)[1:-1] not in text, f"{path.name}: solution line {line!r} in the student notebook"
        assert implement.BEGIN not in text and implement.END not in text
        assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
        # everything but the solution blocks is unchanged
        assert [c.cell_type for c in student.cells] == [c.cell_type for c in solution.cells]
    assert "solution lines replaced by stubs" in capsys.readouterr().out


def test_student_notebooks_refuse_the_solution_folder_and_untagged_blocks(tmp_path, capsys):
    assert cli.main(["student-notebooks", str(NOTEBOOKS), "--out", str(NOTEBOOKS)]) == 2
    assert "where the solution notebooks are" in capsys.readouterr().err
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"def f():\n    {implement.BEGIN}\n    return 1\n    {implement.END}")])
    with pytest.raises(ValueError, match="not tagged 'implement-it'"):
        implement.student_notebook(nb)
    nb.cells[0].metadata["tags"] = [implement.TAG]
    nb.cells[0].source = f"def f():\n    {implement.BEGIN}\n    return 1\n"
    with pytest.raises(ValueError, match="without"):
        implement.student_notebook(nb)


def _exercise_prompts(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown" and "## Exercises" in c.source)


def test_instructor_guide_has_a_section_for_every_chapter_asking_why():
    guide = (NOTEBOOKS.parent / "docs" / "instructor" / "guide.md").read_text(encoding="utf-8")
    # "### 06 · Fast solvers" -> {"06"}; "### 12 and 13" (chapters named as not answered yet) -> {"12", "13"}
    sections = {n for line in guide.splitlines() if line.startswith("### ")
                for n in re.findall(r"\b(\d\d)b?\b", line.split("·")[0])}
    asking = [p.stem for p in sorted(NOTEBOOKS.glob("*.ipynb"))
              if any(w in _exercise_prompts(p).lower() for w in ("why", "explain", "which"))]
    assert asking, "no chapter asks why: the scan is broken"
    missing = [s for s in asking if s[:2] not in sections]
    assert not missing, f"the instructor guide has no answers for {missing}"


def test_syllabus_run_times_are_the_committed_measurements():
    # chapter_times.json times every chapter; chapter_times_changed.json (where present) re-times the chapters that
    # changed since, and its times are the ones cited for them
    results = NOTEBOOKS.parent / "benchmarks" / "results"
    measured = {}
    for name in ("chapter_times.json", "chapter_times_changed.json"):
        if (results / name).is_file():
            times = json.loads((results / name).read_text())
            measured.update({Path(r["notebook"]).stem: r["seconds"] for r in times["notebooks"] if r["status"] == "ok"})
    syllabus = (NOTEBOOKS.parent / "docs" / "instructor" / "syllabus.md").read_text(encoding="utf-8")
    readme = (NOTEBOOKS.parent / "README.md").read_text(encoding="utf-8")
    chapters = [line.split("`")[1] for line in readme.splitlines() if line.startswith("| `") and "ipynb" not in line
                and line.split("`")[1][:2].isdigit()]
    assert "00_tour" in chapters and "11_feature_caching" in chapters
    for ch in chapters:
        want = f"`{ch}` ({measured[ch]:.1f} s)" if ch in measured else f"`{ch}` (not yet measured)"
        assert want in syllabus, f"syllabus: expected {want!r} (from benchmarks/results/chapter_times*.json)"
