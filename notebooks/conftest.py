"""How nbval runs the chapter notebooks (``python -m pytest --nbval``).

- Every chapter runs top to bottom in one fresh kernel, as JupyterLab's Run All does: this is the
  Run All test. A cell tagged ``requires-gpu`` / ``requires-tensorrt`` (a TensorRT that runs plans
  here) / ``requires-trt-builder`` (a TensorRT builder: TensorRT for RTX gives one on any CPU) /
  ``requires-netron`` (the tags come from its ``%%needs`` first line) runs too where this machine
  lacks the hardware: its body is not run, and the test checks that it printed exactly its one
  "Skipped: ..." line (its stored outputs, from a machine that has the hardware, are not compared).
  It FAILS without running when the environment demands the hardware
  (``COURSE_REQUIRE=gpu,tensorrt,trt-builder``; tensorrt implies the other two). Cells tagged
  ``interactive`` are always skipped (no chapter has one).
- ``stderr`` outputs are not compared (warnings and progress bars go there: ``COURSE_PROGRESS=text``
  makes the library's bars text on stderr instead of JupyterLab widgets).
- Every kernel first runs tools/build_notebooks.py's KERNEL_SETUP silently (inline PNG figures),
  the same set-up the notebooks were built with, and imports this checkout's course_lib.

The tag rules themselves live in tools/build_notebooks.py, shared with the build tool.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from nbval.plugin import IPyNbCell, IPyNbFile

REPO = Path(__file__).resolve().parent.parent


def _load_rules():
    path = REPO / "tools" / "build_notebooks.py"
    spec = importlib.util.spec_from_file_location("build_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load_rules()

# kernels inherit this process's environment: let notebooks import this checkout's course_lib
_others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *_others])
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# progress bars as text on stderr (never compared): a widget's text would be (course_lib/progress.py)
os.environ["COURSE_PROGRESS"] = "text"

# notebooks/student/ holds the student notebooks, built unexecuted from the same sources with each exercise's
# solution replaced by placeholders; they are collected only with COURSE_NBVAL_STUDENT=1 (a second Run All
# of each chapter, in which every exercise must say "not done yet" and nothing may raise)
collect_ignore_glob = [] if os.environ.get("COURSE_NBVAL_STUDENT") == "1" else ["student/*"]

_FAIL_REASON = pytest.StashKey[str]()
_SKIP_LINE = pytest.StashKey[str]()      # the hardware this cell lacks here: it must print its skip line
_CAPABILITIES = pytest.StashKey[tuple]()


def pytest_collectstart(collector):
    """Do not compare stderr (nbval keys stream outputs by their name)."""
    if isinstance(collector, IPyNbFile) and "stderr" not in collector.skip_compare:
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)


def _capabilities(config) -> tuple[set[str], set[str]]:
    """(have, demanded), looked up once per session (course_lib.env.detect imports torch)."""
    if _CAPABILITIES not in config.stash:
        try:
            config.stash[_CAPABILITIES] = rules.machine_capabilities()
        except ValueError as e:  # a COURSE_REQUIRE typo
            raise pytest.UsageError(str(e)) from None
    return config.stash[_CAPABILITIES]


def pytest_collection_modifyitems(config, items):
    """Decide for each tagged cell, before any kernel starts: run it and expect its skip line (hardware
    missing), fail it (hardware demanded and missing), or skip it (interactive)."""
    for item in items:
        if not isinstance(item, IPyNbCell):
            continue
        tags = rules.cell_tags(item.cell)
        if rules.INTERACTIVE_TAG not in tags and not set(tags) & set(rules.HARDWARE_TAGS):
            continue
        have, demanded = _capabilities(config)
        what, why = rules.cell_plan(tags, have, demanded)
        if what == "skip" and rules.INTERACTIVE_TAG in tags:
            item.add_marker(pytest.mark.skip(reason=why))
        elif what == "skip":
            item.options["check"] = False          # the stored outputs are a GPU machine's
            item.stash[_SKIP_LINE] = why
        elif what == "fail":
            item.stash[_FAIL_REASON] = why


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """After nbval has started a notebook's kernel, run the shared set-up code in it once."""
    result = yield
    if isinstance(item, IPyNbCell):
        notebook = item.parent
        if notebook.kernel is not None and not getattr(notebook, "_course_setup_done", False):
            kernel = notebook.kernel
            msg_id = kernel.kc.execute(rules.KERNEL_SETUP, silent=True, store_history=False)
            reply = kernel.get_message("shell", timeout=60)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kernel.get_message("shell", timeout=60)
            kernel.await_idle(msg_id, timeout=60)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"notebook kernel set-up code failed: {reply['content']}")
            notebook._course_setup_done = True
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    """A tagged cell whose hardware COURSE_REQUIRE demands but is missing fails without running; one run
    without its hardware must have printed exactly one line, its skip line, and nothing else."""
    if isinstance(item, IPyNbCell) and _FAIL_REASON in item.stash:
        pytest.fail(item.stash[_FAIL_REASON], pytrace=False)
    result = yield
    if isinstance(item, IPyNbCell) and _SKIP_LINE in item.stash:
        problem = skip_line_problem(item.test_outputs or [])
        if problem:
            pytest.fail(f"this cell {item.stash[_SKIP_LINE]} and this machine has none, so it must print "
                        f"one line starting {skip_prefix()!r} (start it with %%needs): {problem}",
                        pytrace=False)
    return result


def skip_prefix() -> str:
    from course_lib.notebook import SKIP_PREFIX

    return SKIP_PREFIX


def skip_line_problem(outputs) -> str | None:
    """None when ``outputs`` (stderr aside) are one stdout line starting with the skip prefix, else what is wrong."""
    shown = [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    text = "".join(o.get("text", "") for o in shown if o.get("output_type") == "stream")
    if len(shown) != 1 or shown[0].get("output_type") != "stream" or not text.startswith(skip_prefix()):
        return f"it showed {len(shown)} output(s): {text[:200]!r}"
    if text.rstrip("\n").count("\n"):
        return f"it printed {text.count(chr(10))} lines: {text[:200]!r}"
    return None
