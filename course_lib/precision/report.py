"""What runs in which precision in an ONNX model: op types by float16 / float32 (chapters 3 and 5)."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from course_lib.onnx.export import load_onnx_checked

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


@dataclass
class PrecisionReport:
    """Op types by the precision they compute in, the model's I/O dtypes, and the FP32 nodes."""
    ops: dict[str, dict[str, int]]                      # op type -> {"float16": n, "float32": n, "other": n}
    inputs: list[tuple[str, str]]                       # (name, dtype)
    outputs: list[tuple[str, str]]
    fp32_nodes: list[tuple[str, str]] = field(default_factory=list)   # (op type, node name), casts excluded

    def count(self, dtype: str) -> int:
        return sum(row.get(dtype, 0) for op, row in self.ops.items() if op != "Cast")

    def __str__(self) -> str:
        lines = [f"{'op type':<24}{'float16':>9}{'float32':>9}{'other':>7}"]
        for op, row in sorted(self.ops.items()):
            lines.append(f"{op:<24}{row['float16']:>9}{row['float32']:>9}{row['other']:>7}")
        io = lambda items: ", ".join(f"{n} {d}" for n, d in items)  # noqa: E731
        lines += [f"inputs: {io(self.inputs)}", f"outputs: {io(self.outputs)}",
                  f"{self.count('float16')} nodes compute in float16, {self.count('float32')} in float32 "
                  f"({', '.join(sorted(set(op for op, _ in self.fp32_nodes))) or 'none'}; Cast counted by target)"]
        return "\n".join(lines)


def precision_report(onnx_path) -> PrecisionReport:
    """Chapter 3: which op types compute in float16 / float32 in an ONNX model (path or ModelProto).

    A node counts under the dtype of its first float output (a Cast under the dtype it casts to); nodes
    without a float output (Shape, integer arithmetic) count as "other". Returns a :class:`PrecisionReport`
    (``print`` it for a table; ``.fp32_nodes`` lists the non-Cast nodes computing in float32).
    """
    if isinstance(onnx_path, onnx.ModelProto):
        graph_only = onnx.ModelProto()
        graph_only.CopyFrom(onnx_path)
    else:
        graph_only = load_onnx_checked(onnx_path, load_external_data=False)
    for t in graph_only.graph.initializer:                      # float weights: their types are all we need
        if t.data_type in (FLOAT, FLOAT16):
            t.ClearField("raw_data")
    model = onnx.shape_inference.infer_shapes(graph_only)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
    name = {FLOAT16: "float16", FLOAT: "float32"}
    ops: dict[str, dict[str, int]] = {}
    fp32_nodes = []
    for node in g.node:
        kind = next((name[types[x]] for x in node.output if types.get(x) in name), "other")
        ops.setdefault(node.op_type, {"float16": 0, "float32": 0, "other": 0})[kind] += 1
        if kind == "float32" and node.op_type != "Cast":
            fp32_nodes.append((node.op_type, node.name))
    dtype = lambda v: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name  # noqa: E731
    return PrecisionReport(ops, [(v.name, dtype(v)) for v in g.input], [(v.name, dtype(v)) for v in g.output],
                           fp32_nodes)
