"""course_lib.backends: the Backend protocol, TorchBackend, OrtBackend, TrtBackend (chapter 2), GraphedBackend (3)."""
import sys
import warnings

import numpy as np
import pytest
import torch

from course_lib.backends import Backend, GraphedBackend, OrtBackend, TorchBackend, TrtBackend, check_feed
from course_lib.onnx.session import default_providers
from course_lib.cnsd.contract import ModelContract, TensorSpec
from course_lib.env import MissingDependency, detect, has_module


class Tiny(torch.nn.Module):
    """Two inputs (float x, int32 timestep), two outputs, like a miniature ControlNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        y = self.proj(x) + timestep.to(x.dtype)[:, None] * 0.01
        return y, y.sum(dim=1)


CONTRACT = ModelContract(
    "tiny",
    (TensorSpec("x", (2, 8), torch.float32, ("B", "C")), TensorSpec("timestep", (2,), torch.int32, ("B",))),
    (TensorSpec("y", (2, 8), torch.float32, ("B", "C")), TensorSpec("total", (2,), torch.float32, ("B",))),
)


def feed():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 8, generator=g), "timestep": torch.tensor([951, 1], dtype=torch.int32)}


def expected():
    with torch.no_grad():
        return Tiny()(*feed().values())


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Tiny().eval(), tuple(feed().values()), str(path), input_names=["x", "timestep"],
                          output_names=["y", "total"], dynamic_axes={"x": {0: "B"}, "timestep": {0: "B"}},
                          opset_version=18, dynamo=False)
    return path


def test_check_feed_names_missing_and_unknown():
    check_feed("tiny", feed(), ["x", "timestep"])
    with pytest.raises(ValueError, match=r"tiny: feed missing \['timestep'\]; expected inputs \['x', 'timestep'\]"):
        check_feed("tiny", {"x": feed()["x"]}, ["x", "timestep"])
    with pytest.raises(ValueError, match=r"unknown \['t'\]"):
        check_feed("tiny", {**feed(), "t": torch.zeros(1)}, ["x", "timestep"])


def test_torch_backend_runs_the_contract():
    backend = TorchBackend(Tiny(), CONTRACT)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.input_names, backend.output_names) == ("tiny", ["x", "timestep"], ["y", "total"])
    out = backend.infer(feed())
    assert list(out) == ["y", "total"]
    torch.testing.assert_close(out["y"], expected()[0])
    torch.testing.assert_close(out["total"], expected()[1])
    # an int64 timestep is cast to the contract's int32; the results do not change
    out64 = backend.infer({**feed(), "timestep": feed()["timestep"].long()})
    assert torch.equal(out64["y"], out["y"])
    with pytest.raises(ValueError, match="missing"):
        backend.infer({"x": feed()["x"]})


def test_torch_backend_casts_to_the_module_dtype_and_back():
    backend = TorchBackend(Tiny().double(), CONTRACT)
    assert backend.dtype == torch.float64
    out = backend.infer(feed())
    assert out["y"].dtype == torch.float32
    torch.testing.assert_close(out["y"], expected()[0], rtol=1e-5, atol=1e-6)


def test_torch_backend_output_count_must_match():
    contract = ModelContract("tiny", CONTRACT.inputs, CONTRACT.outputs[:1])
    with pytest.raises(ValueError, match="returned 2 outputs"):
        TorchBackend(Tiny(), contract).infer(feed())


def test_graphed_backend_keeps_the_results_and_its_outputs():
    backend = GraphedBackend(TorchBackend(Tiny(), CONTRACT))
    assert isinstance(backend, Backend) and backend.input_names == ["x", "timestep"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [backend.infer({**feed(), "x": feed()["x"] + k}) for k in range(3)]
    if not torch.cuda.is_available():          # CPU tensors: the capture fails once, then eager
        assert [str(w.message).split(":")[0] for w in caught] == ["tiny graph"] and backend.graph.failed
    torch.testing.assert_close(outs[0]["y"], expected()[0])
    assert not torch.equal(outs[0]["y"], outs[1]["y"])                  # kept outputs are copies
    with pytest.raises(ValueError, match="missing"):
        backend.infer({"x": feed()["x"]})


def test_ort_backend_matches_torch(onnx_path):
    backend = OrtBackend(onnx_path)
    assert isinstance(backend, Backend)
    assert backend.name == "tiny" and backend.providers == default_providers()
    assert backend.input_names == ["x", "timestep"] and backend.output_names == ["y", "total"]
    out = backend.infer(feed())
    assert out["y"].dtype == torch.float32 and out["y"].device.type == "cpu"
    torch.testing.assert_close(out["y"], expected()[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["total"], expected()[1], rtol=1e-5, atol=1e-5)
    # int64 in the feed becomes the graph's int32; batch 1 works through the dynamic axis
    one = backend.infer({"x": feed()["x"][:1], "timestep": torch.tensor([951])})
    torch.testing.assert_close(one["y"], expected()[0][:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown \['hint'\]"):
        backend.infer({**feed(), "hint": torch.zeros(1)})


def test_ort_backend_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OrtBackend(tmp_path / "nope.onnx")


def test_default_providers_end_with_a_usable_one():
    import onnxruntime as ort

    providers = default_providers()
    assert providers and set(providers) <= set(ort.get_available_providers())
    assert "TensorrtExecutionProvider" not in providers


def test_trt_backend_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):      # None in sys.modules: the import fails, as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency, match="neither tensorrt nor tensorrt_rtx is installed.*install"):
        TrtBackend(tmp_path / "unet.plan")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_gpu_returns_on_the_feed_device():
    backend = TorchBackend(Tiny().cuda(), CONTRACT)
    out = backend.infer(feed())
    assert out["y"].device.type == "cpu"
    torch.testing.assert_close(out["y"], expected()[0], rtol=1e-4, atol=1e-5)
    out_gpu = backend.infer({k: v.cuda() for k, v in feed().items()})
    assert out_gpu["y"].device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in detect().ort_providers, reason="needs onnxruntime-gpu with CUDA")
def test_ort_backend_on_cuda_provider(onnx_path):
    backend = OrtBackend(onnx_path, providers=["CUDAExecutionProvider"])
    out = backend.infer({k: v.cuda() for k, v in feed().items()})
    assert out["y"].device.type == "cuda"
    np.testing.assert_allclose(out["y"].cpu().numpy(), expected()[0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not (has_module("tensorrt") and torch.cuda.is_available()),
                    reason="needs the tensorrt package and a CUDA GPU")
def test_trt_backend_matches_ort_and_keeps_its_outputs(onnx_path, tmp_path):
    from course_lib.trt import build_engine_plan, static_profile

    plan = tmp_path / "tiny.plan"
    build_engine_plan(onnx_path, plan, static_profile({"x": (2, 8), "timestep": (2,)}), workspace_gib=1,
                      progress=False)
    backend = TrtBackend(plan)
    assert isinstance(backend, Backend)
    assert backend.input_names == ["x", "timestep"] and backend.output_names == ["y", "total"]
    first = backend.infer(feed())                      # CPU feed, int32 timestep
    assert first["y"].device.type == "cuda" and first["y"].dtype == torch.float32
    torch.testing.assert_close(first["y"].cpu(), expected()[0], rtol=1e-3, atol=1e-4)
    kept = first["y"].clone()
    backend.infer({"x": feed()["x"] + 1, "timestep": feed()["timestep"]})
    assert torch.equal(first["y"], kept)               # outputs are copies, not the engine's buffers
    with pytest.raises(ValueError, match="missing"):
        backend.infer({"x": feed()["x"]})
