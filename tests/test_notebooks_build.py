"""tools/build_notebooks.py's exercises: solution regions, the student notebooks, --check over both (issue #17).

Each chapter is built twice from its source: the instructor notebook (notebooks/NN_name.ipynb, executed, solutions
in: what nbval runs) and the student notebook (notebooks/student/NN_name.ipynb, unexecuted, each
``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region replaced by its instruction and ``name = ...`` placeholders).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import nbformat
import pytest

from course_lib.notebook import NOT_DONE, answered

REPO = Path(__file__).resolve().parents[1]


def _load_build_tool():
    spec = importlib.util.spec_from_file_location("build_notebooks", REPO / "tools" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bn = _load_build_tool()
CHAPTERS = bn.source_names()
EXERCISE_CHAPTERS = ["01_export", "02_build", "04_qkv_fusion", "05_int8", "06_yolov5"]

CELL = '''\
x = 2
with open("f") as f:
    ### BEGIN SOLUTION: y, twice x; z, x squared
    y = 2 * x
    z = x ** 2
    helper = 1
    ### END SOLUTION
if answered("exercise 1", y, z):
    print(y + z)
'''


def test_student_source_replaces_each_region_with_its_instruction_and_placeholders():
    assert bn.student_source(CELL) == '''\
x = 2
with open("f") as f:
    # YOUR CODE HERE: y, twice x; z, x squared
    y = ...  # your answer
    z = ...  # your answer
if answered("exercise 1", y, z):
    print(y + z)
'''                                                 # helper: not read by the check, so no placeholder
    assert bn.student_source("x = 1\n") == "x = 1\n"
    block = "if True:\n    ### BEGIN SOLUTION: set x.y\n    x.y = 1\n    ### END SOLUTION\n"
    assert bn.student_source(block) == "if True:\n    # YOUR CODE HERE: set x.y\n    pass\n"   # still a block


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION: a\nx = 1\n", "without its ### END SOLUTION"),
    ("x = 1\n### END SOLUTION\n", "without a ### BEGIN SOLUTION"),
    ("### BEGIN SOLUTION: a\n### BEGIN SOLUTION: b\n### END SOLUTION\n", "inside the region opened on line 1"),
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "<what the student writes>"),
])
def test_bad_markers_are_one_clear_error(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bn.student_source(source)


def test_answered_says_not_done_yet_instead_of_raising():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert answered("exercise 1", 3, [1]) is True
        assert answered("exercise 2", 3, ...) is False
    assert out.getvalue() == f"exercise 2: {NOT_DONE}\n"


def _outside(source: str) -> tuple[list[str], list[str]]:
    """The source's text between solution regions, and each region's lines (markers included)."""
    lines = source.splitlines(keepends=True)
    parts, regions, start = [], [], 0
    for begin, end, _, _ in bn.solution_regions(source):
        parts.append("".join(lines[start:begin]))
        regions.append(lines[begin:end + 1])
        start = end + 1
    return parts + ["".join(lines[start:])], regions


@pytest.mark.parametrize("name", CHAPTERS)
def test_student_notebook_differs_only_inside_solution_regions(name):
    teacher = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    student = nbformat.read(REPO / "notebooks" / "student" / f"{name}.ipynb", as_version=4)
    assert student.metadata == bn.notebook_from_source(bn.SOURCES / f"{name}.py").metadata
    assert [(c.cell_type, c.id, c.metadata) for c in student.cells] == \
        [(c.cell_type, c.id, c.metadata) for c in teacher.cells]
    regions_seen = 0
    for t, s in zip(teacher.cells, student.cells):
        if s.cell_type == "code":
            assert s.outputs == [] and s.execution_count is None          # stored unexecuted
        outside, regions = _outside(t.source)
        if not regions:
            assert s.source == t.source
            continue
        regions_seen += len(regions)
        pattern = "(.*?)".join(re.escape(part) for part in outside)
        match = re.fullmatch(pattern, s.source, flags=re.S)
        assert match, f"{name} {t.id}: the student cell differs outside its solution regions"
        for replacement, solution in zip(match.groups(), regions):
            first, *placeholders = replacement.splitlines()
            assert first.strip().startswith(bn.YOUR_CODE) and "BEGIN SOLUTION" not in replacement
            assert all(re.fullmatch(r"\s*\w+ = \.\.\.  # your answer", p) for p in placeholders), replacement
            body = [line for line in solution[1:-1] if line.strip()]
            assert not any(line.rstrip("\n") in replacement.splitlines() for line in body), "solution leaked"
    assert (regions_seen > 0) == (name in EXERCISE_CHAPTERS), name


@pytest.mark.parametrize("name", CHAPTERS)
def test_no_later_cell_needs_an_answer(name):
    """Only an exercise's own cell reads its answers: in the student notebook they are ``...`` or missing."""
    assert bn.solution_leaks(bn.notebook_from_source(bn.SOURCES / f"{name}.py")) == []


def test_a_leak_is_found():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL), nbformat.v4.new_code_cell("print(z)"),
                                         nbformat.v4.new_code_cell("y = 3\nprint(y)")])
    assert bn.solution_leaks(nb) == ["Cell 1 ('print(z)') reads 'z', an answer of the exercise in Cell 0 "
                                     "('x = 2'): the student notebook does not have it"]


def test_check_covers_both_notebooks(tmp_path, monkeypatch, capsys):
    notebooks, src = tmp_path / "notebooks", tmp_path / "notebooks" / "src"
    src.mkdir(parents=True)
    monkeypatch.setattr(bn, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(bn, "SOURCES", src)
    monkeypatch.setattr(bn, "STUDENT", notebooks / "student")
    source = src / "01_demo.py"
    source.write_text("# %%\n" + CELL.replace('with open("f") as f:', "if True:"))
    nbformat.write(bn.notebook_from_source(source), notebooks / "01_demo.ipynb")   # the instructor's, built
    assert bn.main(["--check"]) == 1
    assert "notebooks/student/01_demo.ipynb is missing" in capsys.readouterr().out
    assert bn.main(["--student-only"]) == 0 and bn.main(["--check"]) == 0
    student = nbformat.read(notebooks / "student" / "01_demo.ipynb", as_version=4)
    assert "y = ...  # your answer" in student.cells[0].source and "2 * x" not in student.cells[0].source
    student.cells[0].source = student.cells[0].source.replace("y = ...", "y = 2 * x")     # a solution in it
    nbformat.write(student, notebooks / "student" / "01_demo.ipynb")
    capsys.readouterr()
    assert bn.main(["--check"]) == 1 and "student/01_demo.ipynb: cell #0" in capsys.readouterr().out
    (notebooks / "student" / "02_gone.ipynb").write_text("{}")
    assert bn.main(["--check"]) == 1 and "02_gone.ipynb has no source" in capsys.readouterr().out
