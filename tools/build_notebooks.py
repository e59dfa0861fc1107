"""Build the chapter notebooks from their jupytext sources, executed in this environment.

Chapters are authored as percent-format sources, ``notebooks/src/NN_name.py``; this tool turns each
into ``notebooks/NN_name.ipynb`` and runs it top to bottom with nbclient, in the Python that runs the
tool, with ``notebooks/`` as the working directory. A cell that needs what some machines lack starts
with ``%%needs gpu tensorrt`` (course_lib.notebook's cell magic: elsewhere it prints one line instead
of running); this tool gives it the matching tags (``requires-gpu``, ``requires-tensorrt``,
``requires-trt-builder``, ``requires-netron``). Where this machine lacks one, the cell and
``interactive`` cells are not run: they are stored with no outputs, or, with
``--keep-outputs-of-tagged``, with the outputs a GPU machine stored before.

    python tools/build_notebooks.py                      # build every chapter
    python tools/build_notebooks.py --only 01_export     # one chapter (repeatable)
    python tools/build_notebooks.py --check              # stored notebooks match their sources?
    python tools/build_notebooks.py --keep-outputs-of-tagged   # CPU rebuild, keep GPU cells' outputs
    python tools/build_notebooks.py --student-only       # only notebooks/student/ (no kernel)

Each build also writes the chapter's student notebook, ``notebooks/student/NN_name.ipynb``: the same cells,
not executed, each exercise's ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region replaced by its
instruction and placeholders (see "exercises" below); ``--check`` compares both with the source.

The tag rules live here and nowhere else: notebooks/conftest.py (nbval) and
tests/test_notebooks_hygiene.py load this file for them.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SOURCES = NOTEBOOKS / "src"

# tag -> (capability it needs, why it is skipped where that is missing). A cell gets the tag from its
# first line, ``%%needs <capability> ...`` (course_lib.notebook, whose NEEDS table says how each
# capability is detected); one row per capability, nothing else to edit when one is added.
# "tensorrt": a TensorRT that runs plans here (a GPU it supports); "trt-builder": a TensorRT builder,
# which TensorRT for RTX gives on any CPU (pip install tensorrt-rtx) -- cells that only build plans
HARDWARE_TAGS = {
    "requires-gpu": ("gpu", "needs a CUDA GPU"),
    "requires-tensorrt": ("tensorrt", "needs TensorRT"),
    "requires-trt-builder": ("trt-builder", "needs a TensorRT builder (pip install tensorrt-rtx)"),
    "requires-netron": ("netron", "needs Netron"),
}
NEEDS_MAGIC = "%%needs"
# a capability that brings others with it (course_lib.notebook.IMPLIED, the same table): a TensorRT that runs
# plans here needs a GPU, and can build plans
IMPLIED = {"tensorrt": ("gpu", "trt-builder")}
# a cell that needs a person (it serves Netron on 127.0.0.1, opens a browser, waits for input):
# never run by this tool or by nbval
INTERACTIVE_TAG = "interactive"
INTERACTIVE_REASON = "interactive cell: run it by hand"
# tags a chapter may use; nbval's own tags are documented in nbval's README
KNOWN_TAGS = frozenset({
    *HARDWARE_TAGS, INTERACTIVE_TAG,
    "raises-exception",      # the cell is meant to raise (nbclient and nbval accept its error)
    "nbval-ignore-output",   # run the cell, do not compare its outputs (timings tables, env report)
    "nbval-check-output",    # compare outputs even under --nbval-lax
    "nbval-skip",            # nbval does not run the cell (this tool still does)
    "hide-input", "hide-output", "remove-input", "remove-output", "remove-cell",  # rendering only
})
CAPABILITIES = tuple(capability for capability, _ in HARDWARE_TAGS.values())
# what JupyterLab writes for ipykernel's python3 kernel (so that a save there changes nothing)
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# Run silently in every kernel before the first cell (here and in notebooks/conftest.py): the course's CPU
# thread policy (course_lib.threads), plots inline (even where MPLBACKEND=Agg is set) and only as PNG (SVG
# embeds a date; nbval compares it).
KERNEL_SETUP = """\
import course_lib.threads as _threads
_threads.apply_thread_policy()
del _threads
import os as _os
_os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
get_ipython().config.InlineBackend.figure_formats = {"png"}
del _os
"""

_SKIP_EXECUTION = "build-notebooks-skip"  # temporary tag, never written to a notebook


def cell_tags(cell) -> list[str]:
    """The cell's metadata tags (a list, possibly empty)."""
    return list(cell.get("metadata", {}).get("tags", []))


def cell_needs(source: str) -> list[str]:
    """The capabilities a cell's ``%%needs`` first line names (``[]`` without one); ValueError if unknown."""
    first = source.lstrip("\n").split("\n", 1)[0].strip()
    if not first.startswith(NEEDS_MAGIC) or first[len(NEEDS_MAGIC):][:1] not in ("", " "):
        return []
    needs = first[len(NEEDS_MAGIC):].partition("--see")[0].split()
    unknown = [n for n in needs if n not in CAPABILITIES]
    if not needs or unknown:
        raise ValueError(f"{first!r}: expected {NEEDS_MAGIC} followed by some of {', '.join(CAPABILITIES)}")
    return needs


def tags_from_needs(source: str, tags: list[str]) -> list[str]:
    """The cell's tags with those its ``%%needs`` line implies added (the line is the source of truth).

    ValueError when a hardware tag is there without its ``%%needs`` entry: in JupyterLab nothing reads
    tags, so such a cell would raise on a machine without the hardware instead of printing its line.
    """
    needs = cell_needs(source)
    implied = [tag for tag, (capability, _) in HARDWARE_TAGS.items() if capability in needs]
    stray = [t for t in tags if t in HARDWARE_TAGS and t not in implied]
    if stray:
        wanted = needs + [HARDWARE_TAGS[t][0] for t in stray]
        raise ValueError(f"tagged {', '.join(stray)} but its first line does not say so: start the cell with "
                         f"'{NEEDS_MAGIC} {' '.join(wanted)}' (the tags come from that line)")
    return list(tags) + [t for t in implied if t not in tags]


def without_needs_line(source: str) -> str:
    """The cell's source without its ``%%needs`` first line (what the cell computes)."""
    if not cell_needs(source):
        return source
    lines = source.lstrip("\n").split("\n", 1)
    return lines[1] if len(lines) > 1 else ""


def cell_plan(tags, have: set[str], demanded: set[str]) -> tuple[str, str]:
    """Decide what happens to a cell with these tags on this machine.

    ``have``: capabilities present (a subset of :data:`CAPABILITIES`); ``demanded``: capabilities the
    environment insists on (COURSE_REQUIRE). Returns ``("run", "")``, ``("skip", reason)`` or
    ``("fail", reason)`` -- fail when a demanded capability is missing.
    """
    if INTERACTIVE_TAG in tags:
        return "skip", INTERACTIVE_REASON
    for tag, (capability, reason) in HARDWARE_TAGS.items():
        if tag in tags and capability not in have:
            if capability in demanded:
                return "fail", (f"COURSE_REQUIRE demands {capability}, but this cell {reason} "
                                f"and this machine has none (see: python -m course_lib env)")
            return "skip", reason
    return "run", ""


def machine_capabilities() -> tuple[set[str], set[str]]:
    """(have, demanded) for this machine, as the %%needs magic sees it (imports torch: call it once)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from course_lib import env, notebook

    return notebook.capabilities() & set(CAPABILITIES), demanded_capabilities(env.required_capabilities())


def demanded_capabilities(raw: set[str]) -> set[str]:
    """Validate COURSE_REQUIRE's entries; requiring tensorrt also requires a GPU and a builder."""
    unknown = sorted(raw - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"COURSE_REQUIRE names unknown capability {unknown[0]!r}: "
                         f"expected a comma-separated subset of {', '.join(CAPABILITIES)}")
    return with_implied(raw)


def with_implied(capabilities) -> set[str]:
    """``capabilities`` and what they imply (:data:`IMPLIED`): {"tensorrt"} -> {"tensorrt", "gpu", "trt-builder"}."""
    return set(capabilities).union(*(IMPLIED.get(c, ()) for c in capabilities))


# --- guards: a name a %%needs cell defines is only read by cells with at least its needs -----------

def _cell_names(source: str) -> tuple[set[str], set[str]]:
    """(names the cell defines at notebook level, names it reads that it does not bind itself)."""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    tree = ast.parse(TransformerManager().transform_cell(without_needs_line(source)))
    scoped = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
              ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    defined: set[str] = set()

    def top(node, inside=False):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not inside:
                defined.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and not inside:
                defined.update((a.asname or a.name).split(".")[0] for a in child.names)
            elif isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)) and not inside:
                defined.add(child.id)
            top(child, inside or isinstance(child, scoped))

    top(tree)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
              for a in n.posonlyargs + n.args + n.kwonlyargs + [n.vararg, n.kwarg] if a}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return defined, read - bound - defined


def guard_problems(nb) -> list[str]:
    """Cells that read a name whose last definition above is in a cell needing more than they do.

    Where that cell printed its skip line instead of running, the reader would raise NameError (or see
    another machine's value): give it the same ``%%needs`` line. Static, so approximate: names bound
    anywhere in the reading cell (loop variables, arguments) do not count as reads.
    """
    problems: list[str] = []
    last: dict[str, tuple[frozenset, int]] = {}          # name -> (needs of the cell defining it last, index)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        needs = frozenset(with_implied(cell_needs(cell.source)))       # a tensorrt cell has built plans too
        defined, read = _cell_names(cell.source)
        for name in sorted(read):
            if name in last and not last[name][0] <= needs:
                missing = " ".join(sorted(last[name][0] - needs))
                problems.append(f"{cell_name(nb, i)} reads {name!r}, defined by {cell_name(nb, last[name][1])} "
                                f"which needs {missing}: start it with {NEEDS_MAGIC} "
                                f"{' '.join(sorted(needs | last[name][0]))}")
        last.update({name: (needs, i) for name in defined})
    return problems


# --- source -> notebook ---------------------------------------------------------------------

def notebook_from_source(src: Path):
    """Read a percent-format source into a notebook with no outputs, stable ids and metadata."""
    import jupytext
    import nbformat

    text = jupytext.read(src, fmt="py:percent")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for i, cell in enumerate(text.cells):
        tags = cell_tags(cell)
        if cell.cell_type == "code":
            try:
                tags = tags_from_needs(cell.source, tags)
            except ValueError as e:
                raise ValueError(f"{_rel(src)} cell #{i}: {e}") from None
        metadata = {"tags": tags} if tags else {}
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new.id = f"cell-{i:02d}"  # stable: a rebuild does not churn ids
        nb.cells.append(new)
    return nb


def skeleton(nb) -> list[tuple]:
    """What the source decides (metadata, cell types, ids, sources, tags), outputs ignored."""
    rows = [("kernelspec", nb.metadata.get("kernelspec"))]
    rows += [(c.cell_type, c.get("id"), c.source, cell_tags(c)) for c in nb.cells]
    return rows


def source_mismatch(src: Path, ipynb: Path, student: bool = False) -> str | None:
    """One line saying how ``ipynb`` differs from what ``src`` produces (outputs ignored), or None.
    ``student``: compare with the student notebook of ``src`` (:func:`student_notebook`), outputs included."""
    import nbformat

    if not ipynb.exists():
        return f"{_rel(ipynb)} is missing: build it from {_rel(src)}"
    if student:
        have = nbformat.read(ipynb, as_version=4)
        if any(c.get("outputs") or c.get("execution_count") for c in have.cells):
            return f"{_rel(ipynb)} has outputs: a student notebook is stored unexecuted; rebuild it"
    want = skeleton(student_notebook(notebook_from_source(src)) if student else notebook_from_source(src))
    have = skeleton(nbformat.read(ipynb, as_version=4))
    if len(want) != len(have):
        return f"{_rel(ipynb)} has {len(have) - 1} cells, {_rel(src)} makes {len(want) - 1}"
    for i, (w, h) in enumerate(zip(want, have)):
        if w != h:
            what = "notebook metadata" if i == 0 else f"cell #{i - 1} ({w[0]}, {w[2][:40]!r})"
            return f"{_rel(ipynb)}: {what} differs from {_rel(src)}; rebuild it"
    return None


# --- exercises: solution regions, the student notebook --------------------------------------
#
# A code cell marks the answer to an exercise (nbgrader's markers; the text after the colon is the
# instruction the student gets):
#
#     ### BEGIN SOLUTION: the controls at the latent's size, and control12's channels
#     full_size = [...]
#     ### END SOLUTION
#     if answered("exercise 1", full_size):           # course_lib.notebook: "not done yet" for a ...
#         assert full_size == [...]
#
# The instructor notebook (notebooks/NN_name.ipynb, executed, what nbval runs) keeps the cell as written.
# The student notebook (notebooks/student/NN_name.ipynb, not executed) gets, in place of the region, the
# instruction as a comment and ``name = ...`` for each name the region defines that the rest of the cell
# reads: the self-check then prints "not done yet" and Run All goes on.

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
STUDENT = NOTEBOOKS / "student"
YOUR_CODE = "# YOUR CODE HERE:"


def solution_regions(source: str) -> list[tuple[int, int, str, str]]:
    """(BEGIN line, END line, indentation, instruction) of each solution region of a cell's source (0-based
    line numbers); ValueError for an unclosed, nested or stray marker or a BEGIN without its instruction."""
    regions, open_at = [], None
    for i, line in enumerate(source.splitlines()):
        text = line.strip()
        if text.startswith(BEGIN_SOLUTION):
            instruction = text[len(BEGIN_SOLUTION):].lstrip(":").strip()
            if open_at is not None:
                raise ValueError(f"line {i + 1}: {BEGIN_SOLUTION} inside the region opened on line {open_at[0] + 1}")
            if not instruction:
                raise ValueError(f"line {i + 1}: expected '{BEGIN_SOLUTION}: <what the student writes>'")
            open_at = (i, line[:len(line) - len(line.lstrip())], instruction)
        elif text.startswith(END_SOLUTION):
            if open_at is None:
                raise ValueError(f"line {i + 1}: {END_SOLUTION} without a {BEGIN_SOLUTION} above it")
            regions.append((open_at[0], i, open_at[1], open_at[2]))
            open_at = None
    if open_at is not None:
        raise ValueError(f"line {open_at[0] + 1}: {BEGIN_SOLUTION} without its {END_SOLUTION}")
    return regions


def _region_names(lines: list[str], regions) -> list[tuple[set[str], set[str]]]:
    """For each region: (names it defines, names the rest of the cell reads)."""
    import textwrap

    rest = list(lines)
    for begin, end, indent, _ in regions:
        rest[begin:end + 1] = [f"{indent}pass"] + [""] * (end - begin)
    _, read = _cell_names("\n".join(rest))
    return [(_cell_names(textwrap.dedent("\n".join(lines[begin + 1:end])))[0], read)
            for begin, end, _, _ in regions]


def student_source(source: str) -> str:
    """``source`` with each solution region replaced by its instruction (a comment) and placeholders."""
    lines = source.splitlines()
    regions = solution_regions(source)
    if not regions:
        return source
    for (begin, end, indent, instruction), (defined, read) in reversed(list(zip(regions, _region_names(lines, regions)))):
        region = "\n".join(lines[begin + 1:end])
        answers = sorted(defined & read, key=lambda name: re.search(rf"\b{name}\b", region).start())   # as written
        lines[begin:end + 1] = [f"{indent}{YOUR_CODE} {instruction}"] + \
            [f"{indent}{name} = ...  # your answer" for name in answers] + ([f"{indent}pass"] if indent and not answers else [])
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def student_notebook(nb):
    """A copy of ``nb`` (as :func:`notebook_from_source` makes it) with every solution region replaced, no outputs."""
    import copy

    student = copy.deepcopy(nb)
    for i, cell in enumerate(student.cells):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            try:
                cell.source = student_source(cell.source)
            except ValueError as e:
                raise ValueError(f"{cell_name(nb, i)}: {e}") from None
    return student


def solution_leaks(nb) -> list[str]:
    """Cells that read a name a solution region above defines: in the student notebook that name is ``...``
    or missing, so only the exercise's own cell may read it (static and approximate, like guard_problems)."""
    problems, answers = [], {}              # name -> index of the cell whose solution region defines it
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        defined, read = _cell_names(student_source(cell.source))
        problems += [f"{cell_name(nb, i)} reads {name!r}, an answer of the exercise in {cell_name(nb, answers[name])}: "
                     f"the student notebook does not have it" for name in sorted(read & set(answers))]
        answers = {name: j for name, j in answers.items() if name not in defined}
        regions = solution_regions(cell.source)
        for names, _ in _region_names(cell.source.splitlines(), regions):
            answers.update(dict.fromkeys(names, i))
    return problems


def write_student(src: Path, dst: Path | None = None) -> Path:
    """Write the student notebook of ``src`` (default ``notebooks/student/<name>.ipynb``), atomically."""
    import nbformat

    dst = dst or STUDENT / f"{src.stem}.ipynb"
    nb = student_notebook(notebook_from_source(src))
    nbformat.validate(nb)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    os.replace(tmp, dst)
    return dst


# --- execution --------------------------------------------------------------------------------

def _client_class():
    """A NotebookClient whose python3 kernel is this interpreter, primed with KERNEL_SETUP."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class CurrentPythonSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            from ipykernel.kernelspec import RESOURCES, get_kernel_dict

            return self.kernel_spec_class(resource_dir=RESOURCES, **get_kernel_dict())

    class CurrentPythonKernel(AsyncKernelManager):
        def _kernel_spec_manager_default(self):
            return CurrentPythonSpecs(data_dir=self.data_dir)

    class Client(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            reply = await self.async_wait_for_reply(kc.execute(KERNEL_SETUP, silent=True))
            if reply is None or reply["content"]["status"] != "ok":
                raise RuntimeError(f"kernel set-up code failed: {reply and reply['content']}")
            return kc

    return Client, CurrentPythonKernel


def execute(nb, run: list[bool], cwd: Path = NOTEBOOKS, timeout: int = 600, allow_errors: bool = False):
    """Execute the code cells where ``run[i]`` is True, in ``cwd``, with a current-env kernel
    (``allow_errors``: a cell that raises keeps its error output and the next cell runs)."""
    client_cls, km_cls = _client_class()
    for cell, yes in zip(nb.cells, run):
        if cell.cell_type == "code" and not yes:
            cell.metadata.setdefault("tags", []).append(_SKIP_EXECUTION)
    client = client_cls(nb, kernel_name="python3", kernel_manager_class=km_cls, timeout=timeout,
                        record_timing=False, skip_cells_with_tag=_SKIP_EXECUTION, allow_errors=allow_errors,
                        shutdown_kernel="immediate", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            tags = cell.metadata.get("tags")
            if tags and _SKIP_EXECUTION in tags:
                tags.remove(_SKIP_EXECUTION)
                if not tags:
                    del cell.metadata["tags"]
    return nb


def renumber(nb) -> None:
    """Give every code cell that has run (here or kept) counts 1, 2, 3, ... in notebook order."""
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.execution_count is None:
            continue
        n += 1
        cell.execution_count = n
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = n


def build(src: Path, dst: Path, have: set[str], demanded: set[str], keep_tagged: bool = False,
          timeout: int = 600) -> Path:
    """Build ``dst`` (.ipynb) from ``src`` (percent-format .py), executed here; returns ``dst``.

    Raises ValueError (an empty cell, a demanded capability missing, an SVG figure) and nbclient's
    CellExecutionError (a cell raised); ``dst`` is only replaced when the whole notebook ran.
    """
    import nbformat

    nb = notebook_from_source(src)
    plans = [cell_plan(cell_tags(c), have, demanded) if c.cell_type == "code" else ("run", "")
             for c in nb.cells]
    for i, (cell, (what, why)) in enumerate(zip(nb.cells, plans)):
        if cell.cell_type == "code" and not cell.source.strip():
            raise ValueError(f"{_rel(src)}: {cell_name(nb, i)} is empty; remove it from the source")
        if what == "fail":
            raise ValueError(f"{_rel(src)} {cell_name(nb, i)}: {why}")
    execute(nb, [what == "run" for what, _ in plans], cwd=dst.parent, timeout=timeout)

    old = nbformat.read(dst, as_version=4) if dst.exists() else None
    stored: dict[str, list] = {}
    for cell in (old.cells if old else []):
        if cell.cell_type == "code" and cell.execution_count is not None:
            stored.setdefault(without_needs_line(cell.source), []).append(cell)  # a new %%needs line keeps them
    for i, (cell, (what, why)) in enumerate(zip(nb.cells, plans)):
        if what != "skip":
            continue
        previous = stored.get(without_needs_line(cell.source), [])
        if previous and keep_tagged:
            kept = previous.pop(0)
            cell.outputs, cell.execution_count = kept.outputs, kept.execution_count
            print(f"  {cell_name(nb, i)}: not run here ({why}); kept its stored outputs")
        elif previous:
            print(f"  {cell_name(nb, i)}: not run here ({why}); its stored outputs are dropped "
                  f"(pass --keep-outputs-of-tagged to keep them)")
        else:
            print(f"  {cell_name(nb, i)}: not run here ({why})")
    renumber(nb)
    # language_info as the kernel reported it (JupyterLab writes the same on a save)
    nb.metadata = {"kernelspec": dict(KERNELSPEC),
                   "language_info": nb.metadata.get("language_info") or {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if "image/svg+xml" in out.get("data", {}):
                raise ValueError(f"{_rel(src)} {cell_name(nb, i)} made an SVG figure: figures must be PNG")
    nbformat.validate(nb)

    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    os.replace(tmp, dst)
    return dst


def cell_name(nb, index: int) -> str:
    """Name a cell as nbval does ("Cell 3" = the fourth code cell), with its first line."""
    cell = nb.cells[index]
    source = without_needs_line(cell.source) if cell.cell_type == "code" else cell.source
    first = source.strip().splitlines()[0][:40] if source.strip() else ""
    if cell.cell_type != "code":
        return f"{cell.cell_type} cell #{index} ({first!r})"
    number = sum(c.cell_type == "code" for c in nb.cells[:index])
    return f"Cell {number} ({first!r})"


# --- command line -----------------------------------------------------------------------------

def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def source_names() -> list[str]:
    """Chapter names with a source, e.g. ["01_export", "02_build"]."""
    return sorted(p.stem for p in SOURCES.glob("[0-9][0-9]_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="build only this chapter, e.g. 01_export (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="execute nothing; exit 1 if a stored notebook differs from its source "
                             "(outputs ignored) or has no source")
    parser.add_argument("--keep-outputs-of-tagged", action="store_true",
                        help="keep the stored outputs of tagged cells that this machine cannot run")
    parser.add_argument("--student-only", action="store_true",
                        help="only write the student notebooks (notebooks/student/, solutions out; no kernel)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)

    names = source_names()
    for name in args.only:
        if name not in names:
            print(f"error: no source notebooks/src/{name}.py; expected one of: "
                  f"{', '.join(names) or '(none yet)'}", file=sys.stderr)
            return 2
    chosen = args.only or names

    if args.check:                           # the instructor's and the student's notebook of each chapter
        problems = [p for n in chosen for folder, student in ((NOTEBOOKS, False), (STUDENT, True))
                    if (p := source_mismatch(SOURCES / f"{n}.py", folder / f"{n}.ipynb", student))]
        if not args.only:
            problems += [f"{_rel(p)} has no source {_rel(SOURCES / (p.stem + '.py'))}"
                         for folder in (NOTEBOOKS, STUDENT) for p in sorted(folder.glob("*.ipynb"))
                         if p.stem not in names]
        for p in problems:
            print(p)
        print(f"{len(chosen)} chapter(s) checked (instructor and student notebooks), {len(problems)} problem(s)")
        return 1 if problems else 0
    if args.student_only:
        for name in chosen:
            print(f"wrote {_rel(write_student(SOURCES / f'{name}.py'))}")
        return 0

    # kernels import this checkout's course_lib, installed or not; stored notebooks carry no progress bars
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["COURSE_PROGRESS"] = "off"
    try:
        have, demanded = machine_capabilities()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"capabilities here: {', '.join(sorted(have)) or 'CPU only'}")
    for name in chosen:
        print(f"building notebooks/{name}.ipynb")
        try:
            write_student(SOURCES / f"{name}.py")           # first: a bad solution marker stops before any kernel
            build(SOURCES / f"{name}.py", NOTEBOOKS / f"{name}.ipynb", have, demanded,
                  keep_tagged=args.keep_outputs_of_tagged, timeout=args.timeout)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # nbclient's CellExecutionError carries the cell and traceback
            print(f"error: notebooks/{name}.ipynb failed to execute; nothing was written\n{e}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
