"""course_lib.cli (``python -m course_lib ...``) and backends.make_backends, on the tiny model at 64x64.

Commands run in-process through ``main(argv)`` (fast: torch is imported once); the TensorRT check and
the entry point run as a real subprocess. One export (module fixture) serves the run/score tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from course_lib.backends import OrtBackend, TorchBackend, make_backends
from course_lib.cli import EXIT_USAGE, main
from course_lib.cnsd import MODEL_NAMES, build_cnsd, contracts, get_config
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.env import has_module
from course_lib.samples import read_image, sample_photo, write_image
from course_lib.score import max_pixel_diff, psnr

REPO = Path(__file__).resolve().parent.parent
SIZE = 64          # image height = width; tiny's latent is 8x8
STEPS = 4


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines (progress bars also go to stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "onnx"
    code, out, _ = run_main(["export", "--config", "tiny", "--out", folder, "--height", SIZE, "--width", SIZE])
    return folder, code, out


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    """A 64x64 photo: at --resolution 64 the pipeline keeps it 64x64, the size of the static export."""
    return write_image(tmp_path_factory.mktemp("photo") / "photo.png", sample_photo(size=(SIZE, SIZE)))


def test_export_writes_the_contract_and_passes_parity(exported):
    folder, code, out = exported
    assert code == 0, out
    table = contracts(get_config("tiny"), 1, SIZE, SIZE)
    for name in MODEL_NAMES:
        graph = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False).graph
        assert [i.name for i in graph.input] == table[name].input_names, name
        assert [o.name for o in graph.output] == table[name].output_names, name
    assert "PASSED" in out and "FAIL" not in out
    assert sum(1 for line in out.splitlines() if line.rstrip().endswith(" ok")) == 1 + 13 + 1 + 1


def test_export_to_an_existing_file_is_one_line_and_exit_2(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, _, err = run_main(["export", "--out", target, "--height", SIZE, "--width", SIZE, "--no-check"])
    assert code == EXIT_USAGE
    assert len(error_lines(err)) == 1 and "taken" in error_lines(err)[0]
    assert target.read_text() == "not a folder"


def test_run_torch_and_ort_give_the_same_image(exported, photo_file, tmp_path):
    folder, code, _ = exported
    assert code == 0
    common = ["--config", "tiny", "--image", photo_file, "--resolution", SIZE, "--steps", STEPS]
    code_t, out_t, _ = run_main(["run", "--backend", "torch", "--out", tmp_path / "torch.png", *common])
    code_o, out_o, _ = run_main(["run", "--backend", "ort", "--onnx-dir", folder, "--out", tmp_path / "ort.png", *common])
    assert (code_t, code_o) == (0, 0), out_t + out_o
    assert "torch.png" in out_t and "ort.png" in out_o
    image_t, image_o = read_image(tmp_path / "torch.png"), read_image(tmp_path / "ort.png")
    assert image_t.shape == image_o.shape == (SIZE, SIZE, 3)
    assert max_pixel_diff(image_t, image_o) <= 2
    assert image_t.std() > 1  # not a flat image: the comparison means something


def test_run_eps_options(exported, photo_file, tmp_path):
    folder, code, _ = exported
    common = ["--config", "tiny", "--image", photo_file, "--resolution", SIZE, "--steps", STEPS]
    code_b, _, _ = run_main(["run", "--guidance", "batched", "--out", tmp_path / "batched.png", *common])
    code_r, _, _ = run_main(["run", "--backend", "ort", "--onnx-dir", folder, "--reuse-eps", 2,
                             "--out", tmp_path / "reuse.png", *common])
    assert (code_b, code_r) == (0, 0) and read_image(tmp_path / "reuse.png").std() > 1
    code, _, err = run_main(["run", "--backend", "ort", "--onnx-dir", folder, "--graph-step",
                             "--out", tmp_path / "x.png", *common])
    assert code == EXIT_USAGE and "can't capture ONNX Runtime" in error_lines(err)[0]


def test_latents_of_ort_follow_torch_step_by_step(exported, photo_file):
    folder, code, _ = exported
    assert code == 0
    model = build_cnsd(get_config("tiny"), seed=0)   # the CLI's default weights (export --seed 0)
    photo, tokenizer = read_image(photo_file), byte_level_tokenizer()
    latents = {}
    for kind in ("torch", "ort"):
        pipe = Canny2Image(make_backends(kind, model, onnx_dir=folder), tokenizer, model.config,
                           progress=False, record_latents=True)
        pipe.process(photo, "a bird", image_resolution=SIZE, ddim_steps=STEPS)
        latents[kind] = pipe.last_latents
    assert len(latents["torch"]) == len(latents["ort"]) == STEPS + 1
    errors = [float((a - b).abs().max()) for a, b in zip(latents["torch"], latents["ort"])]
    assert errors[0] == 0.0 and max(errors) < 1e-3, errors


def test_run_ort_without_onnx_dir_is_one_line_and_exit_2(tmp_path):
    code, _, err = run_main(["run", "--backend", "ort", "--steps", 1, "--out", tmp_path / "x.png"])
    assert code == EXIT_USAGE
    assert len(error_lines(err)) == 1 and "--onnx-dir" in err
    assert not (tmp_path / "x.png").exists()


def test_run_ort_at_another_size_names_the_input(exported, photo_file, tmp_path):
    folder, code, _ = exported
    assert code == 0
    photo = write_image(tmp_path / "wide.png", sample_photo(size=(SIZE, 2 * SIZE)))   # 64x128: not the export's
    code, _, err = run_main(["run", "--backend", "ort", "--onnx-dir", folder, "--image", photo,
                             "--resolution", SIZE, "--steps", 1, "--out", tmp_path / "x.png"])
    assert code == EXIT_USAGE
    [line] = error_lines(err)
    assert "'x_noisy'" in line and "(1, 4, 8, 8)" in line


def test_run_with_a_missing_image_is_exit_2(tmp_path):
    code, _, err = run_main(["run", "--image", tmp_path / "nope.png", "--steps", 1, "--out", tmp_path / "x.png"])
    assert code == EXIT_USAGE
    assert len(error_lines(err)) == 1 and "nope.png" in err


NO_TENSORRT = "import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx'] = None; "  # imports fail as if absent


def test_build_without_tensorrt_says_so_in_one_line(tmp_path):
    code = NO_TENSORRT + "from course_lib.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "build", "--onnx-dir", str(tmp_path),
                           "--out", str(tmp_path / "plans")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "neither tensorrt nor tensorrt_rtx is installed" in lines[0]
    assert "pip install tensorrt-cu13" in lines[0] and "pip install tensorrt-rtx" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "plans").exists()


def _static_onnx(path, input_name="latent"):
    """A two-node static ONNX (Conv + Relu) under one of the course's model names: a build in a second."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    weight = numpy_helper.from_array(np.ones((3, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", [input_name, "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["image"], name="act")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weight]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.mark.skipif(not has_module("tensorrt_rtx"), reason="needs TensorRT for RTX (the dev extra installs it)")
def test_build_on_a_cpu_with_tensorrt_for_rtx(tmp_path):
    """``python -m course_lib build --onnx-dir DIR --out DIR`` on a machine without a GPU."""
    _static_onnx(tmp_path / "decoder.onnx")
    proc = subprocess.run([sys.executable, "-m", "course_lib", "build", "--onnx-dir", str(tmp_path), "--out",
                           str(tmp_path / "plans"), "--tensorrt", "tensorrt_rtx", "--compute-capability", "8.6"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "building with TensorRT for RTX" in proc.stdout and f"wrote {tmp_path / 'plans' / 'decoder.plan'}" in proc.stdout
    side = json.loads((tmp_path / "plans" / "decoder.plan.json").read_text())
    assert side["flavour"] == "tensorrt_rtx" and side["compute_capabilities"] == ["86"]
    code, _, err = run_main(["build", "--onnx-dir", tmp_path, "--out", tmp_path / "again", "--tensorrt", "tensorrt_rtx",
                             "--timing-cache", tmp_path / "t.cache"])
    assert code == EXIT_USAGE and len(error_lines(err)) == 1 and "has no timing cache" in err


def test_tensorrt_option_asks_for_a_missing_flavour_in_one_line(tmp_path):
    missing = next((name for name in ("tensorrt", "tensorrt_rtx") if not has_module(name)), None)
    if missing is None:
        pytest.skip("both TensorRT flavours are installed here")
    code, out, err = run_main(["build", "--onnx-dir", tmp_path, "--out", tmp_path / "plans", "--tensorrt", missing])
    assert code == EXIT_USAGE and out == ""
    [line] = error_lines(err)
    assert f"{missing} (" in line and "is asked for (COURSE_TENSORRT or --tensorrt) but not installed" in line
    from course_lib.trt import flavour

    assert flavour.chosen() == "auto"                     # --tensorrt held for that one command only


def test_run_trt_without_tensorrt_is_one_line_and_exit_2(tmp_path, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "plans").mkdir()
    code, _, err = run_main(["run", "--backend", "trt", "--plan-dir", tmp_path / "plans", "--steps", 1,
                             "--out", tmp_path / "x.png"])
    assert code == EXIT_USAGE
    [line] = error_lines(err)
    assert "neither tensorrt nor tensorrt_rtx is installed" in line and "TrtBackend" in line


def test_env_prints_the_report():
    code, out, _ = run_main(["env"])
    assert code == 0
    for row in ("torch", "CUDA GPU", "TensorRT (tensorrt)", "TensorRT for RTX (tensorrt_rtx)", "onnxruntime",
                "ORT providers", "notebook cells"):
        assert any(line.startswith(row) for line in out.splitlines()), row


def test_score_prints_a_psnr_row_per_image(tmp_path):
    rng = np.random.default_rng(0)
    images, refs = tmp_path / "images", tmp_path / "refs"
    expected = {}
    for name in ("bird_0.png", "bird_1.png"):
        ref = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
        image = np.clip(ref.astype(int) + rng.integers(-3, 4, ref.shape), 0, 255).astype(np.uint8)
        write_image(refs / name, ref)
        write_image(images / name, image)
        expected[name] = (psnr(image, ref), max_pixel_diff(image, ref))
    code, out, _ = run_main(["score", images, "--reference", refs, "--no-pd"])
    assert code == 0
    lines = out.splitlines()
    assert "PSNR" in lines[0]
    for name, (db, diff) in expected.items():
        [row] = [line for line in lines if line.startswith(name)]
        assert f"{db:.2f}" in row.split() and str(diff) in row.split()
    assert lines[-2] == "PD and score not shown: --no-pd was given" and "2 images" in lines[-1]


def test_score_without_references_is_exit_2(tmp_path):
    write_image(tmp_path / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "refs").mkdir()
    code, _, err = run_main(["score", tmp_path / "images", "--reference", tmp_path / "refs", "--no-pd"])
    assert code == EXIT_USAGE and "a.png" in err


def test_bench_refuses_gpu_variants_on_a_cpu_in_one_line(tmp_path):
    for variant, parts in (("fp16-batched-graph", "graph needs"), ("fp32-separate-compile", "compile needs"),
                           ("fp16-batched-graph-sdpa-compile", "graph and compile need")):
        code, out, err = run_main(["bench", "--variant", variant, "--device", "cpu", "--out", tmp_path])
        assert code == EXIT_USAGE and out == "" and err.count("\n") == 1, (out, err)
        assert err.startswith(f"error: variant {variant}: {parts} a CUDA GPU, got device cpu")
    code, out, err = run_main(["bench", "--variant", "fp16-bogus"])
    assert code == EXIT_USAGE and out == "" and error_lines(err) == err.splitlines() and "'bogus'" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_on_the_cpu_says_what_it_does_and_adds_up(tmp_path):
    code, out, err = run_main(["bench", "--variant", "fp32-batched", "--device", "cpu", "--height", SIZE, "--width",
                               SIZE, "--steps", 2, "--iters", 1, "--warmup", 0])
    assert code == 0 and out.startswith("bench fp32-batched on cpu (tiny, 64x64, 2 steps)")
    assert "bench fp32-batched: stage decoder" in err                # the progress bar (text under pytest)
    row = [line for line in out.splitlines() if line.startswith("| fp32-batched | ")][-1]     # the stage table's
    clip, _, _, step, vae, total, whole = (float(v) for v in row.strip("| ").split(" | ")[1:])
    assert total == pytest.approx(clip + 2 * step + vae, rel=0.01) and "guidance arithmetic" in out


@pytest.mark.slow
def test_demo_small(tmp_path):
    code, out, _ = run_main(["demo", "--model", "tiny", "--out", tmp_path, "--height", SIZE, "--width", SIZE,
                             "--steps", 2, "--quiet"])
    assert code == 0, out
    assert {"canny2image_torch.png", "canny2image_ort.png", "canny_hint.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "PASSED" in out and "max pixel difference" in out
    phases = ["exporting clip, controlnet, unet and decoder to ONNX", "parity check:", "canny2image on PyTorch",
              "canny2image on ONNX Runtime", "writing the Canny hint"]        # a line before each phase, in order
    assert [out.index(p) for p in phases] == sorted(out.index(p) for p in phases)


@pytest.mark.slow
def test_demo_toy_draws_the_grid_and_scores_it(tmp_path):
    from course_lib.toy.weights import TOY_WEIGHTS

    assert TOY_WEIGHTS.is_file(), "the trained toy weights ship with course_lib (issue #18)"
    code, out, _ = run_main(["demo", "--out", tmp_path, "--scenes", 2, "--steps", 2, "--quiet"])
    assert code == 0, out
    assert {"canny2image.png", "canny2image_torch.png", "canny2image_ort.png", "canny_hint.png"} <= \
        {p.name for p in tmp_path.iterdir()}
    assert "PASSED" in out and "edge F1" in out and "| torch |" in out and "| ort |" in out


def test_run_toy_uses_the_trained_weights_and_its_tokenizer(tmp_path):
    code, out, _ = run_main(["run", "--config", "toy", "--resolution", SIZE, "--steps", 2, "--prompt",
                             "a red circle on a blue background", "--out", tmp_path / "toy.png"])
    assert code == 0, out
    assert "trained weights" in out and (tmp_path / "toy.png").is_file()


def test_make_backends_kinds_and_errors(exported, tmp_path):
    folder, code, _ = exported
    assert code == 0
    model = build_cnsd(get_config("tiny"), seed=0)
    torch_backends = make_backends("torch", model)
    ort_backends = make_backends("ort", onnx_dir=folder)
    assert list(torch_backends) == list(ort_backends) == list(MODEL_NAMES)
    assert all(isinstance(b, TorchBackend) for b in torch_backends.values())
    assert all(isinstance(b, OrtBackend) for b in ort_backends.values())
    for name in MODEL_NAMES:
        assert torch_backends[name].input_names == ort_backends[name].input_names, name
    with pytest.raises(ValueError, match="expected one of torch, ort, trt"):
        make_backends("onnx", model)
    with pytest.raises(ValueError, match="needs the CNSD model"):
        make_backends("torch")
    with pytest.raises(ValueError, match="--plan-dir DIR"):
        make_backends("trt")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_backends("ort", onnx_dir=tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="clip.onnx"):
        make_backends("ort", onnx_dir=tmp_path / "half")
    feed = {"input_ids": torch.zeros(1, 77, dtype=torch.int64)}   # int64 is cast to the graph's int32
    torch.testing.assert_close(ort_backends["clip"].infer(feed)["last_hidden_state"],
                               torch_backends["clip"].infer(feed)["last_hidden_state"], rtol=1e-4, atol=1e-5)


def test_yolo_export_detect_check_and_build(tmp_path):
    onnx_path = tmp_path / "yolo.onnx"
    code, out, _ = run_main(["yolo", "export", "--size", "n", "--img-size", "160", "--out", onnx_path])
    assert code == 0 and "random weights" in out
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["output0"]
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 3 * (20**2 + 10**2 + 5**2), 14]
    code, out, _ = run_main(["yolo", "detect", "--size", "n", "--img-size", "160", "--onnx", onnx_path,
                             "--conf", "0.05", "--out", tmp_path / "boxes.png"])
    assert code == 0 and "onnxruntime:" in out and read_image(tmp_path / "boxes.png").shape == (600, 512, 3)
    code, out, _ = run_main(["yolo", "check", "--size", "n", "--img-size", "160", "--onnx", onnx_path])
    assert code == 0 and "max abs error" in out and re.search(r"^passed\s+True$", out, re.M)
    if has_module("tensorrt_rtx"):                       # yolo build on the CPU: TensorRT for RTX
        code, out, err = run_main(["yolo", "build", "--size", "n", "--img-size", "160", "--onnx", onnx_path,
                                   "--out", tmp_path / "y.plan", "--tensorrt", "tensorrt_rtx"])
        assert code == 0, err
        assert f"wrote {tmp_path / 'y.plan'}" in out and json.loads((tmp_path / "y.plan.json").read_text())["flavour"] == "tensorrt_rtx"
    elif not has_module("tensorrt"):
        code, _, err = run_main(["yolo", "build", "--onnx", onnx_path, "--out", tmp_path / "y.plan"])
        assert code == EXIT_USAGE and "TensorRT" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_yolo_check_passes_on_its_own_export_at_the_course_settings(tmp_path):
    """YOLOv5s at 1120 (the course's detector): 6e-3 px of rounding on 1000-px boxes is agreement, and
    the detections are compared on boxes that exist even with random weights."""
    onnx_path = tmp_path / "s1120.onnx"
    assert run_main(["yolo", "export", "--size", "s", "--img-size", "1120", "--out", onnx_path])[0] == 0
    code, out, _ = run_main(["yolo", "check", "--size", "s", "--img-size", "1120", "--onnx", onnx_path])
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines() if re.search(r"\s{2,}", line))
    assert code == 0 and rows["passed"] == "True", out
    assert int(rows["matched boxes"]) >= 50 and rows["unmatched reference / candidate"] == "0 / 0"


def test_submit_and_grade_hw3(tmp_path, monkeypatch):
    from course_lib.cnsd.fusion import fuse_qkv
    from course_lib.homework.handin import write_hw3_evidence

    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["submit", "--hw", "3", "--student", "alice", "--seed", "7", "--out", "subs/a.zip"])
    assert code == EXIT_USAGE and "missing" in err and "chapter 4" in err      # no evidence yet: one clear line
    model = build_cnsd(get_config("tiny"), seed=7)
    fuse_qkv(model)
    write_hw3_evidence(model, "homework")
    code, out, _ = run_main(["submit", "--hw", "3", "--student", "alice", "--seed", "7", "--out", "subs/a.zip"])
    assert code == 0 and "[FAILED]" not in out
    code, out, _ = run_main(["grade", "subs", "--out", "results"])
    score, total = out.split("hw 3:")[1].split("(")[0].split("/")
    assert code == 0 and float(score) == float(total) > 0 and (tmp_path / "results" / "summary.csv").is_file()


def test_submit_and_grade_options(tmp_path, monkeypatch, fake_hw2_sweep):
    monkeypatch.chdir(tmp_path)
    fake_hw2_sweep(tmp_path / "homework" / "hw2")
    base = ["submit", "--hw", "2", "--student", "bob", "--seed", "3", "--quiet"]
    code, out, _ = run_main(base + ["--out", "subs/bob.zip"])
    assert code == 1 and "[FAILED] hw2_plans" in out          # no TensorRT here: the sidecars' version disagrees
    assert (tmp_path / "subs" / "bob.zip").is_file()
    code, _, err = run_main(base + ["--max-file-mb", "0.0001", "--out", "subs/small.zip"])
    assert code == EXIT_USAGE and "over the grader's limits" in err and not (tmp_path / "subs" / "small.zip").exists()
    code, _, err = run_main(base + ["--max-members", "10", "--out", "subs/many.zip"])
    assert code == EXIT_USAGE and "15 files in the zip, over the grader's limit of 10" in err
    for args, message in ((["--checkpoint", "x.pth"], "a checkpoint goes with --config sd15"),
                          (["--hw", "3", "--config", "sd15"], "give --checkpoint control_sd15_canny.pth"),
                          (["--max-members", "0"], "--max-members 0: expected a number > 0"),
                          (["--seed", "-1", "--hw", "3", "--config", "sd15", "--checkpoint", "x.pth"],
                           "--seed -1: expected the non-negative integer")):      # before the files, before sd15
        code, _, err = run_main(base + args)
        assert code == EXIT_USAGE and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "points.json").write_text('{"hw2_records": 10}')
    code, out, _ = run_main(["grade", "subs", "--out", "results", "--points", "points.json", "--keep", "--quiet"])
    results = json.loads((tmp_path / "results" / "bob" / "results.json").read_text())
    assert code == 0 and results["max_score"] == 20.0 and "bob                  hw 2:" in out
    assert (tmp_path / "results" / "bob" / "files" / "artifacts" / "hw2.json").is_file()   # --keep
    code, _, err = run_main(["grade", "subs", "--out", "r2", "--max-members", "3", "--quiet"])
    refused = json.loads((tmp_path / "r2" / "bob" / "results.json").read_text())
    assert code == 0 and refused["extra_data"]["refused"] and "members" in refused["output"]
    for points, message in (('{"hw2_records": -1}', "hw2_records = -1, expected a finite number >= 0"),
                            ('[1, 2]', "expected a JSON object"), ("{oops", "not JSON"),
                            ('{"no_such_test": 1}', "no test named 'no_such_test'"),
                            ('{"hw2_records": NaN}', "hw2_records = nan, expected a finite number >= 0"),
                            ('{"hw2_records": Infinity}', "hw2_records = inf, expected a finite number >= 0")):
        (tmp_path / "points.json").write_text(points)
        code, _, err = run_main(["grade", "subs", "--out", "r3", "--points", "points.json"])
        assert code == EXIT_USAGE and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "points.json").write_bytes(b"\xff\xfe{")
    code, _, err = run_main(["grade", "subs", "--out", "r3", "--points", "points.json"])
    assert code == EXIT_USAGE and "--points points.json: not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["grade", "subs", "--out", "r3", "--points", "nope.json"])
    assert code == EXIT_USAGE and err.startswith("error: --points nope.json: no such file or directory; expected")
    code, _, err = run_main(base + ["--hw", "3", "--config", "sd15", "--checkpoint", "nope.pth"])
    assert code == EXIT_USAGE and "homework/hw3/onnx/controlnet.onnx is missing" in err     # before any sd15 loading
    for name in ("onnx/controlnet.onnx", "onnx/controlnet.onnx.json", "onnx/unet.onnx", "onnx/unet.onnx.json",
                 "fused_qkv.safetensors"):                # placeholders: only the file list is checked before loading
        (tmp_path / "homework" / "hw3" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "homework" / "hw3" / name).write_bytes(b"")
    code, _, err = run_main(base + ["--hw", "3", "--config", "sd15", "--checkpoint", "nope.pth"])
    assert code == EXIT_USAGE and "--checkpoint nope.pth: no such file (expected control_sd15_canny.pth" in err
