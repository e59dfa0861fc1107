"""Run All on any machine: the ``%%needs`` cell magic, and checks that never pass over nothing.

Chapter 1 introduces it. Each chapter's first code cell loads it with ``%load_ext course_lib.notebook``;
a cell that needs something this machine may lack starts with a line naming it::

    %%needs gpu tensorrt --see docs/benchmarks.md, "Chapter 3"
    engine = Engine(plan).load().activate()      # the cell's body runs only where both are present

Where something is missing, the body does not run and the cell prints ONE line -- what it needs,
what this machine has, where a GPU run's result is recorded (``--see``) -- so Run All goes on. A
later cell that uses a name such a cell defines carries the same ``%%needs`` line
(tests/test_notebooks_hygiene.py checks it). With ``COURSE_REQUIRE=gpu,tensorrt`` in the
environment a missing, demanded need fails the cell instead (a GPU machine's test run).

The names after ``%%needs`` are :data:`NEEDS`' keys; tools/build_notebooks.py turns each into the
cell's nbval tag (``gpu`` -> ``requires-gpu``), so the magic line and the tag cannot disagree.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from course_lib.env import TRT_LABELS, Environment, detect, has_module, required_capabilities


@dataclass(frozen=True)
class Need:
    """Something a cell can need: how a student calls it, and how to find out what this machine has."""
    what: str                                        # "a CUDA GPU"
    lacks: Callable[[Environment], str | None]       # None where present, else what this machine has


def _installed_tensorrt(e: Environment) -> str:
    found = [f"{TRT_LABELS[name]} {version}" for name, version in (("tensorrt", e.tensorrt),
                                                                    ("tensorrt_rtx", e.tensorrt_rtx)) if version]
    return " and ".join(found)


def _no_tensorrt(e: Environment) -> str | None:
    if e.has_tensorrt:
        return None
    if not (found := _installed_tensorrt(e)):
        return "TensorRT not installed"
    return f"{found} but no CUDA GPU to run it" if not e.has_gpu else f"{found} but not for its GPU ({e.gpu_name})"


def _no_trt_builder(e: Environment) -> str | None:
    if e.has_trt_builder:
        return None
    found = _installed_tensorrt(e)
    return f"{found} but no CUDA GPU to build with" if found else "neither TensorRT nor TensorRT for RTX installed"


# need -> what it is and how it is detected. The nbval tag of each is in tools/build_notebooks.py
# (HARDWARE_TAGS: "requires-<need>"); tests/test_notebooks_hygiene.py keeps the two tables in step.
NEEDS: dict[str, Need] = {
    "gpu": Need("a CUDA GPU", lambda e: None if e.has_gpu else "no CUDA GPU"),
    "tensorrt": Need("TensorRT", _no_tensorrt),
    "trt-builder": Need("a TensorRT builder (pip install tensorrt-rtx: it builds on any CPU)", _no_trt_builder),
    "netron": Need("Netron (pip install netron)",
                   lambda e: None if has_module("netron") else "netron not installed"),
}

# a need that brings others with it (tools/build_notebooks.py has the same IMPLIED): a TensorRT that runs
# plans here runs them on a GPU, and builds them too
IMPLIED: dict[str, tuple[str, ...]] = {"tensorrt": ("gpu", "trt-builder")}

SKIP_PREFIX = "Skipped: this cell needs "           # notebooks/conftest.py looks for it
NOT_RECORDED = "no GPU run of this cell is recorded in the repository"


class MissingCapability(RuntimeError):
    """COURSE_REQUIRE demands something a ``%%needs`` cell needs and this machine lacks."""


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return detect()


def lacking(needs: Iterable[str], environment: Environment | None = None) -> dict[str, str]:
    """Of ``needs``, those this machine lacks, each with what it has instead (in the order given)."""
    e = environment or _environment()
    out = {}
    for name in needs:
        if name not in NEEDS:
            raise ValueError(f"%%needs: unknown need {name!r}; expected some of {', '.join(NEEDS)}")
        if (instead := NEEDS[name].lacks(e)) is not None:
            out[name] = instead
    return out


def capabilities(environment: Environment | None = None) -> set[str]:
    """Every need this machine meets, e.g. ``{"netron"}`` on a laptop (the build tool and nbval ask this)."""
    return set(NEEDS) - set(lacking(NEEDS, environment))


def parse_needs(line: str) -> tuple[list[str], str]:
    """``"gpu tensorrt --see docs/benchmarks.md"`` -> (["gpu", "tensorrt"], "docs/benchmarks.md")."""
    head, _, see = line.partition("--see")
    needs = head.split()
    if not needs:
        raise ValueError("%%needs: name what the cell needs, e.g. %%needs gpu tensorrt")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"%%needs: unknown need {unknown[0]!r}; expected some of {', '.join(NEEDS)}")
    return needs, see.strip()


def skip_line(needs: list[str], missing: dict[str, str], see: str = "") -> str:
    """The one line a cell prints instead of running."""
    whats = [NEEDS[n].what for n in needs]
    wanted = whats[0] if len(whats) == 1 else ", ".join(whats[:-1]) + " and " + whats[-1]
    where = f"a GPU run's result: {see}" if see else NOT_RECORDED
    return f"{SKIP_PREFIX}{wanted}; this machine has {', '.join(missing.values())}. Not run ({where})."


def every(checks: Iterable[bool]) -> bool | str:
    """Chapter 1: ``all()`` that does not pass over nothing -- ``"nothing to check"`` when there are no checks.

    ``all([])`` is True: a loop whose cell was skipped would "pass". Print ``every(...)``, or
    ``assert every(...) is True``.
    """
    results = [bool(c) for c in checks]
    return all(results) if results else "nothing to check"


NOT_DONE = "not done yet (write your answer under YOUR CODE HERE, then run the cell again)"


def answered(exercise: str, *answers) -> bool:
    """Chapter 1: True when every answer is filled in; while one is still ``...`` -- the placeholder a student
    notebook (notebooks/student/) starts with -- print "<exercise>: not done yet ..." and return False, so an
    exercise's self-check (``if answered("exercise 1", x): assert ...``) never stops Run All."""
    if any(a is Ellipsis for a in answers):
        print(f"{exercise}: {NOT_DONE}")
        return False
    return True


def course_file(relative: str) -> Path:
    """Chapter 3: a file of this course's repository, e.g. ``course_file("docs/bench/h100_ch3.json")``, found
    from course_lib's own folder: the same from notebooks/ and notebooks/student/ (FileNotFoundError if absent)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / relative).exists():
        raise FileNotFoundError(f"{relative} is not under {root}: expected course_lib installed from the course's "
                                "repository (pip install -e .)")
    return root / relative


def run_body(shell, cell: str, header: str = ""):
    """Run a cell's body in the notebook's namespace, as IPython would; return its last expression's value.

    ``header`` (the magic line) is kept as a comment so that tracebacks show the cell's own line numbers.
    """
    __tracebackhide__ = True  # noqa: F841  (IPython leaves this frame out of tracebacks)
    source = f"#{header}\n{shell.transform_cell(cell)}"
    filename = shell.compile.cache(source, shell.execution_count)   # linecache: tracebacks show the source lines
    tree = shell.transform_ast(shell.compile.ast_parse(source, filename=filename))
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(shell.compile(tree, filename, "exec"), shell.user_ns)  # noqa: S102
    if last is not None:
        return eval(shell.compile(last, filename, "eval"), shell.user_ns)  # noqa: S307
    return None


def needs_magic(shell, line: str, cell: str):
    """The ``%%needs`` cell magic: run the body where every need is met, else print one line."""
    __tracebackhide__ = True  # noqa: F841
    needs, see = parse_needs(line)
    missing = lacking(needs)
    if not missing:
        return run_body(shell, cell, header=f"%%needs {line}")
    demanded = sorted(set(missing) & _demanded())
    if demanded:
        raise MissingCapability(f"COURSE_REQUIRE demands {', '.join(demanded)}, but this machine has "
                                f"{', '.join(missing[d] for d in demanded)} (see: python -m course_lib env)")
    print(skip_line(needs, missing, see))
    return None


def _demanded() -> set[str]:
    raw = required_capabilities()
    return raw.union(*(IMPLIED.get(need, ()) for need in raw))


def load_ipython_extension(ip) -> None:
    """``%load_ext course_lib.notebook``: registers ``%%needs`` (prints nothing)."""
    def needs(line, cell):
        """%%needs gpu tensorrt [--see WHERE]: run this cell only where the machine has them (course_lib.notebook)."""
        __tracebackhide__ = True  # noqa: F841
        return needs_magic(ip, line, cell)

    ip.register_magic_function(needs, "cell")
