"""The model repository generator: the course's exports (and plans) -> a folder Triton serves. Chapter 7.

``python -m course_lib serve-repo --onnx-dir DIR --out REPO [--target cpu|gpu] [--plan-dir DIR]``::

    REPO/
      repository.json            what made it: target, sources and their sha256, versions
      clip/config.pbtxt          name, backend, max_batch_size, inputs/outputs, batching, instances
      clip/1/model.onnx          version 1: the exported file (hard-linked, else copied)
      clip/1/model.py            --target cpu only: ONNX Runtime inside a Python-backend model
      controlnet/ unet/ decoder/ the same
      canny2image/config.pbtxt   the pipeline, a Python-backend model (business-logic scripting):
      canny2image/1/model.py     course_lib's Canny2Image calling the four models above through Triton

``--target cpu`` runs on the server PyPI ships (Python backend only). ``--target gpu`` is the layout
for NVIDIA's tritonserver container: the sub-models on its ONNX Runtime backend
(``platform: "onnxruntime_onnx"``) or, with ``--plan-dir``, as TensorRT plans (``tensorrt_plan``), one
instance on GPU 0 each; ``canny2image`` stays a Python model. The tensor names come from the ONNX
files and are checked against the contract (:mod:`course_lib.cnsd.contract`); dims without the batch
axis when the ONNX batch axis is dynamic (then ``max_batch_size`` > 0 and dynamic batching can stack
requests), else the full static shape with ``max_batch_size: 0``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.cnsd.config import get_config
from course_lib.cnsd.contract import MODEL_NAMES, contracts
from course_lib.files import sha256_file

TARGETS = ("cpu", "gpu")
PIPELINE = "canny2image"
MODELS_DIR = Path(__file__).resolve().parent / "models"
# ONNX TensorProto element types -> Triton data types
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                  10: "TYPE_FP16", 11: "TYPE_FP64"}
CONTRACT_TO_TRITON = {"torch.float32": "TYPE_FP32", "torch.int32": "TYPE_INT32"}


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of a ``config.pbtxt``: dims exclude the batch axis when max_batch_size > 0."""
    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None      # what the model sees, when it differs from dims
    optional: bool = False


@dataclass
class ModelConfig:
    """Chapter 7: what one ``config.pbtxt`` says (written by :func:`config_text`)."""
    name: str
    backend: str                                  # "python", "onnxruntime" or "tensorrt"
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    platform: str = ""                            # "onnxruntime_onnx" / "tensorrt_plan" on the container
    dynamic_batching: bool = False
    queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"
    parameters: dict[str, str] = field(default_factory=dict)
    comment: str = ""


def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + (" ]" if dims else "]")


def config_text(cfg: ModelConfig) -> str:
    """Chapter 7: the ``config.pbtxt`` text of a model (protobuf text format, Triton's ModelConfig)."""
    lines = [f"# {line}" for line in cfg.comment.splitlines()] + [f'name: "{cfg.name}"']
    lines.append(f'platform: "{cfg.platform}"' if cfg.platform else f'backend: "{cfg.backend}"')
    lines.append(f"max_batch_size: {cfg.max_batch_size}")
    for key, tensors in (("input", cfg.inputs), ("output", cfg.outputs)):
        lines.append(f"{key} [")
        for i, t in enumerate(tensors):
            lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.data_type}", f"    dims: {_dims(t.dims)}"]
            if t.reshape is not None:
                lines.append(f"    reshape: {{ shape: {_dims(t.reshape)} }}")
            if t.optional:
                lines.append("    optional: true")
            lines.append("  }," if i < len(tensors) - 1 else "  }")
        lines.append("]")
    if cfg.dynamic_batching:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {cfg.queue_delay_us}", "}"]
    gpus = "\n    gpus: [ 0 ]" if cfg.kind == "KIND_GPU" else ""
    lines += ["instance_group [", "  {", f"    count: {cfg.instances}", f"    kind: {cfg.kind}{gpus}", "  }", "]"]
    for key, value in cfg.parameters.items():
        lines.append(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- sub-models

def onnx_io(path: str | Path) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str, tuple]]]:
    """Chapter 7: ``(inputs, outputs)`` of an ONNX file as ``(name, Triton type, dims)``; a dynamic dim
    is its axis name (``"B"``). Reads the graph only, not external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}

    def read(values):
        out = []
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
            out.append((v.name, ONNX_TO_TRITON.get(t.elem_type, f"onnx type {t.elem_type}"), dims))
        return out

    return read(model.graph.input), read(model.graph.output)


def _external_files(path: Path) -> list[str]:
    """The external-data files an ONNX model refers to (they must sit next to it, under the same names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
             for entry in init.external_data if entry.key == "location"}
    return sorted(names)


def image_size(onnx_dir: Path) -> tuple[int | None, int | None]:
    """Chapter 7: the image size (H, W) the exports were made for; None where the axis is dynamic."""
    for name, tensor, which in (("controlnet", "hint", 0), ("decoder", "images", 1)):
        path = onnx_dir / f"{name}.onnx"
        if path.is_file():
            io = dict((n, d) for n, _, d in onnx_io(path)[which])
            if tensor in io:
                h, w = io[tensor][2:4]
                return (h if isinstance(h, int) else None, w if isinstance(w, int) else None)
    raise FileNotFoundError(f"{onnx_dir}: no controlnet.onnx or decoder.onnx to read the image size from "
                            f"(make them with python -m course_lib export)")


def _contract_dims(model: str, name: str, dims: tuple, spec, hw: tuple, where: str) -> tuple:
    """The dims to write for one tensor: the contract's, with -1 for the batch axis and, when the exports
    have a dynamic image size, the spatial axes. A static ONNX dim that disagrees is a ValueError; a
    symbolic one on a fixed axis (exporters leave some on outputs) takes the contract's value."""
    if len(dims) != len(spec.shape):
        raise ValueError(f"{where}: {model} {name} has rank {len(dims)}, the contract says {spec} (rank {len(spec.shape)})")
    out = []
    for d, c, axis in zip(dims, spec.shape, spec.axes):
        if axis == "B":
            if isinstance(d, int) and d != 1:
                raise ValueError(f"{where}: {model} {name} has a static batch of {d}: export with batch 1 or --dynamic B")
            out.append(-1)
        elif axis.split("/")[0] in ("H", "W", "h", "w") and None in hw:
            out.append(-1)
        elif isinstance(d, int) and d != c:
            raise ValueError(f"{where}: {model} {name} has dims {dims}, the contract says {spec}")
        else:
            out.append(c)
    return tuple(out)


def submodel_config(name: str, onnx_path: Path, config: str, hw: tuple, target: str, max_batch_size: int,
                    batching: bool, instances: int, threads: int, plan: bool = False) -> ModelConfig:
    """Chapter 7: the ``config.pbtxt`` of one sub-model, from its ONNX file checked against the contract."""
    h, w = hw
    table = contracts(get_config(config), 1, h or 64, w or 64)[name]
    ins, outs = onnx_io(onnx_path)
    where = str(onnx_path)
    for got, want, kind in ((ins, table.inputs, "inputs"), (outs, table.outputs, "outputs")):
        if sorted(n for n, _, _ in got) != sorted(s.name for s in want):
            raise ValueError(f"{where}: {kind} {[n for n, _, _ in got]}, the contract names {[s.name for s in want]}")
    specs = {s.name: s for s in table.inputs + table.outputs}
    for n, dtype, dims in ins + outs:
        want = CONTRACT_TO_TRITON[str(specs[n].dtype)]
        if dtype != want and not (want == "TYPE_FP32" and dtype == "TYPE_FP16"):   # fp16 I/O: chapter 3
            raise ValueError(f"{where}: {name} {n} is {dtype}, the contract says {want}")
    batched = all(not isinstance(d[0], int) for _, _, d in ins)

    def tensor(n, dtype, onnx_dims):
        dims = _contract_dims(name, n, onnx_dims, specs[n], hw, where)
        if not batched:
            return TensorConfig(n, dtype, (1,) + dims[1:])
        # a (B,) tensor: Triton needs at least one dim per item, so [1] on the wire, reshaped to [] for the model
        return TensorConfig(n, dtype, (1,), reshape=()) if len(dims) == 1 else TensorConfig(n, dtype, dims[1:])

    cfg = ModelConfig(name=name, backend="python", max_batch_size=max_batch_size if batched else 0,
                      inputs=[tensor(*t) for t in ins], outputs=[tensor(*t) for t in outs],
                      dynamic_batching=batching and batched, instances=instances,
                      comment=f"{name}: the CNSD {name} of the course's contract ({config} preset, "
                              f"{'batch axis dynamic' if batched else 'static batch 1'}), from {onnx_path.name}")
    if target == "cpu":
        cfg.parameters = {"intra_op_threads": str(threads)}
        cfg.comment += "\nrun by ONNX Runtime inside a Python-backend model (1/model.py)"
    else:
        cfg.backend, cfg.platform = ("tensorrt", "tensorrt_plan") if plan else ("onnxruntime", "onnxruntime_onnx")
        cfg.kind = "KIND_GPU"
        cfg.comment += "\nNVIDIA's container: " + ("a TensorRT plan (its profile must cover max_batch_size)"
                                                   if plan else "the ONNX Runtime backend")
    return cfg


# --------------------------------------------------------------------------------------- pipeline

def pipeline_config(config: str, vocab: str | None, batched: list[str], target: str, instances: int,
                    threads: int) -> ModelConfig:
    """Chapter 7: the ``canny2image`` model: a photo and a prompt in, images out, the DDIM loop inside."""
    u8, i32, f32 = "TYPE_UINT8", "TYPE_INT32", "TYPE_FP32"
    inputs = [TensorConfig("image", u8, (-1, -1, 3)), TensorConfig("prompt", u8, (-1,))]
    inputs += [TensorConfig(n, u8, (-1,), optional=True) for n in ("a_prompt", "n_prompt")]
    inputs += [TensorConfig(n, i32, (1,), optional=True) for n in
               ("seed", "ddim_steps", "image_resolution", "num_samples", "low_threshold", "high_threshold")]
    inputs += [TensorConfig(n, f32, (1,), optional=True) for n in ("scale", "strength", "eta")]
    return ModelConfig(
        name=PIPELINE, backend="python", max_batch_size=0, inputs=inputs,
        outputs=[TensorConfig("images", u8, (-1, -1, -1, 3))], instances=instances,
        parameters={"config": config, "vocab": vocab or "", "batched_models": ",".join(batched),
                    "threads": str(threads)},
        comment="canny2image: business-logic scripting. One request = one call of Canny2Image.process;\n"
                "its DDIM loop calls clip, controlnet, unet and decoder through Triton (BLS requests).\n"
                "Text goes as UTF-8 bytes (TYPE_UINT8): the bundled server's stub mis-reads TYPE_STRING\n"
                "under numpy 2. Optional inputs take Canny2Image.process's defaults when left out.")


# ---------------------------------------------------------------------------------------- writing

def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)                      # no second copy of a 3.4 GB UNet where the disk allows it
    except OSError:
        shutil.copy2(src, dst)


def write_repository(onnx_dir: str | os.PathLike, out: str | os.PathLike, *, target: str = "cpu",
                     plan_dir: str | os.PathLike | None = None, config: str = "tiny", vocab: str | None = None,
                     max_batch_size: int = 8, batching: bool = True, instances: int = 1,
                     threads: int = 1) -> dict:
    """Chapter 7: write a Triton model repository for the four exports and the canny2image pipeline.

    Args:
        onnx_dir: ``python -m course_lib export``'s folder (clip/controlnet/unet/decoder.onnx).
        out: the repository folder; an existing one is replaced only if this function wrote it.
        target: ``"cpu"`` (Python-backend models on ONNX Runtime, for the bundled server) or ``"gpu"``.
        plan_dir: ``--target gpu`` only: serve ``<name>.plan`` from here as TensorRT plans.
        config: the CNSD preset the exports come from (``tiny`` or ``sd15``), for the contract check.
        max_batch_size: the largest batch dynamic batching may form (ONNX with a dynamic batch axis).
        batching: write ``dynamic_batching`` blocks; instances: model instances per sub-model;
        threads: ONNX Runtime intra-op threads per sub-model (``--target cpu``) and torch threads.

    Returns the ``repository.json`` record. Raises ValueError / FileNotFoundError naming what is wrong.
    """
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {TARGETS}")
    if plan_dir is not None and target != "gpu":
        raise ValueError("--plan-dir needs --target gpu: the bundled server has no TensorRT backend")
    if max_batch_size < 1 or instances < 1 or threads < 1:
        raise ValueError(f"max_batch_size {max_batch_size}, instances {instances}, threads {threads}: expected >= 1")
    onnx_dir, out = Path(onnx_dir), Path(out)
    if not onnx_dir.is_dir():
        raise FileNotFoundError(f"--onnx-dir {onnx_dir}: no such folder (make it with python -m course_lib export)")
    if out.exists() and not (out / "repository.json").is_file():
        raise ValueError(f"--out {out} exists and is not a repository this command wrote: choose a new folder")
    hw = image_size(onnx_dir)
    record = {"target": target, "config": config, "image_size": list(hw), "models": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / "repo"
        batched = []
        for name in MODEL_NAMES:
            onnx_path = onnx_dir / f"{name}.onnx"
            if not onnx_path.is_file():
                raise FileNotFoundError(f"{onnx_path}: missing (python -m course_lib export --out {onnx_dir})")
            plan = Path(plan_dir) / f"{name}.plan" if plan_dir is not None else None
            if plan is not None and not plan.is_file():
                raise FileNotFoundError(f"{plan}: missing (python -m course_lib build --out {plan_dir})")
            cfg = submodel_config(name, onnx_path, config, hw, target, max_batch_size, batching, instances,
                                  threads, plan=plan is not None)
            if cfg.max_batch_size:
                batched.append(name)
            folder = stage / name
            (folder / "1").mkdir(parents=True)
            (folder / "config.pbtxt").write_text(config_text(cfg))
            source = plan or onnx_path
            _link_or_copy(source, folder / "1" / ("model.plan" if plan else "model.onnx"))
            if not plan:
                for extra in _external_files(onnx_path):
                    _link_or_copy(onnx_dir / extra, folder / "1" / extra)
            if target == "cpu":
                shutil.copy2(MODELS_DIR / "ort_model.py", folder / "1" / "model.py")
            record["models"][name] = {"source": str(source.resolve()), "sha256": sha256_file(source),
                                      "max_batch_size": cfg.max_batch_size, "backend": cfg.platform or cfg.backend}
        cfg = pipeline_config(config, vocab, batched, target, 1, threads)
        (stage / PIPELINE / "1").mkdir(parents=True)
        (stage / PIPELINE / "config.pbtxt").write_text(config_text(cfg))
        shutil.copy2(MODELS_DIR / "canny2image_model.py", stage / PIPELINE / "1" / "model.py")
        record["models"][PIPELINE] = {"backend": "python", "max_batch_size": 0}
        (stage / "repository.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    return record
