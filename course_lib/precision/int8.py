"""INT8 by explicit quantization: Q/DQ ONNX models that TensorRT accepts, checked and measured.

Chapter 5 introduces this module. TensorRT 10/11 takes INT8 only as *explicit* quantization: the ONNX
itself carries ``QuantizeLinear -> DequantizeLinear`` pairs whose scales say where and how tensors are
rounded to 8 bits (the old calibrators and dynamic ranges are gone in 11). TensorRT's rules for them:
INT8 types only (no uint8), zero point 0 (symmetric), Q/DQ from the standard ONNX domain, float biases.

1. :func:`quantize_int8` writes such a model two ways: ModelOpt's ONNX PTQ (NVIDIA's tool, made for
   TensorRT; "max" or "entropy" ranges) when it is installed, or ONNX Runtime's ``quantize_static`` with
   the settings in :data:`ORT_TRT_OPTIONS` (QDQ format, QInt8 activations and weights, symmetric, bias
   left float, per-channel weights, Q/DQ on the inputs of the weighted layers only; "max" ranges).
   Ranges come from recorded inputs (:mod:`course_lib.precision.calibration`). Layers left unquantized stay fp32;
   for TensorRT INT8 against FP16 they have to be FP16 too (``high_precision="fp16"``, ModelOpt).
2. :func:`sensitive_nodes` finds layers one may want to keep in float: the attention matmuls around the
   softmax, the norms, the first and last convs, the time embedding; pass them as ``exclude_nodes``.
3. :func:`check_qdq` reads the result the way TensorRT will: every Q/DQ INT8 with zero point 0, each
   Q followed by DQ, and which compute layers stayed float. :func:`quantize_int8` refuses to write a
   model that fails it.

Accuracy and speed of the result are measured with :mod:`course_lib.precision.evaluation`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from course_lib.files import temp_dir_beside
from course_lib.onnx.graph import load_graph
from course_lib.precision.qdq import INT8_OP_TYPES, QDQReport, check_qdq, constant_tensors

# ONNX Runtime quantize_static in the form TensorRT builds (see the module docstring)
ORT_TRT_OPTIONS = {
    "ActivationSymmetric": True,     # activation zero point 0 (TensorRT has no asymmetric INT8)
    "WeightSymmetric": True,         # weight zero point 0
    "QuantizeBias": False,           # TensorRT wants float biases, not int32 DequantizeLinear inputs
    "DedicatedQDQPair": False,       # one Q/DQ pair may feed several layers; TensorRT handles that
    # Q/DQ on the inputs of the weighted layers only, as TensorRT recommends and ModelOpt places them;
    # by default ORT also rounds their outputs (the controls, the q·kᵀ going into the softmax) to INT8
    "OpTypesToExcludeOutputQuantization": list(INT8_OP_TYPES),
}
SENSITIVE_GROUPS = ("attention", "norm", "first_last_conv", "time_embed")
CALIBRATION_METHODS = ("max", "entropy")
METHODS = ("auto", "ort", "modelopt")
_NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")


# -------------------------------------------------------------------------------- sensitive layers


def sensitive_nodes(onnx_path, groups: Sequence[str] = SENSITIVE_GROUPS) -> dict[str, list[str]]:
    """Chapter 5: names of the nodes in each group of usually quantization-sensitive layers.

    * ``attention``: MatMuls of two activations, i.e. q·kᵀ (the softmax input) and softmax·v;
    * ``norm``: LayerNormalization / InstanceNormalization (GroupNorm as exported) / GroupNormalization;
    * ``first_last_conv``: convs reading a graph input, and convs reaching a graph output with no other
      compute layer in between (UNet conv_in / out conv; ControlNet conv_in, first hint conv, 13 zero convs);
    * ``time_embed``: compute layers fed by the ``timestep`` input alone (time_embed and each emb_layers).
    Returns ``{group: [node names]}``; :func:`quantize_int8` takes the dict as ``exclude_nodes``.
    """
    bad = [g for g in groups if g not in SENSITIVE_GROUPS]
    if bad:
        raise ValueError(f"groups {bad}: expected some of {SENSITIVE_GROUPS}")
    graph = load_graph(onnx_path).graph
    const = constant_tensors(graph)
    compute = [n for n in graph.node if n.op_type in INT8_OP_TYPES]
    found: dict[str, list[str]] = {}
    if "attention" in groups:
        found["attention"] = [n.name for n in compute if n.op_type == "MatMul"
                              and not any(i in const for i in n.input[:2])]
    if "norm" in groups:
        found["norm"] = [n.name for n in graph.node if n.op_type in _NORM_OPS]
    if "first_last_conv" in groups:
        producer = {o: n for n in graph.node for o in n.output}
        inputs = {i.name for i in graph.input}
        last, seen, stack = set(), set(), [o.name for o in graph.output]
        while stack:                                  # walk up from each output to the first compute layers
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in INT8_OP_TYPES:
                last.add(node.name)
            else:
                stack.extend(i for i in node.input if i)
        found["first_last_conv"] = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")
                                    and (n.input[0] in inputs or n.name in last)]
    if "time_embed" in groups:
        from_t = {i.name for i in graph.input if i.name == "timestep"}
        for n in graph.node:
            live = [i for i in n.input if i and i not in const]
            if live and all(i in from_t for i in live):
                from_t.update(n.output)
        found["time_embed"] = [n.name for n in compute if n.output[0] in from_t]
    return found


# ------------------------------------------------------------------------------------ quantize


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_int8` wrote; ``os.fspath(result)`` is the INT8 .onnx file."""
    path: Path
    method: str                 # "ort" or "modelopt"
    calibration: str            # "max" or "entropy"
    samples: int
    seconds: float
    excluded_nodes: tuple[str, ...]
    report: "QDQReport"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return (f"{self.path.name}: {self.method} INT8 ({self.calibration} calibration, {self.samples} samples, "
                f"{len(self.excluded_nodes)} nodes kept float) in {self.seconds:.1f} s\n{self.report}")


def quantize_int8(fp32_onnx, out_onnx, reader, method: str = "auto", calibration: str = "max",
                  per_channel: bool = True, op_types: Sequence[str] = INT8_OP_TYPES,
                  exclude_op_types: Sequence[str] = (), exclude_nodes: Mapping | Sequence[str] = (),
                  providers: Sequence[str] | None = None, high_precision: str = "fp32",
                  progress: bool = True) -> QuantizeResult:
    """Chapter 5: write an INT8 Q/DQ copy of ``fp32_onnx`` to ``out_onnx`` that TensorRT can build.

    Args:
        fp32_onnx, out_onnx: paths; the output folder is created; weights over 2 GB go to ``<out>.data``.
        reader: a :class:`~course_lib.precision.calibration.CalibrationReader` (or any ORT CalibrationDataReader for
            method "ort") giving the recorded inputs of this model.
        method: "ort" (ONNX Runtime quantize_static, :data:`ORT_TRT_OPTIONS`), "modelopt" (ModelOpt's ONNX
            PTQ) or "auto" (ModelOpt when installed, else ORT).
        calibration: "max" (the largest |x| seen) or "entropy" (the clipping that loses least information,
            TensorRT's old default; ModelOpt only: ONNX Runtime's is impractically slow).
        per_channel: one weight scale per output channel (ModelOpt always does this).
        op_types: layer types to quantize (TensorRT gains from INT8 in these; ``None``: all ORT knows).
        exclude_op_types, exclude_nodes: keep these float; ``exclude_nodes`` takes node names or the
            dict of :func:`sensitive_nodes`. An unknown node name is a ValueError.
        providers: ONNX Runtime providers for calibration (default CPU).
        high_precision: the type of the layers left unquantized: "fp32", or "fp16" (ModelOpt only) for a
            TensorRT INT8 engine to compare with an FP16 one.
    Returns a :class:`QuantizeResult`; a ``<out>.json`` sidecar records the settings and the check.
    Raises ValueError when the written model fails :func:`check_qdq` (nothing is left under ``out_onnx``).
    """
    from course_lib.env import has_module

    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if calibration not in CALIBRATION_METHODS:
        raise ValueError(f"calibration {calibration!r}: expected one of {CALIBRATION_METHODS}")
    if out_onnx.suffix != ".onnx" or out_onnx.resolve() == fp32_onnx.resolve():
        raise ValueError(f"out_onnx {out_onnx}: expected a new .onnx path, not the fp32 model's")
    graph = load_graph(fp32_onnx).graph
    names = [n for group in exclude_nodes.values() for n in group] if isinstance(exclude_nodes, Mapping) \
        else list(exclude_nodes)
    unknown = sorted(set(names) - {n.name for n in graph.node})
    if unknown:
        raise ValueError(f"exclude_nodes: {len(unknown)} name(s) not in {fp32_onnx.name}, e.g. {unknown[0]!r}")
    names += [n.name for n in graph.node if n.op_type in set(exclude_op_types) and n.name not in names]
    method = ("modelopt" if has_module("modelopt") else "ort") if method == "auto" else method
    if high_precision not in ("fp32", "fp16") or (method == "ort" and high_precision != "fp32"):
        raise ValueError(f"high_precision {high_precision!r} with method {method!r}: expected 'fp32', or 'fp16' "
                         "with ModelOpt (for ORT's output, use chapter 3's FP16 conversion)")
    if method == "ort" and calibration == "entropy":
        raise ValueError("calibration='entropy' with ONNX Runtime: its entropy search is pure Python (~2 s per "
                         "tensor at TensorRT's 2048 bins; at quantize_static's fixed 128 bins it returns the max "
                         "range); use method='modelopt' (pip install nvidia-modelopt[onnx]) or calibration='max'")
    external = any(onnx.external_data_helper.uses_external_data(t) for t in graph.initializer) \
        or fp32_onnx.stat().st_size > 2**31 - 2**26
    if hasattr(reader, "rewind"):
        reader.rewind()

    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_onnx)
    start = time.perf_counter()
    try:
        tmp_onnx = tmp / out_onnx.name
        run = _quantize_modelopt if method == "modelopt" else _quantize_ort
        samples = run(fp32_onnx, tmp_onnx, reader, calibration, per_channel, op_types, exclude_op_types, names,
                      providers, external, high_precision, progress)
        report = check_qdq(tmp_onnx)
        if not report.passed:
            raise ValueError(f"{method} produced a Q/DQ model TensorRT would reject: {report.problems[0]} "
                             f"({len(report.problems)} problem(s))")
        result = QuantizeResult(out_onnx, method, calibration, samples, round(time.perf_counter() - start, 2),
                                tuple(names), report)
        sidecar = {"source": str(fp32_onnx), "method": method, "calibration": calibration, "samples": samples,
                   "per_channel": per_channel, "op_types": list(op_types or []), "excluded_nodes": names,
                   "high_precision": high_precision,
                   "ort_options": ORT_TRT_OPTIONS if method == "ort" else None, "versions": _versions(method),
                   "check": report.summary()}
        (tmp / (out_onnx.name + ".json")).write_text(json.dumps(sidecar, indent=1) + "\n")
        for f in tmp.iterdir():                       # .onnx last: a reader never sees it without its data
            if f.name != out_onnx.name:
                os.replace(f, out_onnx.parent / f.name)
        os.replace(tmp_onnx, out_onnx)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions(method: str) -> dict[str, str]:
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if method == "modelopt":
        import modelopt

        versions["modelopt"] = getattr(modelopt, "__version__", "unknown")
    return versions


def _progress_reader(reader, total: int | None, progress: bool):
    """The reader behind a tqdm bar that counts calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader
    from course_lib.progress import tqdm

    class Counting(CalibrationDataReader):
        def __init__(self):
            self.count, self.bar = 0, tqdm(total=total, desc="calibration", unit="sample", disable=not progress)

        def get_next(self):
            feed = reader.get_next()
            if feed is None:
                self.bar.close()
            else:
                self.count += 1
                self.bar.update()
            return feed

        def rewind(self):
            if hasattr(reader, "rewind"):
                reader.rewind()

    return Counting()


def _quantize_ort(fp32_onnx, out_onnx, reader, calibration, per_channel, op_types, exclude_op_types, names,
                  providers, external, high_precision, progress) -> int:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    try:
        total = len(reader)
    except (TypeError, NotImplementedError):          # ORT's base reader defines __len__ as "not implemented"
        total = None
    counted = _progress_reader(reader, total, progress)
    types = [t for t in op_types if t not in set(exclude_op_types)] if op_types else None
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)          # quantize_static logs a pre-processing hint on every call
    try:
        quantize_static(str(fp32_onnx), str(out_onnx), counted, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=types, per_channel=per_channel, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=names,
                        use_external_data_format=external, calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=list(providers) if providers else None,
                        extra_options=dict(ORT_TRT_OPTIONS))
    finally:
        root.setLevel(level)
    return counted.count


def _quantize_modelopt(fp32_onnx, out_onnx, reader, calibration, per_channel, op_types, exclude_op_types, names,
                       providers, external, high_precision, progress) -> int:
    from course_lib.env import require

    moq = require("modelopt.onnx.quantization", "INT8 quantization with ModelOpt (chapter 5)")
    if not per_channel:
        raise ValueError("per_channel=False: ModelOpt always quantizes weights per channel; use method='ort'")
    if not hasattr(reader, "as_arrays"):
        raise ValueError("reader: ModelOpt needs a CalibrationReader (its as_arrays() gives calibration_data)")
    data = reader.as_arrays()                           # {input name: samples stacked on the batch axis}
    eps = ["cuda:0", "cpu"] if providers and "CUDAExecutionProvider" in providers else ["cpu"]
    moq.quantize(str(fp32_onnx), quantize_mode="int8", calibration_data=data, calibration_method=calibration,
                 calibration_eps=eps, op_types_to_quantize=list(op_types) if op_types else None,
                 op_types_to_exclude=list(exclude_op_types) or None,
                 nodes_to_exclude=[f"^{re.escape(n)}$" for n in names] or None,   # ModelOpt matches regexes
                 use_external_data_format=external, output_path=str(out_onnx),
                 high_precision_dtype=high_precision, log_level="WARNING")
    return len(reader)

__all__ = ["CALIBRATION_METHODS", "INT8_OP_TYPES", "METHODS", "ORT_TRT_OPTIONS", "QDQReport", "QuantizeResult",
           "SENSITIVE_GROUPS", "check_qdq", "quantize_int8", "sensitive_nodes"]
