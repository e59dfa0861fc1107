"""``python -m course_lib <command>``: the course's scripts in one place.

Chapter 1: ``env``, ``demo``, ``export``. Chapter 2: ``build``, ``run``, ``score``. Later chapters add
``bench`` (3) and ``yolo`` (6); the homework adds ``submit`` and ``grade``.

:func:`main` is the one place where an expected failure becomes one line (``error: ...``) and exit code 2:
a bad command line or argument value (argparse's too), a missing optional dependency, a bad or
unreadable ONNX file, a full disk and every other OSError (:func:`course_lib.files.os_error_text`).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from course_lib.cli import cnsd, homework, serve, toy, yolo
from course_lib.cli.args import OneLineParser, UsageError
from course_lib.env import MissingDependency
from course_lib.files import os_error_text
from course_lib.threads import apply_thread_policy

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m course_lib", description="the course's scripts in one place (bad input: one error line, exit code 2)")
    p.add_argument("--threads", help="CPU threads for PyTorch (default: $COURSE_THREADS, else 1 on machines "
                   "of up to 4 cores, else half the cores; see course_lib/threads.py)")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (cnsd, yolo, homework, toy, serve):
        group.add_commands(sub)
    return p


def error_line(e: BaseException) -> str | None:
    """The one line for an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(e, (UsageError, ValueError, MissingDependency)):
        return str(e)
    if isinstance(e, OSError):                          # a full disk, a missing or unreadable file, ...
        return os_error_text(e) if e.strerror else str(e)
    if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("course_lib"):
        return f"the Python package {e.name!r} is not installed here (pip install it, see environment.yml)"
    if isinstance(e, MemoryError):
        return "out of memory (try a smaller --height/--width or batch, or a machine with more memory)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        apply_thread_policy(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        line = error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        flavour = sys.modules.get("course_lib.trt.flavour")
        if flavour is not None:
            flavour.select(None)             # --tensorrt holds for one command (main may run again in-process)
