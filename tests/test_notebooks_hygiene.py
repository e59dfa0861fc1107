"""The notebook harness: committed notebooks' hygiene, the tag rules, the sanitizers, the build tool.

Hygiene tests read notebooks/*.ipynb without starting a kernel. Two tests start kernels (marked slow,
a few seconds each): one builds a tiny notebook with tools/build_notebooks.py, one runs nbval with
notebooks/conftest.py on tests/data/notebook_harness/harness_demo.ipynb.json.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
# named .json so that nbval does not collect it from tests/; copied to a temp notebooks/ folder to run
HARNESS_FIXTURE = REPO / "tests" / "data" / "notebook_harness" / "harness_demo.ipynb.json"

# The chapter notebooks that must exist (source in notebooks/src/, built .ipynb in notebooks/).
# The lead adds each chapter here when it lands, e.g. "01_export".
EXPECTED_CHAPTERS: list[str] = ["01_export", "02_build", "03_fp16_cudagraph", "04_qkv_fusion", "05_int8", "06_yolov5",
                                  "07_serve"]


def _load_build_tool():
    path = REPO / "tools" / "build_notebooks.py"
    spec = importlib.util.spec_from_file_location("build_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bn = _load_build_tool()
NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
NOT_RUN_HERE_TAGS = {*bn.HARDWARE_TAGS, bn.INTERACTIVE_TAG}  # cells the build may leave unrun


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _read(path: Path):
    return nbformat.read(path, as_version=4)


# --- the committed notebooks ------------------------------------------------------------------

def test_expected_chapters_exist():
    for name in EXPECTED_CHAPTERS:
        assert (NOTEBOOKS / "src" / f"{name}.py").exists(), f"notebooks/src/{name}.py is missing"
        assert (NOTEBOOKS / f"{name}.ipynb").exists(), (
            f"notebooks/{name}.ipynb is missing: python tools/build_notebooks.py --only {name}")


def test_every_source_is_built():
    missing = [n for n in bn.source_names() if not (NOTEBOOKS / f"{n}.ipynb").exists()]
    assert not missing, f"sources without a built notebook (run tools/build_notebooks.py): {missing}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_valid_notebook_with_python3_kernel(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel not python3"
    assert not {"widgets", "jupytext"} & set(nb.metadata), f"{path.name}: volatile metadata"


def _strings(value):
    """Every string inside an output (stream text, MIME data, tracebacks)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


STORED_NOTEBOOKS = NOTEBOOK_PATHS + sorted((NOTEBOOKS / "student").glob("*.ipynb"))


@pytest.mark.parametrize("path", STORED_NOTEBOOKS, ids=[str(p.relative_to(NOTEBOOKS)) for p in STORED_NOTEBOOKS])
def test_no_ansi_escapes_in_stored_outputs(path):
    """Terminal colour codes (ONNX Runtime's C-level log, a coloured traceback) show as garbage in a rendered
    notebook: silence or capture them where they are made (course_lib.onnx.session.ORT_LOG_SEVERITY)."""
    nb = _read(path)
    found = [bn.cell_name(nb, i) for i, cell in enumerate(nb.cells)
             if any("\x1b[" in text for text in _strings(cell.get("outputs", [])))]
    assert found == []


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_matches_its_jupytext_source(path):
    src = NOTEBOOKS / "src" / f"{path.stem}.py"
    assert src.exists(), f"{path.name} has no source {src.relative_to(REPO)}"
    assert len(_read(path).cells) == len(bn.notebook_from_source(src).cells), f"{path.name}: cell count"
    assert bn.source_mismatch(src, path) is None, bn.source_mismatch(src, path)


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_execution_counts(path):
    """Executed cells are numbered 1, 2, 3, ...; a cell with outputs has a count (nbval needs it)."""
    counts = []
    for k, cell in enumerate(_code_cells(_read(path))):
        where = f"{path.name} Cell {k}"
        assert cell.source.strip(), f"{where} is empty"
        if cell.outputs or not set(bn.cell_tags(cell)) & NOT_RUN_HERE_TAGS:
            assert cell.execution_count is not None, (
                f"{where} was not executed: python tools/build_notebooks.py --only {path.stem}")
        if cell.execution_count is not None:
            counts.append(cell.execution_count)
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    assert out.execution_count == cell.execution_count, f"{where}: execute_result count"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: execution counts {counts}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_outputs_are_clean(path):
    for k, cell in enumerate(_code_cells(_read(path))):
        where = f"{path.name} Cell {k}"
        assert "execution" not in cell.metadata, f"{where}: execution timing metadata"
        for out in cell.outputs:
            assert "image/svg+xml" not in out.get("data", {}), f"{where}: SVG output (figures must be PNG)"
            if out.output_type == "error":
                assert "raises-exception" in bn.cell_tags(cell), f"{where}: stored error {out.ename}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_tags_are_known(path):
    for i, cell in enumerate(_read(path).cells):
        unknown = set(bn.cell_tags(cell)) - bn.KNOWN_TAGS
        assert not unknown, (
            f"{path.name} cell #{i}: unknown tags {sorted(unknown)}; known: {sorted(bn.KNOWN_TAGS)}")


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_chapter_ends_with_self_check(path):
    cells = _code_cells(_read(path))
    assert cells and re.search(r"\bassert\b", cells[-1].source), (
        f"{path.name}: the last code cell must be a self-check (contain an assert)")


@pytest.mark.parametrize("name", bn.source_names())
def test_chapter_loads_the_needs_magic_first(name):
    first = _code_cells(bn.notebook_from_source(NOTEBOOKS / "src" / f"{name}.py"))[0]
    assert first.source.splitlines()[0] == "%load_ext course_lib.notebook", (
        f"{name}: the first code cell must start with %load_ext course_lib.notebook (the %%needs magic)")


@pytest.mark.parametrize("name", bn.source_names())
def test_needs_lines_and_tags_agree(name):
    """Each hardware tag in the built notebook comes from its cell's %%needs line, and the reverse."""
    nb = _read(NOTEBOOKS / f"{name}.ipynb")
    for k, cell in enumerate(_code_cells(nb)):
        tags = bn.cell_tags(cell)
        assert bn.tags_from_needs(cell.source, tags) == tags, f"{name} Cell {k}: rebuild (%%needs line without its tag)"


@pytest.mark.parametrize("name", bn.source_names())
def test_no_cell_reads_what_a_skipped_cell_would_define(name):
    """Run All on a machine without the hardware: no NameError downstream of a %%needs cell."""
    assert bn.guard_problems(bn.notebook_from_source(NOTEBOOKS / "src" / f"{name}.py")) == []


@pytest.mark.parametrize("name", bn.source_names())
def test_long_work_shows_progress(name):
    """Library calls keep their progress bars (a widget in JupyterLab, text on stderr under nbval, none in
    the stored notebook: course_lib/progress.py): a minute of [*] looks like a hang."""
    source = (NOTEBOOKS / "src" / f"{name}.py").read_text()
    assert "progress=False" not in source, f"{name}: let the call show its bar (drop progress=False)"


def test_tags_come_from_the_needs_line(tmp_path):
    src = tmp_path / "01_demo.py"
    src.write_text("# %%\n# %%needs gpu tensorrt --see docs/benchmarks.md\nx = 1\n\n"
                   "# %% tags=[\"nbval-ignore-output\"]\n# %%needs netron\ny = 2\n")
    cells = bn.notebook_from_source(src).cells
    assert bn.cell_tags(cells[0]) == ["requires-gpu", "requires-tensorrt"]
    assert bn.cell_tags(cells[1]) == ["nbval-ignore-output", "requires-netron"]
    src.write_text("# %% tags=[\"requires-gpu\", \"requires-tensorrt\"]\nx = 1\n")
    with pytest.raises(ValueError, match="start the cell with '%%needs gpu tensorrt'"):
        bn.notebook_from_source(src)
    src.write_text("# %%\n# %%needs gpus\nx = 1\n")
    with pytest.raises(ValueError, match="expected %%needs followed by some of gpu, tensorrt"):
        bn.notebook_from_source(src)


def test_guard_problems_name_the_cell_and_the_fix(tmp_path):
    src = tmp_path / "01_demo.py"
    src.write_text("# %%\nfeed = 1\n\n# %%\n# %%needs gpu\nimport numpy as np\nfeed = 2\nengines = [1]\n"
                   "def f(a):\n    return a\n\n"
                   "# %%\nprint([feed for feed in range(2)], f)\n\n# %%\nprint(feed, np.pi)\n\n"
                   "# %%\n# %%needs gpu tensorrt\nprint(engines)\n\n# %%\n# %%needs netron\nprint(engines)\n")
    problems = bn.guard_problems(bn.notebook_from_source(src))
    assert len(problems) == 4, problems
    assert problems[0].startswith("Cell 2 ('print([feed for feed in range(2)], f)') reads 'f', defined by Cell 1")
    assert [p.split(" reads ")[1].split(",")[0] for p in problems] == ["'f'", "'feed'", "'np'", "'engines'"]
    assert problems[-1].endswith("start it with %%needs gpu netron")


# The homeworks each chapter hands in from its "Hand it in" section (course_lib.homework.handin + a submit dry run).
HOMEWORK_CHAPTERS = {"01_export": ["1"], "02_build": ["1", "2"], "04_qkv_fusion": ["3"], "05_int8": ["int8"]}


@pytest.mark.parametrize("name", sorted(HOMEWORK_CHAPTERS))
def test_homework_chapters_have_a_hand_it_in_section(name):
    cells = _read(NOTEBOOKS / f"{name}.ipynb").cells
    heading = next((i for i, c in enumerate(cells) if c.cell_type == "markdown"
                    and re.search(r"^## Hand it in", c.source, re.M)), None)
    check = max(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Self-check" in c.source)
    assert heading is not None and heading < check, f"{name}: no '## Hand it in' section before the self-check"
    code = "\n".join(c.source for c in cells[heading:check] if c.cell_type == "code")
    assert "from course_lib.homework.handin import write_" in code and "SEED, STUDENT =" in code, name
    loop = re.search(r"submit\(hw,[^\n]*\bfor hw in \(([^)]*)\)", code)    # several homeworks in one comprehension
    submitted = set(re.findall(r'submit\("(\w+)"', code)) | set(re.findall(r'"(\w+)"', loop.group(1) if loop else ""))
    assert submitted == set(HOMEWORK_CHAPTERS[name]) and "out=None" in code, (
        f"{name}: expected a dry-run submit of homework(s) {HOMEWORK_CHAPTERS[name]}, found {sorted(submitted)}")


# --- tag rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("tags, have, demanded, expected", [
    ([], set(), set(), ("run", "")),
    (["nbval-ignore-output"], set(), {"gpu"}, ("run", "")),
    (["requires-gpu"], set(), set(), ("skip", "needs a CUDA GPU")),
    (["requires-tensorrt"], {"gpu"}, set(), ("skip", "needs TensorRT")),
    (["requires-gpu"], {"gpu"}, {"gpu"}, ("run", "")),
    (["requires-gpu", "requires-tensorrt"], {"gpu", "tensorrt"}, set(), ("run", "")),
    (["requires-gpu"], set(), {"gpu"}, ("fail", None)),
    (["requires-tensorrt"], {"gpu"}, {"gpu", "tensorrt"}, ("fail", None)),
    (["requires-tensorrt"], {"gpu"}, {"gpu"}, ("skip", "needs TensorRT")),
    (["interactive"], {"gpu", "tensorrt"}, {"gpu", "tensorrt"}, ("skip", bn.INTERACTIVE_REASON)),
    (["requires-trt-builder"], {"trt-builder"}, set(), ("run", "")),           # TensorRT for RTX on a CPU
    (["requires-trt-builder"], set(), set(), ("skip", "needs a TensorRT builder (pip install tensorrt-rtx)")),
    (["requires-trt-builder"], set(), {"trt-builder"}, ("fail", None)),
    (["requires-gpu", "requires-tensorrt"], {"trt-builder"}, set(), ("skip", "needs a CUDA GPU")),
])
def test_cell_plan(tags, have, demanded, expected):
    what, why = bn.cell_plan(tags, have, demanded)
    assert what == expected[0]
    if expected[1] is not None:
        assert why == expected[1]
    else:
        assert "COURSE_REQUIRE" in why


def test_demanded_capabilities():
    assert bn.demanded_capabilities(set()) == set()
    assert bn.demanded_capabilities({"tensorrt"}) == {"gpu", "tensorrt", "trt-builder"}
    assert bn.demanded_capabilities({"trt-builder"}) == {"trt-builder"}
    with pytest.raises(ValueError, match="COURSE_REQUIRE names unknown capability 'gpus'"):
        bn.demanded_capabilities({"gpus"})


# --- sanitizers (applied exactly as nbval 0.11 does: re.sub per pair, in file order) --------------

def _sanitize(text: str) -> str:
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns((NOTEBOOKS / "nbval_sanitize.cfg").read_text()):
        text = re.sub(regex, replace, text)
    return text


SANITIZED = [
    ("unet:  40%|####      | 4/10 [00:01<00:02,  2.99it/s]", "<progress bar>"),
    ("100%|██████████| 10/10 [00:00<00:00, 1234.56it/s]", "<progress bar>"),
    ("denoise: 12it [00:00, 80.1it/s]", "<progress bar>"),
    ("  0%|          | 0/10 [00:00<?, ?it/s]", "<progress bar>"),  # a tqdm widget's text/plain
    ("12.3 ms ± 1.2 ms per loop (mean ± std. dev. of 7 runs, 100 loops each)", "<timeit>"),
    ("at 2025-01-31 12:34:56.789, 2025-01-31T12:34:56+00:00", "at <datetime>, <datetime>"),
    ("Fri Jan 31 12:34:56 2025 (2025-01-31)", "<datetime> (<date>)"),
    ("elapsed 0:00:01 and 00:01:02.345", "elapsed <clock> and <clock>"),
    ("wrote /tmp/tmpk3j_x9ab/unet.onnx and ~/models/x.ckpt", "wrote <dir>/unet.onnx and <dir>/x.ckpt"),
    ("cwd is /work/main/notebooks, home /home/alice/cnsd/", "cwd is <dir>/notebooks, home <dir>/"),
    ("C:\\Users\\me\\course\\unet.onnx", "<dir>\\unet.onnx"),
    ("kept in tmpab12cd_x", "kept in <tmp>"),
    ("torch 2.13.0+cpu, onnx==1.23.2, TensorRT: 10.13.3.9, CUDA 12.8, python 3.11.9",
     "torch <version>, onnx==<version>, TensorRT: <version>, CUDA <version>, python <version>"),
    ("torch                 2.13.0+cu128", "torch                 <version>"),
    ("built with 2.6.0.dev20250101+cu126 and v1.23.2.", "built with <version> and <version>."),
    ("rates 2.99it/s 0.34s/it 81.2 img/s 120.5 FPS", "rates <rate> <rate> <rate> <rate>"),
    ("took 12.3 ms, 1.2 s, 850 µs, 3.5e-05 s, 2 mins, 2.5sec",
     "took <time>, <time>, <time>, <time>, <time>, <time>"),
    ("NVIDIA H100 80GB HBM3 (sm_90), Tesla T4", "<gpu> (sm_<cc>), <gpu>"),
    ("<Foo object at 0x7f3a2c1d4e50>", "<Foo object at 0x<address>>"),
]
UNTOUCHED = [
    "max abs err < 1e-4: True",
    "shape (1, 4, 32, 48) float32, 13 controls, 4 samples, 12 steps, opset 17, 3 heads, 0.5 scale",
    "<Figure size 400x300 with 1 Axes>",
    "see https://github.com/lllyasviel/ControlNet/blob/main/cldm/cldm.py",
    "out/unet.onnx, image/png, (B, 4, h/8, w/8), 5/10 done, device cuda:0",
]


@pytest.mark.parametrize("raw, expected", SANITIZED)
def test_sanitizer_hides_noise(raw, expected):
    assert _sanitize(raw) == expected


@pytest.mark.parametrize("text", UNTOUCHED)
def test_sanitizer_keeps_facts(text):
    assert _sanitize(text) == text


def test_every_sanitizer_is_exercised():
    """Each regex in the cfg matches at least one sample above (no dead or broken rule)."""
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns((NOTEBOOKS / "nbval_sanitize.cfg").read_text())
    assert len(patterns) >= 15
    for regex, replace in patterns:
        assert replace.strip(), f"empty replacement for {regex}"
        assert any(re.search(regex, raw) for raw, _ in SANITIZED), f"no sample exercises {regex}"


# --- the build tool ---------------------------------------------------------------------------

DEMO_SOURCE = '''\
# %% [markdown]
# # Demo

# %%
# %load_ext course_lib.notebook
import matplotlib.pyplot as plt
x = 1
print("x is", x)

# %% tags=["requires-tensorrt"]
# %%needs tensorrt
trt_value = 2
trt_value

# %%
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [1, 0])
plt.show()

# %%
assert x == 1
x + 1
'''


def test_source_to_notebook_and_check(tmp_path):
    src = tmp_path / "01_demo.py"
    src.write_text(DEMO_SOURCE)
    nb = bn.notebook_from_source(src)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code", "code", "code"]
    assert [c.id for c in nb.cells] == [f"cell-{i:02d}" for i in range(5)]
    assert nb.cells[2].metadata == {"tags": ["requires-tensorrt"]}
    assert nb.metadata["kernelspec"] == bn.KERNELSPEC
    dst = tmp_path / "01_demo.ipynb"
    assert "is missing" in bn.source_mismatch(src, dst)
    nbformat.write(nb, dst)
    assert bn.source_mismatch(src, dst) is None
    src.write_text(DEMO_SOURCE.replace('"x is"', '"x:"'))
    assert "cell #1" in bn.source_mismatch(src, dst)


@pytest.mark.slow
def test_build_runs_cells_skips_tagged_and_keeps_their_outputs(tmp_path):
    src, dst = tmp_path / "01_demo.py", tmp_path / "01_demo.ipynb"
    src.write_text(DEMO_SOURCE)
    # a notebook built before on a TensorRT machine: the tagged cell has outputs
    before = bn.notebook_from_source(src)
    before.cells[2].execution_count = 2
    before.cells[2].outputs = [
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=2)]
    nbformat.write(before, dst)

    bn.build(src, dst, have={"gpu"}, demanded=set(), keep_tagged=True, timeout=120)
    cells = _code_cells(_read(dst))
    assert [c.execution_count for c in cells] == [1, 2, 3, 4]
    assert cells[0].outputs[0].text == "x is 1\n"
    assert cells[1].outputs[0].data["text/plain"] == "2"  # kept, not run
    assert set(cells[2].outputs[0].data) == {"image/png", "text/plain"}
    assert cells[3].outputs[0].execution_count == 4
    metadata = _read(dst).metadata
    assert metadata.kernelspec == bn.KERNELSPEC and set(metadata) == {"kernelspec", "language_info"}
    assert metadata.language_info["name"] == "python" and metadata.language_info["version"] == \
        ".".join(map(str, sys.version_info[:3]))                # what the kernel reports, as JupyterLab saves it

    bn.build(src, dst, have={"gpu"}, demanded=set(), keep_tagged=False, timeout=120)
    cells = _code_cells(_read(dst))
    assert [c.execution_count for c in cells] == [1, None, 2, 3] and cells[1].outputs == []
    with pytest.raises(ValueError, match="COURSE_REQUIRE demands tensorrt"):
        bn.build(src, dst, have={"gpu"}, demanded={"gpu", "tensorrt"})


# --- nbval with notebooks/conftest.py, end to end --------------------------------------------

@pytest.mark.slow
def test_nbval_runs_tagged_cells_for_their_skip_line_or_fails_them(tmp_path):
    """COURSE_REQUIRE=gpu: a %%needs gpu cell fails where there is no GPU; a %%needs tensorrt cell runs where
    TensorRT is missing and passes by printing its one skip line; a requires-tensorrt cell without the magic
    fails there (it printed something else); an interactive cell is always skipped; later cells still run;
    stderr and sanitized noise do not count."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "tools").mkdir()
    shutil.copy(NOTEBOOKS / "conftest.py", tmp_path / "notebooks" / "conftest.py")
    shutil.copy(REPO / "tools" / "build_notebooks.py", tmp_path / "tools" / "build_notebooks.py")
    shutil.copy(HARNESS_FIXTURE, tmp_path / "notebooks" / "harness_demo.ipynb")
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\naddopts = --nbval --nbval-current-env --nbval-sanitize-with "
                   f"{NOTEBOOKS / 'nbval_sanitize.cfg'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "COURSE_REQUIRE")}
    env["COURSE_REQUIRE"] = "gpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-v", str(tmp_path / "notebooks")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    outcome = dict(re.findall(r"::(Cell \d+) (PASSED|FAILED|SKIPPED|ERROR)", run.stdout))

    have, _ = bn.machine_capabilities()
    assert outcome == {
        "Cell 0": "PASSED",
        "Cell 1": "PASSED" if "gpu" in have else "FAILED",
        "Cell 2": "PASSED",
        "Cell 3": "PASSED" if "tensorrt" in have else "FAILED",
        "Cell 4": "SKIPPED",
        "Cell 5": "PASSED",
        "Cell 6": "PASSED",
    }, run.stdout + run.stderr
    if "gpu" not in have:
        assert "COURSE_REQUIRE demands gpu" in run.stdout
    if "tensorrt" not in have:
        assert "needs TensorRT and this machine has none, so it must print one line starting" in run.stdout
