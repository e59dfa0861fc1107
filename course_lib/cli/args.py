"""Argument values checked where they are parsed: each ``type=`` here refuses a bad value with one line.

argparse turns an :class:`argparse.ArgumentTypeError` into ``error: <command>: argument --steps: expected
an integer >= 1, got '0'`` (see :class:`OneLineParser`), before any model is built or exported.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path


class UsageError(ValueError):
    """A command line argparse refused (unknown option, bad value, missing argument): one line, exit 2."""


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default: "(default: X)" is appended unless the help text already says
    what the default is (or there is none: None, False, "")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and has_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should show the option's default (not for None, False, "" or a suppressed one)."""
    value = action.default
    return not (value is None or value is False or value is argparse.SUPPRESS or (isinstance(value, str) and not value))


class _Subcommands(argparse._SubParsersAction):
    """A subcommand's ``--help`` starts with the one line it has in the command list."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("help"):
            kwargs.setdefault("description", kwargs["help"])
        return super().add_parser(name, **kwargs)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line (and exit code 2), not a usage block; ``--help``
    shows every default (:class:`DefaultsFormatter`), in subcommands too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)

    def error(self, message: str):
        command = self.prog.removeprefix("python -m course_lib").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, high: int | None = None):
    """An integer in ``low..high`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
seed_int = int_at_least(0, 2**63 - 1)


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A threshold in 0..1 (a confidence, an IoU)."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}")
    return value


def multiple_of(step: int, what: str):
    """A positive integer that is a multiple of ``step`` (image sizes: 64 for CNSD, 32 for YOLOv5)."""
    def parse(text: str) -> int:
        value = _int(text)
        if value <= 0 or value % step:
            raise argparse.ArgumentTypeError(f"expected a positive multiple of {step} ({what}), got {text!r}")
        return value
    return parse


image_side = multiple_of(64, "the UNet halves the 1/8 latent three times")
yolo_size = multiple_of(32, "YOLOv5's largest stride")


def ddim_steps(text: str) -> int:
    """DDIM steps: 1..1000 and a uniform spacing that stays below timestep 1000 (not 3, 9, 27, ...)."""
    value = int_at_least(1, 1000)(text)
    from course_lib.pipeline.sampler import ddim_timesteps

    try:
        ddim_timesteps(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def bench_variant(text: str) -> str:
    """A chapter 3 variant name, e.g. fp16-batched-graph (course_lib.pipeline.speedups.Switches), normalised."""
    from course_lib.pipeline.speedups import Switches

    try:
        return Switches.from_name(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def device(text: str) -> str:
    """A torch device name: cpu, cuda, cuda:N or mps (whether it exists here is checked by the command)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def suffixed(*suffixes: str):
    """A file name ending in one of ``suffixes`` that is not an existing folder."""
    def parse(text: str) -> str:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"expected a file name ending in {' or '.join(suffixes)}, got {text!r}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder: expected a file name ending in {suffixes[0]}")
        return text
    return parse


image_file = suffixed(".png", ".jpg", ".jpeg", ".bmp", ".webp")


def out_folder(text: str) -> str:
    """A folder to write into (created if missing): not an existing file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder name")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file: expected a folder (it is created if missing)")
    return text


def check_device(name: str | None) -> None:
    """A device the command was asked for exists here (a CUDA device needs a GPU torch sees), else ValueError."""
    if name is None or not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
