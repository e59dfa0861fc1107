"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests run the tiny models on one thread: the fast setting on a busy 2-core CI box
    (course_lib.threads explains why PyTorch's default collapses there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEST_GPU = {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "86", "driver": "580.65"}


def _fake_hw2_sweep(folder, tensorrt="10.8.0.43", gpu=TEST_GPU["name"], graph_factor=0.8, n=12):
    """What hw2_sweep writes into ``folder`` (records with raw samples, a plan sidecar per engine and level),
    as test data: no TensorRT or GPU needed. The plans themselves are not written."""
    from course_lib.files import write_json
    from course_lib.timing import summarize
    from course_lib.homework import MODELS
    from course_lib.trt.plan import PlanSidecar, write_sidecar

    records = []
    for i, model in enumerate(MODELS):
        for level in (0, 3, 5):
            for graph in (False, True):
                base = (10.0 + i) * (1.0 - 0.02 * level) * (graph_factor if graph else 1.0)
                raw = [base + 0.05 * ((k * 7) % 5) for k in range(n)]
                records.append({"model": model, "opt_level": level, "cuda_graph": graph, "build_s": 3.0,
                                "plan_mib": 12.0, "latency": summarize(raw)})
            write_sidecar(folder / f"O{level}" / f"{model}.plan", PlanSidecar(
                plan=f"{model}.plan", tensorrt=tensorrt, gpu=gpu, compute_capability="86",
                profiles=[], precision="as in the ONNX (fp16)", builder_optimization_level=level, workspace_gib=10.0,
                strongly_typed=True, build_seconds=3.0, built_at="2025-01-01T00:00:00", onnx_path=f"onnx/{model}.onnx",
                onnx_sha256="0" * 64))
    write_json(folder / "hw2.json", records)
    return folder


@pytest.fixture(scope="session")
def fake_hw2_sweep():
    """A function writing hw2_sweep's output into a folder (see :func:`_fake_hw2_sweep`); returns the folder."""
    return _fake_hw2_sweep


def pytest_terminal_summary(terminalreporter):
    """Say how many real TensorRT plans this session built (tests/test_trt_builds.py and others)."""
    import sys

    build = sys.modules.get("course_lib.trt.build")
    plans = build.built_plans() if build is not None else []
    flavours = ", ".join(sorted({p["tensorrt"] for p in plans})) or "no TensorRT builder ran"
    seconds = sum(p["seconds"] for p in plans)
    terminalreporter.write_sep("-", "TensorRT builds")
    terminalreporter.write_line(f"TensorRT plans built by this test session: {len(plans)} ({flavours}; "
                                f"{seconds:.0f} s in build_serialized_network)")


# the tiny CNSD (seeded, non-zero) and a 64x64 photo with one round shape: shared by the pipeline-strategy
# tests (test_eps, test_speedups, test_hopper, test_loopgraph); module scope, so a test module that changes
# its model (attention backend, fp16 copies) does not reach another module
@pytest.fixture(scope="module")
def cnsd():
    from course_lib.cnsd import build_cnsd, get_config

    return build_cnsd(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def photo():
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 3, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    img[(yy - 28) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (240, 200, 40)
    return img
