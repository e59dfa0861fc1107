"""FP16 ONNX: convert an exported FP32 model to FP16, keeping the numerically fragile ops in FP32.

Chapter 3 introduces this module (INT8, chapter 5, lives elsewhere). Since TensorRT 11 an engine's
precision comes from the ONNX itself (strong typing): an FP16 engine is built from an FP16 ONNX.
:func:`to_fp16_onnx` writes that ONNX; :func:`precision_report` shows what runs in which precision.

Which ops stay FP32 (:data:`KEEP_FP32_OPS`), judged on what torch's exporter (``dynamo=False``,
opset 18) writes for the course's models:

* ``LayerNormalization`` -- every LayerNorm (CLIP; norm1/2/3 of each transformer block) is one op at
  opset >= 17. Its variance averages (x - mean)^2, which passes FP16's 65504 once x strays 256 from
  its mean (see ``course_lib.precision.ranges``, the ``norm x^2`` points).
* ``InstanceNormalization`` -- torch writes GroupNorm as Reshape(B, G, -1) -> InstanceNormalization
  (scale 1, bias 0) -> Reshape -> Mul(gamma) -> Add(beta); same statistics, same risk (the original
  code computes GroupNorm in FP32 for this reason: ``GroupNorm32``).
* ``GroupNormalization`` -- what newer exporters (dynamo, opset 21) write for GroupNorm instead.
* ``Softmax`` -- the attention probabilities: exp() overflows FP16 above 11, the row sums lose digits
  (the original runs softmax in FP32). The score MatMul before it stays FP16.
* ``Sin``, ``Cos`` and the nodes that compute their argument from the integer timestep (the
  timestep embedding; found by :func:`sinusoid_argument_nodes`): t * freq reaches 999 rad, where FP16's
  spacing is 0.5, so cos(t * freq) is off by up to 0.25 (measured on the tiny ControlNet at t = 527:
  /model/Cos is the first tensor out of tolerance in ``compare.layerwise_compare``).
* ``ReduceMean``, ``ReduceSum``, ``ReduceSumSquare``, ``Pow``, ``Sqrt`` -- a normalisation spelled out
  op by op (older opsets, hand-written RMSNorm). Absent from the course's opset-18 graphs.

Two converters: NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast``) where installed, else
onnxconverter-common's ``float16`` module, which here also keeps its own ``DEFAULT_OP_BLOCK_LIST`` in
FP32 (ops without FP16 kernels in ONNX Runtime, or whose extra inputs must stay float32, e.g. Resize's
scales). The model's inputs and outputs stay float32 (``keep_io_types``), so every caller feeds the
same arrays as before.

Checking the result on a CPU: ONNX Runtime's CPU provider has few fp16 kernels and runs most fp16 ops
through casts to fp32 that it inserts itself, so an FP16 model there tells you about correctness (which
ops are fp16, how far the outputs move), not about speed. Speed is TensorRT's part (chapter 3's GPU cells).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from course_lib.env import has_module, require
from course_lib.onnx.export import load_onnx_checked
from course_lib.onnx.external_data import EXTERNAL_DATA_THRESHOLD_BYTES, SMALL_TENSOR_BYTES

from course_lib.files import temp_dir_beside
from course_lib.precision.casts import (constants_to_initializers, restore_output_types, simplify_casts,
                                       split_shared_initializers)
from course_lib.precision.report import PrecisionReport, precision_report

KEEP_FP32_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax", "Sin", "Cos",
                 "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt")
METHODS = ("auto", "modelopt", "onnxconverter")
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


@dataclass(frozen=True)
class Fp16Result:
    """What :func:`to_fp16_onnx` wrote; ``os.fspath(result)`` is the FP16 .onnx."""
    path: Path
    data_path: Path | None
    sidecar_path: Path
    method: str
    kept_fp32_ops: tuple[str, ...]
    kept_fp32_nodes: tuple[str, ...]
    tensors: dict[str, int]          # value types in the graph, {"float16": n, "float32": n}
    seconds: float

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.tensors.items())
        return f"{self.path} ({self.method}): {counts} tensors; {self.seconds:.1f} s"


def sinusoid_argument_nodes(model: onnx.ModelProto, max_depth: int = 8) -> list[str]:
    """Chapter 3: names of Sin/Cos nodes and the nodes computing their argument from a Cast (the timestep).

    Walks up from each Sin/Cos through at most ``max_depth`` nodes; the chain counts only when every
    path ends at a Cast (int -> float), a Constant, an initializer or a graph input.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("Sin", "Cos"):
            continue
        chain, frontier = [], list(node.input)
        while frontier and len(chain) < max_depth:
            up = producer.get(frontier.pop())
            if up is None or up.op_type == "Constant" or up.name in chain:
                continue
            chain.append(up.name)
            if up.op_type != "Cast":
                frontier.extend(up.input)
        if not frontier:
            names += [n for n in [node.name, *chain] if n not in names]
    return names


def to_fp16_onnx(src_path, dst_path, keep_fp32_ops=KEEP_FP32_OPS, keep_fp32_nodes=(), keep_io_types: bool = True,
                 method: str = "auto", progress: bool = True) -> Fp16Result:
    """Chapter 3: write an FP16 copy of the FP32 ONNX ``src_path`` to ``dst_path``, atomically.

    Args:
        src_path: the FP32 model (external data next to it is followed).
        dst_path: the ``.onnx`` to write; ``<dst>.data`` holds the weights when they exceed ~1.9 GiB
            (the FP16 SD-1.5 UNet, 1.7 GB, still fits in one file), ``<dst>.json`` is the sidecar
            (method, kept ops, tensor counts, source, versions).
        keep_fp32_ops: op types that compute in FP32 (casts are inserted around them); see the module
            docstring for why each one of :data:`KEEP_FP32_OPS` is there. With Sin/Cos listed, the nodes
            of :func:`sinusoid_argument_nodes` stay FP32 too.
        keep_fp32_nodes: further node names to keep in FP32.
        keep_io_types: keep float32 inputs and outputs (casts at the edges).
        method: "modelopt" (NVIDIA ModelOpt AutoCast, ``convert_to_mixed_precision``; its own
            data-magnitude rule may keep more nodes FP32), "onnxconverter" (onnxconverter-common), or
            "auto": ModelOpt when ``modelopt.onnx.autocast`` imports, else onnxconverter-common (the
            sidecar and the result record which one ran).
        progress: a tqdm bar over the stages.
    Returns:
        :class:`Fp16Result`. Raises FileNotFoundError (no source), ValueError (corrupt source, already
        FP16, bad argument), ``course_lib.env.MissingDependency`` (the chosen converter is missing).
    """
    from course_lib.progress import tqdm

    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    src, dst = Path(src_path), Path(dst_path)
    if dst.suffix != ".onnx" or dst.is_dir():
        raise ValueError(f"{dst}: expected the path of an .onnx file to write")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the FP16 model must not overwrite its FP32 source")
    if method == "auto":
        method = "modelopt" if has_module("modelopt.onnx.autocast") else "onnxconverter"
    start = time.perf_counter()
    bar = tqdm(total=3, desc=f"fp16 {dst.name}", disable=not progress)
    try:
        bar.set_postfix_str("loading")
        fp32 = load_onnx_checked(src, load_external_data=False)      # FileNotFoundError / ValueError
        if _float_types(fp32)[FLOAT16]:
            raise ValueError(f"{src} already holds float16 tensors: expected an FP32 model")
        _name_nodes(fp32)
        keep_ops = tuple(dict.fromkeys(keep_fp32_ops))
        nodes = list(dict.fromkeys(keep_fp32_nodes))
        if {"Sin", "Cos"} & set(keep_ops):
            nodes += [n for n in sinusoid_argument_nodes(fp32) if n not in nodes]
        bar.update()

        bar.set_postfix_str(f"converting ({method})")
        if method == "modelopt":
            model, extra_ops = _modelopt(src, keep_ops, nodes, keep_io_types), ()
        else:
            model, extra_ops = _onnxconverter(fp32, src, keep_ops, nodes, keep_io_types)
        del fp32
        bar.update()

        bar.set_postfix_str("saving")
        converter = "nvidia-modelopt" if method == "modelopt" else "onnxconverter-common"
        sidecar = dict(source=str(src), method=method, keep_fp32_ops=list(keep_ops), converter_fp32_ops=list(extra_ops),
                       keep_fp32_nodes=nodes, keep_io_types=keep_io_types,
                       versions={m: _version(m) for m in ("onnx", converter)})
        data_path, sidecar = _save_atomically(model, dst, sidecar)
        bar.update()
    finally:
        bar.close()
    return Fp16Result(dst, data_path, dst.with_name(dst.name + ".json"), method, keep_ops, tuple(nodes),
                      sidecar["tensors"], round(time.perf_counter() - start, 3))


def _onnxconverter(fp32: onnx.ModelProto, src: Path, keep_ops, nodes, keep_io_types):
    float16 = require("onnxconverter_common.float16", "the FP16 conversion (chapter 3)")
    io_types = {v.name: v.type.tensor_type.elem_type for v in fp32.graph.output}
    extra = tuple(op for op in float16.DEFAULT_OP_BLOCK_LIST if op not in keep_ops)
    constants_to_initializers(fp32)
    split_shared_initializers(fp32, set(keep_ops) | set(extra), set(nodes))
    model = onnx.shape_inference.infer_shapes(fp32)               # types of every tensor (weights not needed)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    for node in model.graph.node:
        # torch writes x.float() as Cast(to=FLOAT); the converter would leave it producing float32 inside an
        # FP16 graph, so it becomes Cast(to=FLOAT16) -- unless that node is to stay FP32
        if node.op_type == "Cast" and node.name not in nodes:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
    with warnings.catch_warnings():       # "the float32 number 1e-09 will be truncated to 1e-07": by design
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        model = float16.convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=True,
                                                 op_block_list=list(keep_ops) + list(extra), node_block_list=nodes,
                                                 check_fp16_ready=False)
    simplify_casts(model)
    if keep_io_types:
        restore_output_types(model, io_types)
    return model, extra


def _modelopt(src: Path, keep_ops, nodes, keep_io_types) -> onnx.ModelProto:
    autocast = require("modelopt.onnx.autocast", "the FP16 conversion with ModelOpt AutoCast (chapter 3)")
    return autocast.convert_to_mixed_precision(
        onnx_path=str(src), low_precision_type="fp16", op_types_to_exclude=list(keep_ops),
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in nodes], keep_io_types=keep_io_types)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name: block lists and reports refer to nodes by name."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def _float_types(model: onnx.ModelProto) -> dict[int, int]:
    """How many tensors (values and initializers) are float32 / float16."""
    g = model.graph
    kinds = [v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)]
    kinds += [t.data_type for t in g.initializer]
    counts = Counter(kinds)
    return {FLOAT16: counts[FLOAT16], FLOAT: counts[FLOAT]}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _save_atomically(model: onnx.ModelProto, dst: Path, sidecar: dict) -> tuple[Path | None, dict]:
    """Save graph (+ weights) and sidecar into a temp folder next to ``dst``, check, then os.replace.

    The sidecar gets the tensor counts and the FP32 node count (read back from the saved file).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name, json_name = dst.name + ".data", dst.name + ".json"
    sidecar["tensors"] = {onnx.helper.tensor_dtype_to_np_dtype(k).name: v for k, v in _float_types(model).items()}
    tmp = temp_dir_beside(dst)
    try:
        onnx.save_model(model, str(tmp / dst.name), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=SMALL_TENSOR_BYTES)
        report = precision_report(tmp / dst.name)                  # also runs onnx.checker, by path
        sidecar["fp32_nodes"] = len(report.fp32_nodes)
        sidecar["inputs"], sidecar["outputs"] = dict(report.inputs), dict(report.outputs)
        (tmp / json_name).write_text(json.dumps(sidecar, indent=2) + "\n")
        for stale in (dst.with_name(json_name), dst, dst.with_name(data_name)):
            stale.unlink(missing_ok=True)                          # the .onnx never points at stale data
        if external:
            os.replace(tmp / data_name, dst.with_name(data_name))
        os.replace(tmp / dst.name, dst)
        os.replace(tmp / json_name, dst.with_name(json_name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (dst.with_name(data_name) if external else None), sidecar


__all__ = ["KEEP_FP32_OPS", "Fp16Result", "PrecisionReport", "precision_report", "sinusoid_argument_nodes",
           "to_fp16_onnx"]
