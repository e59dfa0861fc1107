"""course_lib.cudagraph (chapter 2 §3.4): warm up, capture, replay, keyed by shapes; a failed capture warns once.

On a machine without CUDA the capture really fails (torch.cuda.CUDAGraph can't be made): that path
runs here for real. The key handling runs through ``Recorded``, a CudaGraph whose "capture" records a
plain call (a stand-in for torch.cuda.CUDAGraph, not for CUDA). The CUDA path is marked gpu; the whole
mechanism on a GPU is in tools/pipeline_gpu_check.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from course_lib.cudagraph import CudaGraph, graph_key


class Recorded(CudaGraph):
    """CudaGraph with a capture that records the call instead of the kernels: replay calls fn again on
    the static inputs and writes into the static outputs, as a CUDA graph's replay does."""

    def _capture(self, static):
        outputs = self.fn(*static)

        class Replay:
            def replay(_):                                  # a real replay writes below autograd
                with torch.inference_mode():
                    for out, new in zip(outputs, self.fn(*static)):
                        out.copy_(new)
        return Replay(), outputs


def double(x, y):
    return (x * 2 + y,)


def test_without_cuda_the_capture_fails_once_then_runs_eagerly():
    if torch.cuda.is_available():
        pytest.skip("checks the failed capture on a machine without CUDA")
    graph = CudaGraph(double, "toy")
    x, y = torch.arange(4.0), torch.ones(4)
    assert torch.equal(graph(x, y)[0], double(x, y)[0]) and graph.last_action == "warm-up"
    with pytest.warns(RuntimeWarning, match="toy: CUDA graph capture failed .*running eagerly from now on"):
        out = graph(x + 1, y)
    assert torch.equal(out[0], double(x + 1, y)[0]) and graph.last_action == "eager" and graph.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no second warning
        for k in range(3):
            assert torch.equal(graph(x * k, y)[0], double(x * k, y)[0])
    assert not graph.graphs


def test_host_tensors_are_never_captured():
    """Even on a CUDA machine: CPU work would run once during capture and never on replay."""
    graph = CudaGraph(double, "host", warmup=0)
    with pytest.warns(RuntimeWarning, match=r"host: CUDA graph capture failed \(ValueError: inputs \[0, 1\] are not on"):
        out = graph(torch.ones(2), torch.ones(2))
    assert torch.equal(out[0], torch.full((2,), 3.0)) and graph.failed and not graph.graphs


def test_warm_up_capture_replay_per_key():
    calls = []
    graph = Recorded(lambda x: (calls.append(tuple(x.shape)) or x * 3,), "toy", warmup=2)
    a, b = torch.ones(2), torch.ones(3)
    actions = []
    for x in (a, a, a, a, b, b, b, a):
        out = graph(x)
        actions.append(graph.last_action)
        assert torch.equal(out[0], x * 3)
    assert actions == ["warm-up", "warm-up", "capture", "replay", "warm-up", "warm-up", "capture", "replay"]
    assert len(graph.graphs) == 2 and graph.failed is None


def test_replay_copies_new_inputs_in_and_reuses_its_output_buffers():
    graph = Recorded(double, warmup=0)
    first = graph(torch.zeros(3), torch.ones(3))[0]
    assert graph.last_action == "capture" and torch.equal(first, torch.ones(3))
    second = graph(torch.full((3,), 5.0), torch.ones(3))[0]
    assert graph.last_action == "replay" and second is first          # the graph's own buffer ...
    assert torch.equal(first, torch.full((3,), 11.0))                  # ... overwritten by the replay


def test_keys_are_shapes_dtypes_and_constants():
    x = torch.zeros(2, 3)
    assert graph_key([x, 9.0]) == graph_key([torch.ones(2, 3), 9.0])
    assert graph_key([x]) != graph_key([x.double()]) and graph_key([x, 9.0]) != graph_key([x, 1.0])
    assert graph_key([x], with_addresses=True) != graph_key([x.clone()], with_addresses=True)
    with pytest.raises(ValueError, match="input 1: a list"):
        graph_key([x, [1.0]])


def test_inputs_as_buffers_key_on_addresses_and_are_not_copied():
    seen = []
    graph = Recorded(lambda buf: (seen.append(buf) or buf + 1,), copy_inputs=False, warmup=0)
    buffer = torch.zeros(2)
    graph(buffer)
    assert seen[-1] is buffer                                           # captured on the caller's buffer
    graph(buffer)
    assert graph.last_action == "replay"
    graph(torch.zeros(2))                                               # same shape, another address
    assert graph.last_action == "capture" and len(graph.graphs) == 2


def test_static_buffers_refill_in_and_out_of_inference_mode():
    graph = Recorded(double, warmup=0)
    with torch.inference_mode():
        graph(torch.ones(2), torch.ones(2))
    out = graph(torch.zeros(2), torch.ones(2))[0]                      # outside inference mode now
    assert torch.equal(out, torch.ones(2))
    graph.reset()
    assert not graph.graphs and graph.last_action is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_module_on_cuda_matches_eager():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).cuda()
    graph = CudaGraph(module, "mlp")
    with torch.no_grad():
        for want in ("warm-up", "capture", "replay", "replay"):
            x = torch.randn(4, 16, device="cuda")
            assert torch.allclose(graph(x), module(x), atol=1e-6) and graph.last_action == want
