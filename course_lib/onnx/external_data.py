"""ONNX external data: models over 2 GB keep their weights in a file beside the graph (chapter 1).

Protobuf caps one message at 2 GB, so the fp32 UNet (3.4 GB) is saved as ``unet.onnx`` (the graph)
plus ``unet.onnx.data`` (every tensor of 1 KiB or more, one after another), as ONNX's own
``save_model(save_as_external_data=True, all_tensors_to_one_file=True)`` writes it.

Reading such a model trusts nothing: :func:`external_tensors` finds every tensor whose data lies outside
the graph (node attributes and subgraphs too), :func:`check_external_files` keeps each one's file inside
the model's folder and long enough (``load_onnx_checked`` calls it).
"""
from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26          # 1.94 GiB of weights
SMALL_TENSOR_BYTES = 1024                               # smaller tensors stay inside the .onnx


def gather_weights(onnx_path: Path, data_name: str) -> bool:
    """Move the weights (tensors of 1 KiB or more) into ``data_name`` next to the graph, streaming.

    Works on torch's output either way: weights inside the .onnx, or one file per weight (models > 2 GB).
    The result is what ``onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)``
    writes, but torch's per-weight files are copied file to file: loading them into the ModelProto first
    would hold every weight (3.4 GB for the UNet) a second time, since protobuf does not free cleared fields.
    """
    helper = onnx.external_data_helper
    model = onnx.load(str(onnx_path), load_external_data=False)
    data_path = onnx_path.with_name(data_name)
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            start = data.tell()
            if helper.uses_external_data(tensor):                 # one of torch's per-weight files
                info = {e.key: e.value for e in tensor.external_data}
                source = onnx_path.parent / info["location"]
                offset = int(info.get("offset", 0))
                remaining = int(info.get("length", source.stat().st_size - offset))
                with open(source, "rb") as src:
                    src.seek(offset)
                    while remaining > 0:
                        chunk = src.read(min(1 << 24, remaining))      # 16 MiB at a time
                        if not chunk:
                            raise ValueError(f"torch's weight file {source.name} is shorter than its tensor")
                        data.write(chunk)
                        remaining -= len(chunk)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= SMALL_TENSOR_BYTES:
                data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue                                          # small tensors stay inside the .onnx
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", start), ("length", data.tell() - start)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        moved = data.tell() > 0
    onnx.save_model(model, str(onnx_path))
    if not moved:
        data_path.unlink()
    return moved


def weight_bytes(model: onnx.ModelProto, folder: Path) -> int:
    """Bytes of all weights of ``model`` (a graph whose external data lies in ``folder``)."""
    total = 0
    for t in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            total += int(info["length"]) if "length" in info else (folder / info["location"]).stat().st_size
        else:
            total += t.ByteSize()
    return total


def check_external_files(model: onnx.ModelProto, path: Path) -> None:
    """Chapter 1: every tensor of ``model`` (loaded from ``path`` without its data) that keeps its data
    outside the .onnx names a plain relative file inside the model's folder, which exists and is long
    enough (a truncated ``.data`` file would otherwise only fail at inference). FileNotFoundError or
    ValueError, one line naming the tensor."""
    folder = path.parent.resolve()
    for tensor in external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        data = path.parent / location
        if not location or Path(location).is_absolute() or "\\" in location or \
                not data.resolve().is_relative_to(folder):
            raise ValueError(f"{path.name}: tensor {tensor.name!r} keeps its data in {location!r}, outside the "
                             f"model's folder {path.parent}: refused (expected a file next to the .onnx)")
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise ValueError(f"{path.name}: tensor {tensor.name!r} has a bad external-data offset or length "
                             f"({info.get('offset')!r}, {info.get('length')!r})") from None
        if not data.is_file():
            raise FileNotFoundError(f"{path.name}: external data file {data} is missing")
        if data.stat().st_size < end:
            raise ValueError(f"{path.name}: external data file {data} is truncated "
                             f"({data.stat().st_size} bytes, tensor {tensor.name!r} ends at {end})")


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Chapter 1: every tensor of ``model`` whose data lives in an external file: initializers, sparse
    initializers, and tensors held in node attributes (Constant's ``value``), in subgraphs and functions too."""
    tensors: list[onnx.TensorProto] = []

    def sparse(s: onnx.SparseTensorProto) -> None:
        tensors.extend((s.values, s.indices))

    def nodes(node_list) -> None:
        for node in node_list:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    sparse(attr.sparse_tensor)
                for s in attr.sparse_tensors:
                    sparse(s)
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    graph(g)

    def graph(g: onnx.GraphProto) -> None:
        tensors.extend(g.initializer)
        for s in g.sparse_initializer:
            sparse(s)
        nodes(g.node)

    graph(model.graph)
    for function in model.functions:
        nodes(function.node)
    return [t for t in tensors if onnx.external_data_helper.uses_external_data(t)]
