"""TensorRT's log, routed through Python's ``logging``. Introduced in chapter 2.

TensorRT's own ``trt.Logger`` prints from C++, which a notebook (and nbval) cannot capture. The
course's logger is a ``trt.ILogger`` subclass whose ``log`` hands each message to the Python logger
``course_lib.trt`` instead. It also keeps the last errors, so a failed build can quote them.

TensorRT is imported lazily, so the subclass is made by a factory: :func:`get_logger`. There is one
subclass (and one process-wide logger) per TensorRT flavour, since ``tensorrt.ILogger`` and
``tensorrt_rtx.ILogger`` are different classes.
"""
from __future__ import annotations

import logging
import sys
from collections import deque

LOGGER_NAME = "course_lib.trt"

# TensorRT's ILogger.Severity values, most severe first, and the Python level each becomes
SEVERITY_NAMES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
_PY_LEVELS = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)


def python_level(severity: int) -> int:
    """The Python logging level for a TensorRT severity value (0 internal error .. 4 verbose)."""
    severity = int(severity)
    if not 0 <= severity < len(_PY_LEVELS):
        raise ValueError(f"TensorRT severity {severity}: expected 0..{len(_PY_LEVELS) - 1}")
    return _PY_LEVELS[severity]


def severity_value(name: str) -> int:
    """``"warning"`` -> 2: a severity name (any case) as TensorRT's value."""
    key = name.upper()
    if key not in SEVERITY_NAMES:
        raise ValueError(f"log level {name!r}: expected one of {', '.join(s.lower() for s in SEVERITY_NAMES)}")
    return SEVERITY_NAMES.index(key)


class _CurrentStderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (Jupyter and pytest swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _python_logger(name: str, threshold: int) -> logging.Logger:
    """The Python logger, with a stderr handler if nobody configured one, passing ``threshold`` and up."""
    py_logger = logging.getLogger(name)
    if not py_logger.hasHandlers():
        py_logger.addHandler(_CurrentStderr())
    py_logger.setLevel(python_level(threshold))
    return py_logger


_CLASSES: dict[str, type] = {}    # flavour -> its ILogger subclass
_DEFAULTS: dict[str, object] = {}  # flavour -> the process-wide logger


def _logger_class(trt):
    """Make the ``trt.ILogger`` subclass of this flavour once."""
    from course_lib.trt.flavour import flavour_of

    name = flavour_of(trt)
    if name not in _CLASSES:

        class PythonLogger(trt.ILogger):
            """A ``trt.ILogger`` that forwards to Python ``logging``."""

            def __init__(self, min_severity: str = "warning", name: str = LOGGER_NAME) -> None:
                trt.ILogger.__init__(self)
                self.threshold = severity_value(min_severity)
                self.py_logger = _python_logger(name, self.threshold)
                self.errors: deque[str] = deque(maxlen=20)

            def log(self, severity, msg) -> None:
                value = int(severity)
                if value <= 1:
                    self.errors.append(msg)
                if value <= self.threshold:
                    self.py_logger.log(python_level(value), "[TensorRT] %s", msg)

            def set_level(self, min_severity: str) -> None:
                self.threshold = severity_value(min_severity)
                self.py_logger.setLevel(python_level(self.threshold))

        _CLASSES[name] = PythonLogger
    return _CLASSES[name]


def make_logger(min_severity: str = "warning", name: str = LOGGER_NAME, trt=None):
    """Chapter 2: a new TensorRT logger that logs at ``min_severity`` and above through ``logging``.

    ``trt``: the TensorRT module (default: the flavour in force, :func:`course_lib.trt.require_tensorrt`).
    """
    if trt is None:
        from course_lib.trt.flavour import require_tensorrt

        trt = require_tensorrt()
    return _logger_class(trt)(min_severity, name)


def get_logger(min_severity: str | None = None, trt=None):
    """Chapter 2: the process-wide TensorRT logger of a flavour (TensorRT wants one logger for all objects).

    ``min_severity`` (``"error"``, ``"warning"``, ``"info"``, ``"verbose"``) changes its level.
    """
    if trt is None:
        from course_lib.trt.flavour import require_tensorrt

        trt = require_tensorrt()
    from course_lib.trt.flavour import flavour_of

    logger = _DEFAULTS.get(flavour_of(trt))
    if logger is None:
        logger = _DEFAULTS[flavour_of(trt)] = make_logger(min_severity or "warning", trt=trt)
    elif min_severity is not None:
        logger.set_level(min_severity)
    return logger
