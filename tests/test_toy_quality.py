"""Chapters 3 and 5 on the toy (issue #18): fp32, FP16 and INT8 ONNX pipelines on the same held-out scenes,
and SmoothQuant on a whole CNSD. Random toy weights (the shipped file is not needed), 2 DDIM steps."""
import matplotlib
import numpy as np
import pytest
import torch

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
from course_lib.onnx.export_cnsd import export_cnsd
from course_lib.precision.fp16 import to_fp16_onnx
from course_lib.precision.smoothquant import smooth_cnsd
from course_lib.toy.quality import (compare_toy_pipelines, quantize_controlnet_unet, record_toy_calibration,
                                    toy_ort_pipeline)

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """The random toy exported at 64x64, and its FP16 copy."""
    out = tmp_path_factory.mktemp("toyq")
    model = build_cnsd(get_config("toy"), seed=0)
    fp32 = export_cnsd(model, out / "fp32", height=64, width=64, progress=False)
    fp16 = {n: to_fp16_onnx(r.path, out / "fp16" / f"{n}.onnx", progress=False) for n, r in fp32.items()}
    return model, fp32, fp16, out


def test_fp32_against_itself_and_fp16(toy_files):
    _, fp32, fp16, _ = toy_files
    pipes = {"fp32": toy_ort_pipeline(fp32), "again": toy_ort_pipeline(fp32), "fp16": toy_ort_pipeline(fp16)}
    cmp = compare_toy_pipelines(pipes, n=2, ddim_steps=2)
    assert [r.name for r in cmp.rows] == ["fp32", "again", "fp16"] and cmp.reference == "fp32"
    same = cmp.row("again")
    assert same.psnr_db == same.worst_psnr_db == float("inf") and same.max_pixel_diff == 0 and same.identical == 2
    assert cmp.f1_change("again") == 0.0 and cmp.colour_change("again") == 0.0
    half = cmp.row("fp16")
    assert half.score.n == 2 and np.isfinite(half.score.edge_f1)
    assert half.psnr_db > 20 and half.worst_psnr_db <= half.psnr_db and 0 <= half.max_pixel_diff <= 255
    table = cmp.table()
    assert table.count("\n") == 4 and "| again |" in table and "identical" in table and "Δ F1 vs fp32" in table
    fig = cmp.figure(k=2)                               # hint, 3 outputs, 2 differences
    assert fig.axes and len(fig.axes) == 6 * 2
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="expected one of"):
        cmp.row("int8")


def test_bad_arguments_say_what_was_expected(toy_files):
    _, fp32, _, _ = toy_files
    with pytest.raises(ValueError, match="missing"):
        toy_ort_pipeline({n: p for n, p in fp32.items() if n != "decoder"})
    with pytest.raises(ValueError, match="reference"):
        compare_toy_pipelines({"fp32": toy_ort_pipeline(fp32)}, n=1, ddim_steps=1, reference="fp16")
    with pytest.raises(ValueError, match="deadline"):
        compare_toy_pipelines({"fp32": toy_ort_pipeline(fp32)}, n=1, ddim_steps=1, deadline=0.0)


def test_calibration_on_toy_scenes_and_int8_pipeline(toy_files):
    model, fp32, _, out = toy_files
    pipe = toy_ort_pipeline(fp32)
    calib = record_toy_calibration(pipe, out / "calib", n=2, ddim_steps=4, step_stride=2)
    assert [r["seed"] for r in calib.runs] == [1, 2] and calib.runs[0]["prompt"].endswith("background")
    assert len(calib.samples("unet")) == len(calib.samples("controlnet")) == 2 * 2 * 2   # runs x steps 0, 2 x calls
    int8 = quantize_controlnet_unet(fp32, calib, out / "int8", runs=[0], models=("controlnet",))
    assert set(int8) == {"controlnet"} and int8["controlnet"].report.passed and int8["controlnet"].samples == 4
    assert int8["controlnet"].path.name == "controlnet.int8.onnx"
    assert any("time_embed" in n for n in int8["controlnet"].excluded_nodes)
    cmp = compare_toy_pipelines({"fp32": pipe, "int8": toy_ort_pipeline({**fp32, **int8})}, n=1, ddim_steps=2)
    assert np.isfinite(cmp.row("int8").psnr_db) or cmp.row("int8").identical == 1


def test_smooth_cnsd_keeps_the_function_and_the_original(toy_files):
    model, *_ = toy_files
    feeds = {n: [{k: v.numpy() for k, v in example_inputs(contracts(model.config, 1, 64, 64)[n], seed=s,
                                                          vocab_size=model.config.clip.vocab_size).items()}
                 for s in (1, 2)] for n in ("controlnet", "unet")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smoothed, scales = smooth_cnsd(model, feeds, alpha=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())      # the original untouched
    assert set(scales) == {"controlnet", "unet"} and all(scales[n] for n in scales)
    changed = [k for k, v in smoothed.state_dict().items() if not torch.equal(before[k], v)]
    assert any("norm1" in k for k in changed) and any("attn1.to_q" in k for k in changed)
    args = [torch.as_tensor(v) for v in feeds["unet"][0].values()]
    with torch.no_grad():
        a, b = model.positional("unet")(*args), smoothed.positional("unet")(*args)
    a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
