"""The INT8 homework's tests (chapter 5): check_qdq re-run on the Q/DQ models, how much of each model is INT8,
the sidecar's recorded check, and ONNX Runtime's INT8 outputs against the fp32 reference.

Used by the homework submission and grading; see :mod:`course_lib.homework`.
"""
from __future__ import annotations

import json

import numpy as np

from course_lib.homework.evidence import Evidence, Verdict, contract_of, graph_io, onnx_graph, run_reference

INT8_MIN_COSINE = 0.98                 # INT8 outputs against the fp32 reference
INT8_MIN_SHARE = 0.5                   # of the Conv/MatMul/Gemm layers


def _int8_files(ev: Evidence) -> list[str]:
    names = sorted(p.name for p in ev.root.glob("*.int8.onnx"))
    if not names:
        ev.path("controlnet.int8.onnx")
    return names


def int8_qdq_rules(ev: Evidence) -> Verdict:
    """INT8: check_qdq re-run: INT8 Q/DQ with zero point 0, Q followed by DQ, standard domain, float biases."""
    from course_lib.precision.int8 import check_qdq
    for name in _int8_files(ev):
        report = check_qdq(ev.path(name))
        if not report.passed:
            first = report.problems[0] if report.problems else "no Q/DQ nodes"
            return False, f"{name}: {first} ({len(report.problems)} problem(s))"
    return True, f"{', '.join(_int8_files(ev))}: TensorRT's Q/DQ rules hold"


def int8_coverage(ev: Evidence) -> Verdict:
    """INT8: at least half of the Conv/ConvTranspose/MatMul/Gemm layers run in INT8."""
    from course_lib.precision.int8 import check_qdq
    shares = []
    for name in _int8_files(ev):
        r = check_qdq(ev.path(name))
        total = len(r.quantized_layers) + len(r.float_layers)
        shares.append((name, len(r.quantized_layers) / total if total else 0.0))
    low = [f"{n} {s:.0%}" for n, s in shares if s < INT8_MIN_SHARE]
    return not low, (f"too few INT8 layers: {', '.join(low)}" if low else
                     ", ".join(f"{n}: {s:.0%} of compute layers INT8" for n, s in shares))


def int8_sidecar(ev: Evidence) -> Verdict:
    """INT8: each sidecar's recorded check equals the check re-run on the file (consistency)."""
    from course_lib.precision.int8 import check_qdq
    for name in _int8_files(ev):
        recorded = (ev.json(name + ".json") or {}).get("check")
        again = json.loads(json.dumps(check_qdq(ev.path(name)).summary()))
        if recorded != again:
            return False, f"{name}.json: its check differs from check_qdq on the file (was the file changed?)"
    return True, "sidecar checks equal the re-run"


def int8_outputs(ev: Evidence) -> Verdict:
    """INT8: ONNX Runtime's outputs of the Q/DQ models follow the fp32 reference (cosine >= 0.98, finite)."""
    from course_lib.cnsd import example_inputs
    from course_lib.onnx.session import run_ort
    notes = []
    for name in _int8_files(ev):
        path = ev.with_weights(name)
        graph = onnx_graph(path)
        inputs, _ = graph_io(graph)
        model = "controlnet" if "hint" in inputs else "unet" if "control0" in inputs else None
        if model is None:
            return False, f"{name}: inputs {sorted(inputs)} are neither the ControlNet's nor the UNet's"
        reference = ev.reference()
        contract = contract_of(ev, model, graph)
        feed = example_inputs(contract, ev.input_seed)
        want = run_reference(reference, model, feed)
        got = run_ort(path, feed)
        worst = 1.0
        for out_name, ref in zip(contract.output_names, want):
            a, b = np.asarray(got[out_name], np.float64).ravel(), ref.double().numpy().ravel()
            if not np.isfinite(a).all():
                return False, f"{name}: {out_name} has NaN/Inf"
            worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        if worst < INT8_MIN_COSINE:
            return False, (f"{name}: worst output cosine similarity {worst:.4f} against fp32 "
                           f"(at least {INT8_MIN_COSINE})")
        notes.append(f"{name}: worst cosine {worst:.4f}")
    return True, "; ".join(notes) + " against the fp32 reference on fresh inputs"
