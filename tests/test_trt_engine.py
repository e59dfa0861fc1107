"""The Engine's pure parts (chapter 2), on CPU: feed validation, dtype mapping, the info table.

Running a plan is tested in test_trt_engine_gpu.py (needs TensorRT and a GPU).
"""
from __future__ import annotations

import pytest
import torch

from course_lib.trt.engine import TRT_TO_TORCH, check_feed, format_io_table, torch_dtype

SPECS = [("x_noisy", (1, 4, 32, 48), torch.float32), ("timestep", (1,), torch.int32)]


def _feed(**changes):
    feed = {"x_noisy": torch.zeros(1, 4, 32, 48), "timestep": torch.zeros(1, dtype=torch.int32)}
    feed.update(changes)
    return {k: v for k, v in feed.items() if v is not None}


def test_a_good_feed_passes():
    check_feed(_feed(), SPECS)
    check_feed(_feed(x_noisy=torch.zeros(3, 4, 32, 48)), [("x_noisy", (-1, 4, 32, 48), torch.float32), SPECS[1]])


@pytest.mark.parametrize("changes, message", [
    ({"context": torch.zeros(1, 77, 64)}, "feed has 'context', which is not an input of this engine: its inputs are x_noisy, timestep"),
    ({"timestep": None}, "feed lacks input 'timestep': expected a torch.int32 tensor of shape (1,)"),
    ({"x_noisy": torch.zeros(1, 4, 32, 40)}, "input 'x_noisy': expected shape (1, 4, 32, 48) torch.float32, got (1, 4, 32, 40) torch.float32"),
    ({"x_noisy": torch.zeros(4, 32, 48)}, "input 'x_noisy': expected shape (1, 4, 32, 48)"),
    ({"timestep": torch.zeros(1, dtype=torch.int64)}, "input 'timestep': expected shape (1,) torch.int32, got (1,) torch.int64"),
])
def test_bad_feeds_name_the_tensor(changes, message):
    with pytest.raises(ValueError) as info:
        check_feed(_feed(**changes), SPECS)
    assert str(info.value).startswith(message)


def test_torch_dtype_by_name():
    class FakeEnum:  # stands in for trt.DataType.HALF: only .name is read
        name = "HALF"

    assert torch_dtype(FakeEnum()) is torch.float16
    assert torch_dtype("DataType.INT32") is torch.int32
    assert set(TRT_TO_TORCH) >= {"FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"}
    with pytest.raises(ValueError, match="FP4"):
        torch_dtype("FP4")


def test_io_table():
    table = format_io_table([("x", "input", (1, 3, 8, 8), torch.float32, "profile (1, 3, 8, 8) .. (4, 3, 8, 8)"),
                             ("y", "output", (1, 4, 8, 8), torch.float16, "")])
    lines = table.splitlines()
    assert lines[0].split() == ["tensor", "mode", "shape", "dtype"]
    assert lines[1].split()[:2] == ["x", "input"] and "float32" in lines[1] and lines[1].endswith("(4, 3, 8, 8)")
    assert lines[2].endswith("float16")
