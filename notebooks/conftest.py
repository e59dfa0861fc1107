"""How nbval runs the chapter notebooks (``python -m pytest --nbval``).

- Cells tagged ``requires-gpu`` / ``requires-tensorrt`` (a TensorRT that runs plans here) /
  ``requires-trt-builder`` (a TensorRT builder: TensorRT for RTX gives one on any CPU) are SKIPPED,
  with the reason shown, where this machine lacks it, and FAIL instead when the environment demands
  it (``COURSE_REQUIRE=gpu,tensorrt,trt-builder``). Cells tagged ``interactive`` are always skipped.
  The remaining cells still run, in the same kernel.
- ``stderr`` outputs are not compared (warnings and progress bars go there).
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

_FAIL_REASON = pytest.StashKey[str]()
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
    """Skip (or, when demanded, fail) tagged cells; decided before any kernel starts."""
    for item in items:
        if not isinstance(item, IPyNbCell):
            continue
        tags = rules.cell_tags(item.cell)
        if rules.INTERACTIVE_TAG not in tags and not set(tags) & set(rules.HARDWARE_TAGS):
            continue
        have, demanded = _capabilities(config)
        what, why = rules.cell_plan(tags, have, demanded)
        if what == "skip":
            item.add_marker(pytest.mark.skip(reason=why))
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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A tagged cell whose hardware COURSE_REQUIRE demands but is missing fails without running."""
    if isinstance(item, IPyNbCell) and _FAIL_REASON in item.stash:
        pytest.fail(item.stash[_FAIL_REASON], pytrace=False)
