"""TensorRT's log through Python logging (chapter 2): the level mapping, on CPU.

The ILogger subclass itself needs tensorrt: see test_trt_engine_gpu.py.
"""
from __future__ import annotations

import logging

import pytest

from course_lib.env import MissingDependency, has_module
from course_lib.trt.logger import make_logger, python_level, severity_value


def test_severities_map_to_python_levels():
    assert [python_level(v) for v in range(5)] == [
        logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
    assert [severity_value(n) for n in ("internal_error", "error", "Warning", "INFO", "verbose")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="expected 0..4"):
        python_level(5)
    with pytest.raises(ValueError, match="'loud'"):
        severity_value("loud")


@pytest.mark.skipif(has_module("tensorrt"), reason="tensorrt is installed here")
def test_without_tensorrt_the_logger_says_what_to_install():
    with pytest.raises(MissingDependency, match="tensorrt is not installed.*install TensorRT"):
        make_logger()
