"""Chapter 7: the Triton repository generator, a real tritonserver on 127.0.0.1, the client, the faults.

The server tests start the tritonserver that ``python -m course_lib serve-install`` unpacked (CI runs
that command in its set-up). Where it is missing they skip, except under CI or COURSE_REQUIRE=triton,
where they fail. Every server is started by a fixture and stopped in its ``finally`` (process group
killed, shared memory removed), also when a test fails.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient", reason="chapter 7 needs tritonclient: pip install -e '.[serve]'")

from course_lib.backends import OrtBackend, make_backends                                   # noqa: E402
from course_lib.cnsd import build_cnsd, get_config                                          # noqa: E402
from course_lib.cnsd.contract import MODEL_NAMES, contracts, example_inputs                 # noqa: E402
from course_lib.cnsd.tokenizer import byte_level_tokenizer                                  # noqa: E402
from course_lib.onnx.export_cnsd import export_cnsd                                         # noqa: E402
from course_lib.pipeline.canny2image import Canny2Image                                     # noqa: E402
from course_lib.samples import sample_photo                                                 # noqa: E402
from course_lib.serve.client import infer, request_canny2image, wire_feed                   # noqa: E402
from course_lib.serve.install import find_tritonserver                                      # noqa: E402
from course_lib.serve.loadtest import contract_feed, load_test                              # noqa: E402
from course_lib.serve.model_config import check_repository, parse_config                    # noqa: E402
from course_lib.serve.repository import write_repository                                    # noqa: E402
from course_lib.serve.server import ServeError, TritonServer, free_ports                    # noqa: E402

SIZE = 64                         # image side: the tiny preset at 64x64 keeps each request in milliseconds


def _need_server():
    if find_tritonserver() is not None:
        return
    demanded = os.environ.get("CI") or "triton" in os.environ.get("COURSE_REQUIRE", "")
    message = "tritonserver is not unpacked: python -m course_lib serve-install"
    if demanded:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_cnsd(build_cnsd(get_config("tiny"), seed=0), out, height=SIZE, width=SIZE, dynamic=["B"], progress=False)
    return out


@pytest.fixture(scope="module")
def repo(onnx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "cpu"
    write_repository(onnx_dir, out, target="cpu")
    return out


@pytest.fixture(scope="module")
def server(repo):
    _need_server()
    srv = TritonServer(repo)
    try:
        yield srv.start()
    finally:
        srv.stop()
        assert srv.process is None or srv.process.poll() is not None


# ------------------------------------------------------------------------------ the generator

def test_both_targets_parse_and_match_the_contract(onnx_dir, repo, tmp_path):
    rows = {r["model"]: r for r in check_repository(repo)}
    assert rows["unet"]["backend"] == "python" and rows["unet"]["max_batch_size"] == 8
    assert rows["unet"]["dynamic_batching"] and rows["canny2image"]["max_batch_size"] == 0
    gpu = tmp_path / "gpu"
    write_repository(onnx_dir, gpu, target="gpu")
    rows = {r["model"]: r for r in check_repository(gpu)}
    assert [rows[n]["backend"] for n in MODEL_NAMES] == ["onnxruntime_onnx"] * 4
    assert rows["controlnet"]["instances"] == "1xGPU" and not (gpu / "unet" / "1" / "model.py").exists()
    cfg = parse_config(gpu / "unet" / "config.pbtxt")
    table = contracts(get_config("tiny"), 1, SIZE, SIZE)["unet"]
    assert [t.name for t in cfg.input] == table.input_names
    assert list(cfg.input[0].dims) == list(table.inputs[0].shape[1:])            # batch axis left out
    assert list(cfg.input[1].dims) == [1] and list(cfg.input[1].reshape.shape) == []   # timestep (B,)


def test_plans_give_tensorrt_models_structurally(onnx_dir, tmp_path):
    plans = tmp_path / "plans"                # placeholder bytes: the layout is checked, nothing runs them
    plans.mkdir()
    for name in MODEL_NAMES:
        (plans / f"{name}.plan").write_bytes(b"not a real plan")
    write_repository(onnx_dir, tmp_path / "trt", target="gpu", plan_dir=plans)
    rows = check_repository(tmp_path / "trt")
    assert [r["backend"] for r in rows[:4]] == ["tensorrt_plan"] * 4
    with pytest.raises(ValueError, match="--target gpu"):
        write_repository(onnx_dir, tmp_path / "x", target="cpu", plan_dir=plans)


def test_bad_configs_and_mismatches_are_one_clear_error(onnx_dir, repo, tmp_path):
    with pytest.raises(ValueError, match="not a valid Triton model config"):
        parse_config('name: "unet"\nmax_batch_sise: 8\n')
    with pytest.raises(ValueError, match="the contract"):            # sd15 widths against tiny exports
        write_repository(onnx_dir, tmp_path / "sd15", config="sd15")
    with pytest.raises(ValueError, match="not a repository this command wrote"):
        write_repository(onnx_dir, onnx_dir)
    broken = tmp_path / "broken"
    write_repository(onnx_dir, broken)
    text = (broken / "unet" / "config.pbtxt").read_text().replace("dims: [ 4, 8, 8 ]", "dims: [ 4, 8, 9 ]", 1)
    (broken / "unet" / "config.pbtxt").write_text(text)
    with pytest.raises(ValueError, match="x_noisy has dims"):
        check_repository(broken)


# ------------------------------------------------------------------------------ a real server

@pytest.mark.parametrize("model", ["unet", "controlnet"])
def test_http_and_grpc_answer_like_onnxruntime(server, onnx_dir, model):
    feed = example_inputs(contracts(get_config("tiny"), 2, SIZE, SIZE)[model], seed=3)      # batch 2
    want = OrtBackend(onnx_dir / f"{model}.onnx").infer(feed)
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        got = infer(url, model, wire_feed(feed), protocol=protocol)
        assert sorted(got) == sorted(want)
        assert all(np.array_equal(got[n], want[n].numpy()) for n in want), protocol


def test_served_canny2image_equals_the_ort_pipeline(server, onnx_dir):
    photo = sample_photo(size=(SIZE, SIZE))
    served = request_canny2image(server.grpc_url, photo, "a bird", protocol="grpc", ddim_steps=4,
                                 image_resolution=SIZE, seed=7)
    pipe = Canny2Image(make_backends("ort", onnx_dir=onnx_dir), byte_level_tokenizer(), get_config("tiny"),
                       progress=False)
    local = pipe.process(photo, "a bird", ddim_steps=4, image_resolution=SIZE, seed=7)
    assert served.shape == (1, SIZE, SIZE, 3) and np.array_equal(served[0], local[0])


def test_bad_requests_get_tritons_error_as_one_line(server):
    feed = contract_feed(server.repo, "unet")
    cases = {"unexpected inference input 'x_noisy_typo'": {**{k: v for k, v in feed.items() if k != "x_noisy"},
                                                           "x_noisy_typo": feed["x_noisy"]},
             "unexpected shape for input 'x_noisy'": {**feed, "x_noisy": feed["x_noisy"][:, :, :4]},
             "data-type is 'FP64'": {**feed, "x_noisy": feed["x_noisy"].astype(np.float64)}}
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        for expected, bad in cases.items():
            with pytest.raises(ServeError, match=expected) as e:
                infer(url, "unet", bad, protocol=protocol)
            assert "\n" not in str(e.value) and str(e.value).startswith("server (")
    with pytest.raises(ServeError, match="canny2image: .*64"):       # the pipeline's own ValueError
        request_canny2image(server.http_url, np.zeros((SIZE, SIZE, 3), np.uint8), "x", image_resolution=50)


def test_no_server_and_a_taken_port_are_one_line(repo, capsys):
    _need_server()
    port = free_ports(1)[0]
    for protocol in ("http", "grpc"):
        with pytest.raises(ServeError, match=f"no Triton server answers at 127.0.0.1:{port}"):
            infer(f"127.0.0.1:{port}", "unet", {"x": np.zeros(1, np.float32)}, protocol=protocol, timeout=5)
    from course_lib.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", "--repo", str(repo), "--http-port", str(taken.getsockname()[1]), "--for", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is taken" in err[0]


def test_killed_mid_request_fails_cleanly_and_the_next_start_works(repo):
    _need_server()
    feed = contract_feed(repo, "unet")
    srv = TritonServer(repo, models=["unet"])
    try:
        srv.start()
        bounded = load_test(srv, "unet", feed, concurrency=2, requests=10**6, time_limit=1.0)
        assert bounded.seconds < 5 and 0 < bounded.completed < 10**6 and bounded.errors == 0
        assert bounded.inferences == bounded.completed and 0 < bounded.executions <= bounded.inferences
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=load_test(srv, "unet", feed, 4, 10**6, 20.0)))
        thread.start()
        time.sleep(0.5)
        srv.kill()                                          # SIGKILL the server and its stubs mid-run
        thread.join(30)
        run = result["r"]
        assert not thread.is_alive() and run.seconds < 5 and run.errors >= 1
        assert "closed the connection" in run.first_error or "no Triton server" in run.first_error
        with pytest.raises(ServeError, match="no Triton server answers"):
            infer(srv.http_url, "unet", feed, timeout=5)
    finally:
        srv.stop()
    prefix = srv._shm_prefix
    assert not list(Path("/dev/shm").glob(f"{prefix}*")), "shared memory left behind"
    with TritonServer(repo, models=["unet"]) as again:              # the next start works
        out = infer(again.http_url, "unet", feed)
        assert out["latent"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert again.process.poll() is not None


def test_the_server_stops_when_the_code_inside_fails(repo):
    _need_server()
    with pytest.raises(RuntimeError, match="boom"):
        with TritonServer(repo, models=["clip"]) as srv:
            assert srv.live() and srv.ready() and srv.model_ready("clip")
            raise RuntimeError("boom")
    assert srv.process.poll() is not None and not srv.live()
    with pytest.raises(ServeError, match="no such model|unknown model|not found|failed"):
        TritonServer(repo, models=["nosuchmodel"], startup_timeout=30).start()


def test_cli_serve_repo_and_request_without_server(onnx_dir, tmp_path, capsys):
    from course_lib.cli import main

    assert main(["serve-repo", "--onnx-dir", str(onnx_dir), "--out", str(tmp_path / "r"), "--target", "gpu"]) == 0
    assert "parsed and checked" in capsys.readouterr().out
    port = free_ports(1)[0]
    code = main(["request", "--url", f"127.0.0.1:{port}", "--image", str(tmp_path / "missing.png"), "--out",
                 str(tmp_path / "o.png")])
    assert code == 2 and "no such file" in capsys.readouterr().err
    assert main(["request", "--repo", str(tmp_path / "r"), "--out", str(tmp_path / "o.png")]) == 2
    assert "no server is running" in capsys.readouterr().err
