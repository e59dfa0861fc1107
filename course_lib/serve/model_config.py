"""Read ``config.pbtxt`` files with Triton's own schema and check a repository against the contract.

Chapter 7. :func:`parse_config` parses the protobuf text format into Triton's ``ModelConfig`` message
(the ``model_config_pb2`` that ``tritonclient[grpc]`` ships, the server's own .proto): a misspelled field,
an unknown enum or a stray brace is a ValueError with the line and column, as the server would reject
it. :func:`check_repository` then compares every model with the course's contract
(:mod:`course_lib.cnsd.contract`): names, data types, dims, batching -- without starting a server.
"""
from __future__ import annotations

import json
from pathlib import Path

from course_lib.cnsd.config import get_config
from course_lib.cnsd.contract import MODEL_NAMES, contracts
from course_lib.env import MissingDependency

PIPELINE = "canny2image"
MODEL_FILES = {"python": "model.py", "onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
PIPELINE_IO = ({"image": "TYPE_UINT8", "prompt": "TYPE_UINT8"}, {"images": "TYPE_UINT8"})


def _schema():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise MissingDependency("reading config.pbtxt needs tritonclient[grpc]: "
                                "python -m pip install -e \".[serve]\"") from e
    return text_format, model_config_pb2


def parse_config(source: str | Path):
    """Chapter 7: a ``config.pbtxt`` (path or text) as Triton's ``ModelConfig`` protobuf message."""
    text_format, pb2 = _schema()
    path = Path(source) if not isinstance(source, str) or "\n" not in source else None
    text = path.read_text() if path is not None else source
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"{path or 'config.pbtxt'}: not a valid Triton model config: {e}") from None


def type_name(data_type: int) -> str:
    """``TYPE_FP32`` for the enum value of a DataType."""
    return _schema()[1].DataType.Name(data_type)


def _kind(cfg) -> str:
    return cfg.platform or cfg.backend


def summarize(cfg) -> dict:
    """Chapter 7: one row about a parsed config: backend, batching, instances, inputs and outputs."""
    _, pb2 = _schema()
    groups = [f"{g.count}x{pb2.ModelInstanceGroup.Kind.Name(g.kind).removeprefix('KIND_')}" for g in cfg.instance_group]
    return {"model": cfg.name, "backend": _kind(cfg), "max_batch_size": cfg.max_batch_size,
            "dynamic_batching": cfg.HasField("dynamic_batching"), "instances": ",".join(groups) or "default",
            "inputs": len(cfg.input), "outputs": len(cfg.output)}


def _check_tensors(where: str, tensors, specs, batched: bool, hw: tuple, kind: str) -> None:
    got = {t.name: t for t in tensors}
    if sorted(got) != sorted(s.name for s in specs):
        raise ValueError(f"{where}: {kind} {sorted(got)}, the contract names {sorted(s.name for s in specs)}")
    for spec in specs:
        t = got[spec.name]
        want_type = {"torch.float32": "TYPE_FP32", "torch.int32": "TYPE_INT32"}[str(spec.dtype)]
        if type_name(t.data_type) not in (want_type, "TYPE_FP16" if want_type == "TYPE_FP32" else want_type):
            raise ValueError(f"{where}: {spec.name} is {type_name(t.data_type)}, the contract says {want_type}")
        dims = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
        shape = spec.shape[1:] if batched else spec.shape
        axes = spec.axes[1:] if batched else spec.axes
        want = tuple(-1 if a.split("/")[0] in ("H", "W", "h", "w") and None in hw else d for d, a in zip(shape, axes))
        if dims != want:
            raise ValueError(f"{where}: {spec.name} has dims {list(dims)}, the contract says {list(want)} "
                             f"({'without' if batched else 'with'} the batch axis)")


def check_repository(repo: str | Path) -> list[dict]:
    """Chapter 7: parse every model of a generated repository and check it; returns one row per model.

    Raises ValueError naming the model and what differs (a file missing, a name, a type, a dim).
    """
    repo = Path(repo)
    record_path = repo / "repository.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: missing; write the repository with python -m course_lib serve-repo")
    record = json.loads(record_path.read_text())
    hw = tuple(record["image_size"])
    table = contracts(get_config(record["config"]), 1, hw[0] or 64, hw[1] or 64)
    rows = []
    for name in (*MODEL_NAMES, PIPELINE):
        where = repo / name / "config.pbtxt"
        if not where.is_file():
            raise FileNotFoundError(f"{where}: missing")
        cfg = parse_config(where)
        if cfg.name != name:
            raise ValueError(f"{where}: name {cfg.name!r} differs from its folder {name!r}")
        model_file = repo / name / "1" / MODEL_FILES.get(_kind(cfg), "?")
        if not model_file.is_file():
            raise ValueError(f"{where}: backend {_kind(cfg)!r} needs {model_file}, which is missing")
        if name == PIPELINE:
            for tensors, want, kind in ((cfg.input, PIPELINE_IO[0], "input"), (cfg.output, PIPELINE_IO[1], "output")):
                have = {t.name: type_name(t.data_type) for t in tensors}
                if any(have.get(n) != t for n, t in want.items()):
                    raise ValueError(f"{where}: expected {kind}s {want}, found {have}")
        else:
            batched = cfg.max_batch_size > 0
            _check_tensors(str(where), cfg.input, table[name].inputs, batched, hw, "inputs")
            _check_tensors(str(where), cfg.output, table[name].outputs, batched, hw, "outputs")
            if cfg.HasField("dynamic_batching") and not batched:
                raise ValueError(f"{where}: dynamic_batching needs max_batch_size > 0")
        rows.append(summarize(cfg))
    return rows
