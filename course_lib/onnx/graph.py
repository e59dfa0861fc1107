"""Looking at ONNX graphs: an op-type census, the I/O table, and Netron in the notebook.

Chapter 1 introduces these; chapter 4 counts MatMuls with the census.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx


def load_graph(model) -> onnx.ModelProto:
    """A path's graph without its weights (fast for 3 GB models), or the ModelProto given; one-line errors."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)       # the graph only: fast for 3 GB models
    except Exception as e:  # protobuf's DecodeError and friends  # noqa: BLE001
        raise ValueError(f"ONNX model {path}: not a readable ONNX file ({type(e).__name__})") from None


def op_census(model) -> Counter:
    """Chapter 1: how many nodes of each op type a graph has (a path or an onnx.ModelProto)."""
    return Counter(node.op_type for node in load_graph(model).graph.node)


def io_table(model) -> str:
    """Chapter 1: the graph's inputs and outputs, one line each: name, dtype, shape (names for dynamic axes)."""
    graph = load_graph(model).graph
    initializers = {t.name for t in graph.initializer}
    lines = []
    for kind, values in (("input", [v for v in graph.input if v.name not in initializers]), ("output", graph.output)):
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            lines.append(f"{kind:<7}{v.name:<20}{dtype:<9}({', '.join(dims)})")
    return "\n".join(lines)


def show_in_netron(path: str | Path, port: int = 8081, height: int = 600):
    """Chapter 1: serve an ONNX file with Netron on 127.0.0.1 and show it in the notebook (an IFrame).

    Needs ``pip install netron``; the server stays up until :func:`stop_netron` or the kernel ends.
    """
    from course_lib.env import require

    netron = require("netron", "viewing graphs")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path}: no such file")
    netron.start(str(path), address=("127.0.0.1", port), browse=False)
    from IPython.display import IFrame

    return IFrame(f"http://127.0.0.1:{port}", width="100%", height=height)


def stop_netron(port: int = 8081) -> None:
    """Chapter 1: stop the Netron server started by :func:`show_in_netron`."""
    from course_lib.env import require

    require("netron", "viewing graphs").stop(("127.0.0.1", port))
