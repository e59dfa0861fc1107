"""An ONNX file parsed into a TensorRT network: its layers, counted by type. Introduced in chapter 2.

TensorRT's ONNX parser turns each ONNX node into one or more *layers* of an ``INetworkDefinition``
(a MatMul becomes a ``MATRIX_MULTIPLY`` layer, a weight a ``CONSTANT`` layer, LayerNorm a
``NORMALIZATION`` layer, ...). Before the builder fuses and compiles anything, that network is the
model as TensorRT understands it. :func:`inspect_onnx` parses a file and returns the layer count
and a census of layer types; chapter 4 compares the census of the fused-QKV and unfused models.

A model the parser rejects is one ``ValueError`` naming the node and its op (:func:`parse_onnx`).
Parsing needs only the builder, so it runs wherever a builder runs (TensorRT for RTX: any CPU).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_UNINFORMATIVE = {"", "false", "true"}   # what ParserError.desc() says for some rejected nodes


@dataclass(frozen=True)
class NetworkSummary:
    """Chapter 2: a parsed network -- layer count, layers by type (most common first), inputs and outputs."""
    onnx: str
    tensorrt: str                          # "TensorRT for RTX 1.7.1.116"
    layers: int
    census: dict[str, int]                 # {"CONSTANT": 512, "MATRIX_MULTIPLY": 120, ...}
    inputs: dict[str, tuple[int, ...]]     # -1 where a dimension is dynamic
    outputs: dict[str, tuple[int, ...]]
    strongly_typed: bool

    def count(self, layer_type: str) -> int:
        """Layers of one type, e.g. ``count("MATRIX_MULTIPLY")`` (0 when there are none)."""
        return self.census.get(layer_type.upper(), 0)

    def table(self, top: int = 6) -> str:
        """One line: ``unet.onnx: 4974 layers (CONSTANT 1500, ELEMENTWISE 900, ...)``."""
        shown = ", ".join(f"{kind} {n}" for kind, n in list(self.census.items())[:top])
        rest = len(self.census) - top
        more = f", +{rest} more types" if rest > 0 else ""
        return f"{Path(self.onnx).name}: {self.layers} layers ({shown}{more})"


def error_rows(parser) -> list[tuple[str, str, str]]:
    """The parser's errors as ``(node name, op, description)``; the description falls back to the error code."""
    rows = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        desc = str(error.desc()).strip()
        if desc.lower() in _UNINFORMATIVE:
            desc = error.code().name.lower().replace("_", " ")
        rows.append((error.node_name(), error.node_operator(), desc))
    return rows


def parser_error_line(errors: Sequence[tuple[str, str, str]], onnx_path: str | Path, tensorrt: str = "TensorRT") -> str:
    """Chapter 2: ONNX parser errors as one line naming the (first) node and its op."""
    if not errors:
        return f"{tensorrt} could not parse {Path(onnx_path).name} (the parser gave no reason; see the TensorRT log)"
    node, op, desc = errors[0]
    first_line = " ".join(str(desc).split())
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return (f"{tensorrt} cannot parse {Path(onnx_path).name}: node {node or '?'!r} (op {op or '?'}): "
            f"{first_line}{more}")


def parse_onnx(trt, builder, onnx_path: str | Path, logger, strongly_typed: bool = True):
    """Chapter 2: parse an ONNX file into a new network; returns ``(network, parser)``.

    Keep the parser alive as long as the network: it owns the weights the network points to.
    The file is parsed from its path, so external weights (``unet.onnx.data``) are found beside it.
    Raises ValueError with one line naming the node and op the parser rejected.
    """
    from course_lib.trt.flavour import label

    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ValueError(parser_error_line(error_rows(parser), onnx_path, label(trt)))
    return network, parser


def is_strongly_typed(trt, network) -> bool:
    """Whether the parsed network keeps the ONNX's types (always so on TensorRT 11 and TensorRT for RTX)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return bool(flag is not None and network.get_flag(flag))


def layer_census(network) -> dict[str, int]:
    """Chapter 2: ``{layer type: count}`` of a parsed network, most common first."""
    kinds = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    return dict(kinds.most_common())


def _shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.shape) for t in tensors}


def summarize_network(trt, network, onnx_path: str | Path) -> NetworkSummary:
    """A :class:`NetworkSummary` of a network already parsed from ``onnx_path``."""
    from course_lib.trt.flavour import label

    return NetworkSummary(
        onnx=str(onnx_path), tensorrt=label(trt), layers=int(network.num_layers), census=layer_census(network),
        inputs=_shapes(network.get_input(i) for i in range(network.num_inputs)),
        outputs=_shapes(network.get_output(i) for i in range(network.num_outputs)),
        strongly_typed=is_strongly_typed(trt, network))


def inspect_onnx(onnx_path: str | Path, tensorrt: str | None = None, log_level: str = "error") -> NetworkSummary:
    """Chapter 2: parse ``onnx_path`` with TensorRT's parser (no build) and summarize the network.

    ``tensorrt``: the flavour (``"tensorrt"``, ``"tensorrt_rtx"``, ``"auto"``; None: the one in force).
    """
    from course_lib.trt.flavour import require_tensorrt
    from course_lib.trt.logger import get_logger

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} not found: export it first (chapter 1)")
    trt = require_tensorrt("parsing ONNX into a TensorRT network (chapter 2)", tensorrt)
    logger = get_logger(log_level, trt=trt)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder, onnx_path, logger)
    summary = summarize_network(trt, network, onnx_path)
    del parser
    return summary
