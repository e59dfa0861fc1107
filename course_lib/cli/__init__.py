"""``python -m course_lib <command>``: the course's scripts in one place.

Chapter 1: ``env``, ``demo``, ``export``. Chapter 2: ``build``, ``run``, ``score``. Later chapters add
``bench`` (3) and ``yolo`` (6); the homework adds ``submit`` and ``grade``. Bad input prints one line
(``error: ...``) and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from course_lib.cli import cnsd, homework, serve, yolo
from course_lib.env import MissingDependency
from course_lib.threads import apply_thread_policy

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course_lib", description="the course's scripts in one place (bad input: one error line, exit code 2)")
    p.add_argument("--threads", help="CPU threads for PyTorch (default: $COURSE_THREADS, else 1 on machines "
                   "of up to 4 cores, else half the cores; see course_lib/threads.py)")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (cnsd, yolo, homework, serve):
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_thread_policy(args.threads)
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            MissingDependency) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
