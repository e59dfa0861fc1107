"""course_lib.bench (chapter 3): statistics, floor maths, tables, JSON, plots, and one variant measured end
to end on the tiny model. The whole GPU script (tools/bench_h100.py) runs once, small, on the CPU."""
import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import bench, files, timing

ROOT = Path(__file__).resolve().parents[1]




def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def fake(median, spread=1.0, n=10):
    return timing.summarize(np.linspace(median - spread, median + spread, n))


def test_summarize_known_samples():
    s = timing.summarize([5, 1, 4, 2, 3, 10, 9, 8, 7, 6])
    assert s["median"] == 5.5 and s["n"] == 10 and s["min"] == 1 and s["max"] == 10 and s["mean"] == 5.5
    assert s["p10"] == pytest.approx(1.9) and s["p90"] == pytest.approx(9.1) and s["iqr"] == pytest.approx(4.5)
    assert s["raw"] == [5, 1, 4, 2, 3, 10, 9, 8, 7, 6]                # every sample, in order
    assert np.median(s["raw"]) == s["median"]                        # what a grader re-checks
    assert timing.summarize([3.0])["p10"] == 3.0
    for bad in ([], [1.0, float("nan")], [[1.0]]):
        with pytest.raises(ValueError, match="samples"):
            timing.summarize(bad)


def test_floor_maths():
    assert bench.floor_ms(15.8, 800) == pytest.approx(19.75)
    assert round(bench.image_tflop(20), 1) == 15.8                   # 20 x (0.191 + 0.549) + 0.935 + CLIP
    assert bench.image_tflop(10) == pytest.approx(bench.image_tflop(20) - 10 * 0.74)
    assert bench.floor_ms(bench.image_tflop(20)) == pytest.approx(19.7, abs=0.05)
    with pytest.raises(ValueError, match="TFLOP/s"):
        bench.floor_ms(15.8, 0)


def test_time_cpu_counts_calls_and_syncs():
    calls, syncs = [], []
    samples = timing.time_cpu(lambda: calls.append(1), warmup=2, iters=3, sync=lambda: syncs.append(1))
    assert len(samples) == 3 and all(s >= 0 for s in samples)
    assert len(calls) == 5 and len(syncs) == 6
    with pytest.raises(ValueError, match="iters"):
        timing.time_cpu(lambda: None, iters=0)


def test_time_each_times_every_input_alone_and_keeps_the_outputs():
    samples, outs = timing.time_each(lambda x: x * 2, [3, 1, 2], cuda=False)
    assert outs == [6, 2, 4] and len(samples) == 3 and all(s >= 0 for s in samples)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_time_cuda_without_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA device"):
        timing.time_cuda(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_time_cuda_measures_gpu_time():
    a = torch.randn(2048, 2048, device="cuda")
    small = timing.summarize(timing.time_cuda(lambda: a @ a, iters=5))["median"]
    big = timing.summarize(timing.time_cuda(lambda: [a @ a for _ in range(8)], iters=5))["median"]
    assert 0 < small < big


def test_timers_tick_once_per_call_outside_the_sample():
    ticks = []
    samples = timing.time_cpu(lambda: None, warmup=2, iters=3, tick=lambda: ticks.append(1))
    assert len(samples) == 3 and len(ticks) == 5


def test_markdown_and_variant_tables():
    results = [
        {"variant": "fp32-separate", "total": fake(2000.0)},
        {"variant": "fp16-batched", "total": fake(500.0), "psnr_vs_fp32": 31.5, "max_diff_vs_fp32": 12,
         "stages": {s: fake(2.0) for s in bench.STAGES}},
        {"variant": "fp16-batched-graph", "skipped": "needs a CUDA GPU"},
        {"variant": "fp16-batched-graph-sdpa-compile", "error": "RuntimeError('boom')"},
    ]
    table = bench.variant_table(results, baseline="fp32-separate", floor=20.0).splitlines()
    assert table[0] == "| variant | median ms | p10-p90 ms | n | speed-up | x floor | PSNR dB | max diff |"
    assert table[1] == "|---|---|---|---|---|---|---|---|"
    assert table[3] == "| fp16-batched | 500.0 | 499.2-500.8 | 10 | 4.00 | 25.0 | 31.5 | 12 |"
    assert "needs a CUDA GPU" in table[4] and "error: RuntimeError('boom')" in table[5]
    stages = bench.stage_table(results).splitlines()
    assert stages[0] == "| variant | CLIP | ControlNet /step | UNet /step | step | VAE | sum | whole |"
    assert stages[2].startswith("| fp32-separate | - |") and stages[3] == "| fp16-batched | 2.00 | 2.00 | 2.00 | 2.00 | 2.00 | - | 500.0 |"
    assert stages[-1] == bench.STAGE_NOTE and "step = ControlNet + UNet + guidance arithmetic" in stages[-1]
    results[1].update(steps=20, reused_steps=5)                       # sum = CLIP + (20 - 5) x step + VAE
    assert bench.stage_table(results).splitlines()[3] == "| fp16-batched | 2.00 | 2.00 | 2.00 | 2.00 | 2.00 | 34.0 | 500.0 |"
    assert timing.markdown_table(["x"], [[1.5e-4], [0.0], [None], [math.inf]]).splitlines()[2:] == \
        ["| 1.50e-04 |", "| 0 |", "| - |", "| inf |"]


def test_write_json_is_atomic_and_strict(tmp_path):
    data = {"psnr": math.inf, "n": np.int64(3), "x": np.float32(0.5), "_image": np.zeros((4, 4)), "p": tmp_path}
    path = files.write_json(tmp_path / "sub" / "r.json", data)
    assert json.loads(path.read_text()) == {"psnr": "inf", "n": 3, "x": 0.5, "p": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]     # no temp file left behind


def test_plots_are_png_with_a_fixed_size(tmp_path):
    labels = ["fp32-separate", "fp16-batched-graph"]
    path = bench.plot_latencies(labels, [fake(2600.0, 50), fake(90.0, 2)], tmp_path / "bars.png", floor=19.75)
    assert png_size(path) == (800, 450)
    curve = bench.plot_quality_curve([{"label": "20 steps", "ms": 90, "psnr": math.inf},
                                      {"label": "10 steps", "ms": 50, "psnr": 24.0}], tmp_path / "curve.png")
    assert png_size(curve) == (600, 400)
    with pytest.raises(ValueError, match=".png"):
        bench.plot_latencies(labels, [fake(1.0)] * 2, tmp_path / "bars.svg")
    with pytest.raises(ValueError, match="labels"):
        bench.plot_latencies(labels, [fake(1.0)], tmp_path / "x.png")


def test_model_errors_compare_every_sub_model():
    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.cnsd.attention import set_attention_backend

    reference = build_cnsd(get_config("tiny"), seed=0)
    other = build_cnsd(get_config("tiny"), seed=0)
    set_attention_backend(other, "sdpa")
    errors = bench.model_errors(reference, other, height=64, width=64)
    assert set(errors) == {"clip", "controlnet", "unet", "decoder"}
    assert all(e["finite"] and e["rel_l2"] < 1e-5 for e in errors.values())
    assert errors["controlnet"]["rel_l2"] > 0                         # sdpa is not bit-identical: really compared
    assert bench.model_errors(reference, reference, height=64, width=64)["unet"]["rel_l2"] == 0


def test_bench_pipeline_on_the_tiny_model():
    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.cnsd.tokenizer import byte_level_tokenizer
    from course_lib.samples import sample_photo

    models = {"fp32": build_cnsd(get_config("tiny"), seed=0)}
    tok, photo = byte_level_tokenizer(), sample_photo(size=(64, 64))
    base = bench.bench_pipeline("fp32-separate", models, tok, photo, device="cpu", iters=2, warmup=1, steps=2,
                                stages=False)
    assert base["total"]["n"] == 2 and base["first_call_ms"] > 0 and base["_image"].shape == (64, 64, 3)
    fast = bench.bench_pipeline("fp32-batched", models, tok, photo, device="cpu", iters=1, warmup=1, steps=2,
                                reference_image=base["_image"], stage_iters=1)
    assert fast["max_diff_vs_fp32"] <= 1 and fast["psnr_vs_fp32"] > 40
    assert set(fast["stages"]) == set(bench.STAGES) and fast["switches"]["guidance"] == "batched"
    pipes: dict = {}
    for variant in ("fp32-batched", "fp32-batched-steps1", "fp32-batched-reuse-eps2"):   # one pipeline for all three
        r = bench.bench_pipeline(variant, models, tok, photo, device="cpu", iters=1, warmup=1, steps=8, stages=False,
                                 pipes=pipes)
        assert r["variant"] == variant
    assert len(pipes) == 1 and r["reused_steps"] == 2
    hint_once = bench.bench_pipeline("fp32-separate-hint-once", models, tok, photo, device="cpu", iters=1, warmup=1,
                                     steps=2, stage_iters=1)
    assert len(hint_once["stages"]["controlnet"]["raw"]) == 1
    skipped = bench.bench_pipeline("fp16-batched-graph", models, tok, photo, device="cpu")
    assert skipped == {"variant": "fp16-batched-graph", "switches": skipped["switches"], "skipped": "needs a CUDA GPU"}


@pytest.mark.slow
def test_the_gpu_script_runs_small_on_the_cpu(tmp_path):
    """tools/bench_h100.py end to end: tiny model, 64x64, 2 steps, fp32 variants (fp16 is slow on a CPU)."""
    spec = importlib.util.spec_from_file_location("bench_h100", ROOT / "tools" / "bench_h100.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--out", str(tmp_path), "--config", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "1",
                        "--height", "64", "--width", "64", "--steps", "2", "--curve-steps", "1", "--reuse", "",
                        "--variants", "fp32-separate,fp32-batched,fp16-batched-graph", "--skip-errors"])
    assert code == 0
    run = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in run["results"]] == ["fp32-separate", "fp32-batched", "fp16-batched-graph"]
    assert run["results"][2]["skipped"] == "needs a CUDA GPU"
    assert run["curve"][0]["variant"] == "fp32-batched-steps1" and "psnr_vs_20_steps" in run["curve"][0]
    assert run["results"][1]["total"]["raw"] and run["floor_ms"] == pytest.approx(bench.floor_ms(bench.image_tflop(2)))
    md = (tmp_path / "bench.md").read_text()
    assert "| fp32-batched |" in md and "fp32-batched-steps1" in md
    assert png_size(tmp_path / "bench.png") == (800, 450) and png_size(tmp_path / "curve.png") == (600, 400)


def test_run_bench_refuses_a_gpu_variant_on_the_cpu_before_any_work(monkeypatch):
    monkeypatch.setattr(bench, "bench_pipeline", lambda *a, **k: pytest.fail("measured a GPU-only variant on a CPU"))
    with pytest.raises(ValueError, match="variant fp16-batched-graph: graph needs a CUDA GPU, got device cpu"):
        bench.run_bench("tiny", "fp16-batched-graph", device="cpu")


def test_run_bench_is_the_cli_command(tmp_path):
    result = bench.run_bench("tiny", "fp32-batched", device="cpu", iters=1, warmup=1, height=64, width=64, steps=1,
                             out=tmp_path, stages=False)
    assert result["max_diff_vs_fp32"] <= 1 and result["environment"]["torch"] == torch.__version__
    saved = json.loads((tmp_path / "bench_fp32-batched.json").read_text())
    assert saved["total"]["raw"] == result["total"]["raw"] and "_image" not in saved
