"""Progress bars for long work: a widget in JupyterLab, plain text on stderr everywhere else.

Chapter 1 introduces it (every long library call shows one). The ``COURSE_PROGRESS`` environment
variable chooses, for the process and the notebook kernels it starts:

* ``auto`` (the default): ``tqdm.auto`` -- a widget in a Jupyter kernel with ipywidgets, text elsewhere;
* ``text``: tqdm's text bar on stderr (notebooks/conftest.py sets it: nbval never compares stderr,
  while a widget's text would be compared);
* ``off``: no bars (tools/build_notebooks.py sets it, so stored notebooks carry none).
"""
from __future__ import annotations

import os

MODES = ("auto", "text", "off")


def mode() -> str:
    """The progress mode from ``COURSE_PROGRESS`` (ValueError for anything but auto, text, off)."""
    value = os.environ.get("COURSE_PROGRESS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"COURSE_PROGRESS={value!r}: expected one of {', '.join(MODES)}")
    return value


def tqdm(*args, **kwargs):
    """``tqdm.tqdm(...)`` drawn as :func:`mode` says; same arguments (``disable=True`` still hides it)."""
    chosen = mode()
    if chosen == "off":
        kwargs["disable"] = True
    if chosen == "auto":
        from tqdm.auto import tqdm as bar
    else:
        from tqdm import tqdm as bar
    return bar(*args, **kwargs)
