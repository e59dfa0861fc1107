"""Looking at ONNX graphs: an op-type census, the I/O table, and Netron in the notebook.

Chapter 1 introduces these; chapter 4 counts MatMuls with the census.
"""
from __future__ import annotations

import atexit
import logging
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


_netron_address: tuple[str, int] | None = None          # this process's (this kernel's) Netron server


def show_in_netron(path: str | Path, height: int = 600, port: int = 0):
    """Chapter 1: serve an ONNX file with Netron on 127.0.0.1 and show it in the notebook (an IFrame).

    One server per kernel, on a free port (``port=0``): showing another file replaces it, and it stops
    with the kernel (or :func:`stop_netron`). Prints one line with its address and how to reach it when
    JupyterLab runs on another machine. Needs ``pip install netron`` (the README's set-up has it).
    """
    global _netron_address
    from IPython.display import IFrame

    from course_lib.env import require

    netron = require("netron", "viewing graphs")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path}: no such file")
    stop_netron()
    first = _netron_address is None
    quiet = logging.NullHandler()                  # netron.start would add a root handler (logging.basicConfig)
    logging.getLogger().addHandler(quiet)
    try:
        _netron_address = host, port = netron.start(str(path), address=("127.0.0.1", port), browse=False)
    finally:
        logging.getLogger().removeHandler(quiet)
    if first:
        atexit.register(stop_netron)
    url = f"http://{host}:{port}"
    print(f"Netron shows {path.name} at {url} (JupyterLab on another machine? forward the port first: "
          f"ssh -N -L {port}:{host}:{port} you@that-machine)")
    return IFrame(url, width="100%", height=height)


def stop_netron() -> None:
    """Chapter 1: stop the Netron server :func:`show_in_netron` started in this kernel (if any)."""
    if _netron_address is not None:
        from course_lib.env import require

        require("netron", "viewing graphs").stop(_netron_address)
