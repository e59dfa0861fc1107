"""The CUDA graph capture/re-capture rule (chapter 3): the state machine on CPU, the glue on a GPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from course_lib.env import has_module
from course_lib.trt.cudagraph import CudaGraphRunner, GraphAction, GraphPolicy, GraphState, TorchGraphed

A, B = (("x", (1, 4), 1000),), (("x", (2, 4), 2000),)  # keys: (name, shape, address) per tensor


def _step(policy: GraphPolicy, key, use_graph=True) -> GraphAction:
    """What a runner does: decide, then report the outcome (captures succeed here)."""
    action = policy.decide(key, use_graph)
    if action in (GraphAction.EAGER, GraphAction.FALLBACK):
        policy.ran_eagerly(key)
    elif action in (GraphAction.CAPTURE, GraphAction.RECAPTURE):
        policy.captured(key)
    return action


def test_warm_up_then_capture_then_replay():
    policy = GraphPolicy()
    assert policy.state is GraphState.NO_GRAPH
    assert policy.decide(A, True) is GraphAction.EAGER
    assert policy.state is GraphState.WARMUP_NEEDED
    policy.ran_eagerly(A)
    assert [_step(policy, A) for _ in range(3)] == [GraphAction.CAPTURE, GraphAction.REPLAY, GraphAction.REPLAY]
    assert policy.state is GraphState.CAPTURED


def test_new_shapes_or_addresses_mean_warm_up_and_recapture():
    policy = GraphPolicy()
    seq = [_step(policy, k) for k in (A, A, A, B, B, B, A, A)]
    E, C, R, RC = GraphAction.EAGER, GraphAction.CAPTURE, GraphAction.REPLAY, GraphAction.RECAPTURE
    assert seq == [E, C, R, E, RC, R, E, RC]
    assert policy.decide(B, True) is GraphAction.EAGER
    assert policy.state is GraphState.WARMUP_NEEDED  # the graph is for A
    policy.ran_eagerly(B)
    assert policy.state is GraphState.NO_GRAPH and policy.decide(B, True) is GraphAction.RECAPTURE


def test_graphs_off_runs_eagerly_and_keeps_the_graph():
    policy = GraphPolicy()
    for key in (A, A):
        _step(policy, key)
    assert _step(policy, A, use_graph=False) is GraphAction.EAGER
    assert policy.state is GraphState.CAPTURED
    assert _step(policy, A) is GraphAction.REPLAY


def test_an_ordinary_run_counts_as_warm_up():
    policy = GraphPolicy()
    _step(policy, A, use_graph=False)
    assert policy.state is GraphState.NO_GRAPH
    assert _step(policy, A) is GraphAction.CAPTURE


def test_failure_falls_back_for_good_until_reset():
    policy = GraphPolicy()
    _step(policy, A)
    assert policy.decide(A, True) is GraphAction.CAPTURE
    message = policy.capture_failed("cudaErrorStreamCaptureUnsupported")
    assert "cudaErrorStreamCaptureUnsupported" in message and "without a graph" in message
    assert policy.state is GraphState.FAILED
    assert [_step(policy, k) for k in (A, B, A)] == [GraphAction.FALLBACK] * 3
    assert _step(policy, A, use_graph=False) is GraphAction.EAGER
    policy.reset()
    assert policy.state is GraphState.WARMUP_NEEDED and _step(policy, A) is GraphAction.EAGER
    assert _step(policy, A) is GraphAction.CAPTURE


needs_cuda_python = pytest.mark.skipif(not (torch.cuda.is_available() and has_module("cuda")),
                                       reason="needs a CUDA GPU and cuda-python (cuda.bindings)")


@pytest.mark.gpu
@needs_cuda_python
def test_runner_captures_and_replays_real_kernels():
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)

    def enqueue(handle: int) -> None:  # in-place work only: nothing is allocated while capturing
        with torch.cuda.stream(torch.cuda.ExternalStream(handle)):
            torch.mul(x, 2, out=y)
            y.add_(1)

    runner, stream = CudaGraphRunner("toy"), torch.cuda.Stream()
    key = (("x", tuple(x.shape), x.data_ptr()),)
    actions = []
    for step in range(4):
        with torch.cuda.stream(stream):
            x.fill_(step)
            actions.append(runner.run(enqueue, key, stream, use_graph=True))
        stream.synchronize()
        assert torch.equal(y, torch.full_like(x, 2 * step + 1)), (step, actions)
    assert actions == [GraphAction.EAGER, GraphAction.CAPTURE, GraphAction.REPLAY, GraphAction.REPLAY]
    runner.release()


@pytest.mark.gpu
@needs_cuda_python
def test_runner_falls_back_with_a_warning_when_capture_fails():
    x = torch.ones(4, device="cuda")

    def enqueue(handle: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(handle)):
            x.add_(1)
            torch.cuda.synchronize()  # not allowed while capturing: the capture fails

    runner, stream = CudaGraphRunner("toy"), torch.cuda.Stream()
    key = (("x", (4,), x.data_ptr()),)
    with torch.cuda.stream(stream):
        assert runner.run(enqueue, key, stream, use_graph=True) is GraphAction.EAGER
        with pytest.warns(UserWarning, match="capture failed"):
            assert runner.run(enqueue, key, stream, use_graph=True) is GraphAction.FALLBACK
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert runner.run(enqueue, key, stream, use_graph=True) is GraphAction.FALLBACK
    stream.synchronize()
    assert runner.policy.state is GraphState.FAILED
    assert torch.equal(x, torch.full_like(x, 4.0))  # three eager runs added 1 each


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_graphed_module_matches_eager():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).cuda()
    graphed = TorchGraphed(module, torch.randn(4, 16, device="cuda"))
    for _ in range(3):
        x = torch.randn(4, 16, device="cuda")
        with torch.no_grad():
            assert torch.allclose(graphed(x), module(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"input 0: expected \(4, 16\)"):
        graphed(torch.randn(2, 16, device="cuda"))
