"""course_lib.trt.sweep (chapter 2's homework 2): the table and bar chart from synthetic timings, the random
feed, and the clear error without TensorRT. The sweep itself needs TensorRT and a GPU."""
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import timing
from course_lib.trt import sweep as hw2
from course_lib.env import MissingDependency


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def fake(median, spread=1.0, n=10):
    return timing.summarize(np.linspace(median - spread, median + spread, n))


def hw2_records():
    records = []
    for model, base in (("unet", 40.0), ("clip", 1.0)):
        for level in (0, 3, 5):
            for graph in (False, True):
                ms = base * (1.2 - 0.05 * level) * (0.75 if graph else 1.0)
                records.append({"model": model, "opt_level": level, "cuda_graph": graph, "build_s": 10.0 * level + 5,
                                "plan_mib": 1.0, "latency": fake(ms, 0.1 * ms)})
    return records


def test_hw2_table_and_plot_from_synthetic_timings(tmp_path):
    lines = hw2.hw2_table(hw2_records()).splitlines()
    assert lines[0] == ("| engine | opt level | build s | no graph ms | p10-p90 | CUDA graph ms | p10-p90 | "
                        "graph speed-up |")
    assert len(lines) == 2 + 6
    assert lines[2] == "| unet | 0 | 5.00 | 48.0 | 44.2-51.8 | 36.0 | 33.1-38.9 | 1.33 |"
    assert png_size(hw2.plot_hw2(hw2_records(), tmp_path / "hw2.png")) == (1000, 350)
    with pytest.raises(ValueError, match="no records"):
        hw2.plot_hw2([], tmp_path / "none.png")


def test_hw2_feed_follows_the_specs():
    feed = hw2.hw2_feed({"input_ids": ((2, 77), torch.int32), "timestep": ((2,), torch.int32),
                           "hint": ((1, 3, 8, 8), torch.float16), "x_noisy": ((1, 4, 1, 1), torch.float32)})
    assert feed["input_ids"].dtype == torch.int32 and 0 <= feed["input_ids"].min() and feed["input_ids"].max() < 49408
    assert feed["timestep"].max() < 1000 and feed["hint"].dtype == torch.float16
    assert 0 <= feed["hint"].min() and feed["hint"].max() <= 1 and feed["x_noisy"].shape == (1, 4, 1, 1)


def test_hw2_sweep_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):            # None in sys.modules: the import fails, as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency, match="neither tensorrt nor tensorrt_rtx is installed"):
        hw2.hw2_sweep(tmp_path, tmp_path / "out")

