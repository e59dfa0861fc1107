"""course_lib.speed_report (chapter 3, issue 19): the table, markdown and plot of a speed run from its JSON alone;
and tools/hopper_speed.py end to end, small, on the CPU (CUDA-only variants skipped, their CPU twins measured)."""
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from course_lib.speed_report import plot_speed, speed_markdown, speed_table
from course_lib.timing import summarize

ROOT = Path(__file__).resolve().parents[1]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def run_data() -> dict:
    row = lambda name, kind, ms, **kw: {"variant": name, "kind": kind, "total": summarize([ms * 0.9, ms, ms * 1.2]), **kw}  # noqa: E731
    return {"command": "python tools/hopper_speed.py --out x",
            "settings": {"preset": "sd15", "device": "cuda", "seeds": [1, 2], "iters": 3, "warmup": 2, "size": [256, 384],
                         "floor_ms": 19.7, "target_ms": 60.0, "full_quality_db": 40.0},
            "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "cudnn": 91900},
            "variants": [row("fp32-separate", "reference", 2000.0, psnr_vs_fp32="inf", max_diff_vs_fp32=0),
                         row("fp16-batched-graph-sdpa-hint-once-compile", "variant", 150.0, psnr_vs_fp32=57.0,
                             max_diff_vs_fp32=1, compile_s=115.0, first_image_ms=115200.0),
                         row("fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph", "variant", 100.0, psnr_vs_fp32=57.0,
                             max_diff_vs_fp32=1, twin={"variant": "x-cl", "identical": True, "max_diff": 0}),
                         row("fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph-steps8", "other image", 40.0,
                             psnr_vs_fp32=30.0, max_diff_vs_fp32=40, psnr_vs_20_steps=41.0),
                         {"variant": "fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph-fp8", "kind": "variant",
                          "error": "RuntimeError: boom"},
                         {"variant": "fp16-batched-graph-sdpa-hint-once-compile-max-cl-loop-graph", "kind": "variant",
                          "skipped": "needs a CUDA GPU"}],
            "profiles": {"eager": {"error": "RuntimeError: no"}}, "skipped": [{"what": "compile-max", "reason": "budget"}]}


def test_speed_table_rows_say_speed_up_floor_and_quality():
    lines = speed_table(run_data()).splitlines()
    assert lines[0].startswith("| variant | p10 / median / p90 ms | x fp32 original | x floor | PSNR dB | max diff |")
    best = next(line for line in lines if line.startswith("| fp16-batched-graph-sdpa-hint-once-compile |"))
    assert "| 138.0 / 150.0 / 174.0 | 13.3 | 7.61 | 57.0 | 1 | 115.0 | 115200.0 |" in best
    assert "same image as x-cl: True (max diff 0)" in lines[4] and "41.0 dB vs its 20-step image" in lines[5]
    assert "error: RuntimeError: boom" in lines[6] and "needs a CUDA GPU" in lines[7]


def test_markdown_and_plot_from_the_json_alone(tmp_path):
    data = json.loads(json.dumps(run_data()))                      # what a reader of the JSON file has
    md = speed_markdown(data)
    assert md.startswith("# canny2image on NVIDIA H100 80GB HBM3 without TensorRT (issue 19)")
    assert "- skipped compile-max: budget" in md and "- profile eager failed: RuntimeError: no" in md
    assert png_size(plot_speed(data, tmp_path / "speed.png")) == (1400, 550)
    assert plot_speed({**data, "variants": []}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_the_hopper_script_runs_small_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("hopper_speed", ROOT / "tools" / "hopper_speed.py")
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    spec.loader.exec_module(script)
    code = script.main(["--out", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--size", "64x64", "--iters", "2",
                        "--budget-s", "900"])
    assert code == 0
    run = json.loads((tmp_path / "hopper_speed.json").read_text())
    rows = {r["variant"]: r for r in run["variants"]}
    assert rows["fp32-separate"]["repeatable"] and len(rows["fp32-separate"]["total"]["raw"]) == 3
    assert rows["fp16-batched-graph-sdpa-hint-once-compile"]["skipped"] == "needs a CUDA GPU"
    twin = rows["fp32-batched-sdpa-hint-once"]
    assert twin["twin_of"] == "fp16-batched-graph-sdpa-hint-once-compile" and twin["max_diff_vs_fp32"] <= 1
    assert len(twin["total"]["raw"]) == 2 and "fp32-batched-sdpa-hint-once-cl" in rows
    assert {r["kind"] for r in run["variants"]} == {"reference", "variant", "other image"}
    assert "psnr_vs_20_steps" in rows[run["fastest"] + "-steps8"] and "DDIM loop (20 steps)" in run["stages"]["stages"]
    assert next(iter(run["profiles"].values()))["kernels"] > 100 and "cut_off" not in run
    assert (tmp_path / "hopper_speed.md").read_text().count("needs a CUDA GPU") == 5
    assert png_size(tmp_path / "hopper_speed.png") == (1400, 550)
