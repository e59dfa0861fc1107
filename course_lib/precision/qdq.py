"""Chapter 5: the rules an explicit-quantization (Q/DQ) ONNX must follow for TensorRT, and their check.

TensorRT takes INT8 Q/DQ pairs with zero point 0 (symmetric), a QuantizeLinear followed by its
DequantizeLinear, ops of the standard domain and float biases; :func:`check_qdq` reads a file the way
TensorRT will and lists what breaks those rules.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from course_lib.onnx.graph import load_graph

INT8_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")   # the layers whose inputs TensorRT runs in INT8
_INT8 = onnx.TensorProto.DataType.Value("INT8")      # the only Q/DQ type TensorRT takes


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of tensors that do not depend on any graph input (initializers, Constants, their results)."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:                                     # nodes are in topological order
        if all(not name or name in const for name in node.input):
            const.update(node.output)
    return const


@dataclass
class QDQReport:
    """Chapter 5: what :func:`check_qdq` found. ``passed``: TensorRT's Q/DQ rules hold (and there are Q/DQ)."""
    path: str
    quantize: int = 0
    dequantize: int = 0
    per_channel_weights: int = 0
    per_tensor_weights: int = 0
    quantized_layers: list[str] = field(default_factory=list)     # "Conv <node name>", both inputs from DQ
    float_layers: list[str] = field(default_factory=list)         # compute layers with a float input
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.dequantize > 0

    def layer_counts(self) -> dict[str, tuple[int, int]]:
        """``{op type: (int8 layers, float layers)}``."""
        q = Counter(s.split(" ", 1)[0] for s in self.quantized_layers)
        f = Counter(s.split(" ", 1)[0] for s in self.float_layers)
        return {op: (q[op], f[op]) for op in sorted(set(q) | set(f))}

    def summary(self) -> dict:
        return {"passed": self.passed, "QuantizeLinear": self.quantize, "DequantizeLinear": self.dequantize,
                "per_channel_weights": self.per_channel_weights, "per_tensor_weights": self.per_tensor_weights,
                "layers_int8_float": self.layer_counts(), "problems": self.problems[:20]}

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.problems)} problem(s))"
        lines = [f"{Path(self.path).name}: {verdict}: {self.quantize} QuantizeLinear, {self.dequantize} "
                 f"DequantizeLinear; weights {self.per_channel_weights} per-channel, {self.per_tensor_weights} per-tensor",
                 f"{'layer':<14}{'int8':>6}{'float':>7}"]
        lines += [f"{op:<14}{q:>6}{f:>7}" for op, (q, f) in self.layer_counts().items()]
        if self.float_layers:
            more = f" (+{len(self.float_layers) - 8} more)" if len(self.float_layers) > 8 else ""
            lines.append("float: " + ", ".join(self.float_layers[:8]) + more)
        lines += [f"problem: {p}" for p in self.problems[:10]]
        return "\n".join(lines)


def _int8_zero_point(node, consts, folder) -> tuple[int, np.ndarray | None]:
    """(ONNX element type, zero-point values) of a Q/DQ node; no zero point means uint8 0 before opset 21."""
    if len(node.input) > 2 and node.input[2]:
        tensor = consts.get(node.input[2])
        if tensor is None:
            return onnx.TensorProto.UNDEFINED, None
        return tensor.data_type, numpy_helper.to_array(tensor, base_dir=folder)
    attrs = {a.name: a.i for a in node.attribute}
    return attrs.get("output_dtype", 0) or onnx.TensorProto.UINT8, np.zeros(1)


def check_qdq(onnx_path) -> QDQReport:
    """Chapter 5: check an INT8 ONNX the way TensorRT reads it; lists the layers that stayed float.

    Problems found (each a line in ``report.problems``): a Q/DQ whose type is not INT8 (uint8 included),
    a non-zero zero point (asymmetric), a scale that is not a positive constant, a Q not followed only by
    DQ, a DQ reading something other than a Q or an INT8 weight (e.g. an int32 bias), Q/DQ outside the
    standard ONNX domain. Compute layers (Conv, ConvTranspose, MatMul, Gemm) are INT8 when both their
    data inputs come from DQ, float otherwise. Weights are not loaded (scales and zero points are).
    """
    path = Path(onnx_path)
    model = load_graph(path)
    graph, folder = model.graph, str(path.parent)
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    report = QDQReport(str(path))
    type_name = onnx.TensorProto.DataType.Name
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{where}: domain {node.domain!r}, TensorRT parses only standard ONNX Q/DQ")
        dtype, zero = _int8_zero_point(node, consts, folder)
        if dtype != _INT8:
            report.problems.append(f"{where}: type {type_name(dtype)}, TensorRT needs INT8")
        elif zero is None or np.any(zero != 0):
            report.problems.append(f"{where}: zero point not 0 (asymmetric), TensorRT needs 0")
        scale = consts.get(node.input[1])
        values = numpy_helper.to_array(scale, base_dir=folder) if scale is not None else None
        if values is None or not np.all(np.isfinite(values)) or np.any(values <= 0):
            report.problems.append(f"{where}: scale is not a positive constant")
        if node.op_type == "QuantizeLinear":
            report.quantize += 1
            if any(c.op_type != "DequantizeLinear" for c in consumers.get(node.output[0], [])):
                report.problems.append(f"{where}: output feeds a node other than DequantizeLinear")
            continue
        report.dequantize += 1
        source = node.input[0]
        q = producer.get(source)
        if source in consts:                                            # an INT8 weight (or an int32 bias)
            if consts[source].data_type != _INT8:
                report.problems.append(f"{where}: reads {type_name(consts[source].data_type)} initializer "
                                       f"{source!r}, TensorRT needs INT8 weights (and float biases)")
        elif q is None or q.op_type != "QuantizeLinear":
            report.problems.append(f"{where}: reads {source!r}, neither a QuantizeLinear output nor an INT8 weight")
        if source in consts or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts):
            per_channel = values is not None and values.size > 1         # a weight: stored INT8, or float + Q
            report.per_channel_weights += per_channel
            report.per_tensor_weights += not per_channel
    for node in graph.node:
        if node.op_type in INT8_OP_TYPES:
            from_dq = [i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input[:2]]
            (report.quantized_layers if all(from_dq) else report.float_layers).append(f"{node.op_type} {node.name}")
    return report
