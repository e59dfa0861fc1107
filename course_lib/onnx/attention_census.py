"""Chapter 4's graph evidence: the MatMul nodes of each attention layer in an exported ONNX graph.

Fusing q/k/v (``course_lib.cnsd.fusion``) must show in the graph: per layer, 3 projection MatMuls
become 1 (self-attention) or 2 (cross-attention, q stays apart). :func:`count_attention_matmuls`
counts them; :func:`expected_matmul_counts` says what a fused or unfused model should give.
"""
from __future__ import annotations

import os

from course_lib.cnsd.config import CNSDConfig
from course_lib.cnsd.fusion import attention_layer_counts

MATMUL_KEYS = ("self_layers", "cross_layers", "self_projection", "cross_projection", "attention", "output")


def expected_matmul_counts(config: CNSDConfig, model_name: str, fused: bool) -> dict[str, int]:
    """Chapter 4: the MatMul nodes :func:`count_attention_matmuls` should find in an exported graph.

    Per layer: projections 3 (unfused) or 1 (fused self) / 2 (fused cross, q stays apart), then the two
    attention MatMuls (QK^T and softmax @ V) and ``to_out``. Keys: see :data:`MATMUL_KEYS`, plus "total".
    """
    n_self, n_cross = attention_layer_counts(config, model_name)
    counts = {"self_layers": n_self, "cross_layers": n_cross,
              "self_projection": n_self * (1 if fused else 3), "cross_projection": n_cross * (2 if fused else 3),
              "attention": 2 * (n_self + n_cross), "output": n_self + n_cross}
    counts["total"] = sum(counts[k] for k in MATMUL_KEYS[2:])
    return counts


def count_attention_matmuls(model) -> dict[str, int]:
    """Chapter 4: count the MatMul nodes of each attention layer of an exported ONNX graph.

    ``model`` is a path (external data is not needed) or an ``onnx.ModelProto``. A layer is the node-name
    scope of a Softmax ending in ``attn1`` (self) or ``attn2`` (cross), as the torch exporter names them
    (``/input_blocks.1/input_blocks.1.1/transformer_blocks.0/attn1/Softmax``). Inside it, a MatMul with a
    constant input (a weight) before the Softmax is a projection, after it ``to_out``; a MatMul of two
    computed tensors is QK^T or softmax @ V. Returns the keys of :func:`expected_matmul_counts`.
    """
    import onnx

    graph = (onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike))
             else model).graph
    constants = {t.name for t in graph.initializer}
    computed = {i.name for i in graph.input} - constants          # grows along the (topologically sorted) nodes
    for node in graph.node:
        if any(name in computed for name in node.input):
            computed.update(node.output)
    layers = {}                                                   # scope -> (kind, index of its Softmax)
    for index, node in enumerate(graph.node):
        scope = node.name.rpartition("/")[0]
        if node.op_type == "Softmax" and scope.rpartition("/")[2] in ("attn1", "attn2"):
            layers[scope] = ("self" if scope.endswith("attn1") else "cross", index)
    if not layers:
        raise ValueError("no attention layers in this graph: expected Softmax nodes named like "
                         "'/.../attn1/Softmax' (torch.onnx.export keeps module paths in node names)")
    counts = dict.fromkeys(MATMUL_KEYS, 0)
    for kind, _ in layers.values():
        counts[f"{kind}_layers"] += 1
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul":
            continue
        scope = next((s for s in layers if node.name.startswith(s + "/")), None)
        if scope is None:
            continue
        kind, softmax_index = layers[scope]
        weight = any(name not in computed for name in node.input)
        if not weight:
            counts["attention"] += 1
        else:
            counts[f"{kind}_projection" if index < softmax_index else "output"] += 1
    counts["total"] = sum(counts[k] for k in MATMUL_KEYS[2:])
    return counts
