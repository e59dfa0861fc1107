"""The graph surgery an FP16 conversion needs around the ops kept in FP32 (chapter 3, :mod:`.fp16`).

A converter rounds every float Constant to fp16, shares one initializer between kept and converted
nodes, and wraps each kept node in casts of its own; these functions undo exactly that.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Float Constant nodes become initializers, which the converter leaves FP32 where FP32-kept ops read them.

    (It rounds every Constant node to fp16, even one feeding a kept op: the timestep embedding's
    frequencies, or GroupNorm's scale and bias.)
    """
    kept = []
    for node in model.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and attr.t.data_type == FLOAT:
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def split_shared_initializers(model: onnx.ModelProto, ops: set, nodes: set) -> None:
    """An FP32 initializer read by both kept and converted nodes gets a separate copy for the kept ones."""
    float_inits = {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in set(node.input) & float_inits.keys():
            readers.setdefault(name, []).append(node)
    for name, users in readers.items():
        kept = [n for n in users if n.op_type in ops or n.name in nodes]
        if kept and len(kept) < len(users):
            copy = model.graph.initializer.add()
            copy.CopyFrom(float_inits[name])
            copy.name = name + "_fp32"
            for node in kept:
                node.input[:] = [copy.name if x == name else x for x in node.input]


def _cast_to(node: onnx.NodeProto | None) -> int | None:
    """The target dtype of a Cast node; None for any other node (or None)."""
    if node is None or node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def simplify_casts(model: onnx.ModelProto) -> None:
    """Bypass casts that change nothing: no-op casts (fp16 -> fp16, what torch's ``x.float()`` became) and
    fp32 -> Cast(fp16) -> Cast(fp32) round trips between two FP32-kept nodes.

    The converter wraps each kept node in casts of its own, so without this a chain of kept nodes (the
    timestep embedding) would be rounded to fp16 between every two of them.
    """
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    producer = {out: node for node in g.node for out in node.output}
    outputs = {v.name for v in g.output}
    direct: dict[str, str] = {}                                     # cast output -> tensor to read instead
    for node in g.node:                                             # topological order: sources resolve first
        to = _cast_to(node)
        if to is None or node.output[0] in outputs:
            continue
        source = direct.get(node.input[0], node.input[0])
        up = producer.get(source)
        if types.get(source) == to:
            direct[node.output[0]] = source
        elif to == FLOAT and _cast_to(up) == FLOAT16 and types.get(direct.get(up.input[0], up.input[0])) == FLOAT:
            direct[node.output[0]] = direct.get(up.input[0], up.input[0])
    if not direct:
        return
    for node in g.node:
        node.input[:] = [direct.get(x, x) for x in node.input]
    kept = [n for n in g.node if not (n.op_type == "Cast" and n.output[0] in direct)]
    read = {x for n in kept for x in n.input} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and n.output[0] not in read)]
    produced = {out for n in kept for out in n.output}
    value_info = [v for v in g.value_info if v.name in produced]
    del g.node[:], g.value_info[:]
    g.node.extend(kept)
    g.value_info.extend(value_info)


def restore_output_types(model: onnx.ModelProto, types: dict[str, int]) -> None:
    """onnxconverter-common turns a graph output fp16 when an FP32-kept node produces it: cast it back."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumed = {name for node in model.graph.node for name in node.input}
    for output in model.graph.output:
        if types.get(output.name) != FLOAT or output.type.tensor_type.elem_type != FLOAT16:
            continue
        node = producer[output.name]
        if node.op_type == "Cast" and output.name not in consumed:  # X(fp32) -> Cast16 -> output: to fp32
            next(a for a in node.attribute if a.name == "to").i = FLOAT
        else:
            inner = output.name + "_fp16"
            for other in model.graph.node:                          # fp16 readers inside the graph keep fp16
                other.input[:] = [inner if x == output.name else x for x in other.input]
            node.output[list(node.output).index(output.name)] = inner
            model.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=FLOAT,
                                                          name=output.name + "_cast_to_fp32"))
        output.type.tensor_type.elem_type = FLOAT
