"""Homework 2's tests (chapter 2): TensorRT timings from the student's GPU, checked for consistency -- every
engine at levels 0/3/5 with and without a CUDA graph, raw samples kept, summaries recomputed from them,
graph on/off ordering plausible, plan sidecars agreeing with the manifest. Nothing here can be re-run on CPU.

Used by the homework submission and grading; see :mod:`course_lib.homework`.
"""
from __future__ import annotations

import math

from course_lib.homework.evidence import MODELS, Evidence, Verdict

HW2_LEVELS = (0, 3, 5)                 # builder_optimization_level the homework asks for
MIN_SAMPLES = 10                       # raw timing samples per measurement
GRAPH_SLOWER_TOLERANCE = 0.10          # a CUDA graph may look up to 10 % slower (noise), not more


def _records(ev: Evidence) -> list[dict]:
    records = ev.json("hw2.json")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("hw2.json: expected a list of records (hw2_sweep's output)")
    return records


def hw2_records(ev: Evidence) -> Verdict:
    """HW2: every engine at optimization levels 0, 3 and 5, each with and without a CUDA graph."""
    have = {(r.get("model"), r.get("opt_level"), bool(r.get("cuda_graph"))) for r in _records(ev)}
    missing = [f"{m} O{lv} graph {'on' if g else 'off'}" for m in MODELS for lv in HW2_LEVELS for g in (False, True)
               if (m, lv, g) not in have]
    if missing:
        return False, f"{len(missing)} measurements missing, e.g. {missing[0]}"
    return True, f"{len(MODELS) * len(HW2_LEVELS) * 2} measurements: 4 engines x levels {HW2_LEVELS} x graph off/on"


def hw2_raw_samples(ev: Evidence) -> Verdict:
    """HW2: each measurement keeps its raw per-iteration samples (at least 10 finite positive ms)."""
    for r in _records(ev):
        raw, where = (r.get("latency") or {}).get("raw"), f"{r.get('model')} O{r.get('opt_level')}"
        if not isinstance(raw, list) or len(raw) < MIN_SAMPLES:
            count = len(raw) if isinstance(raw, list) else 0
            return False, f"{where}: {count} raw samples, expected >= {MIN_SAMPLES}"
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in raw):
            return False, f"{where}: raw samples must be finite positive milliseconds"
        if r["latency"].get("n") != len(raw):
            return False, f"{where}: n={r['latency'].get('n')} but {len(raw)} raw samples"
    return True, f"{len(_records(ev))} measurements with raw samples"


def summary_mismatch(summary: dict, raw) -> str | None:
    """None when ``summary``'s median, p10, p90, min, max and mean are those of ``raw``, else which differs."""
    from course_lib.timing import summarize
    again = summarize(raw)
    for key in ("median", "p10", "p90", "min", "max", "mean"):
        value = summary.get(key)
        if not isinstance(value, (int, float)) or not math.isclose(value, again[key], rel_tol=1e-6, abs_tol=1e-9):
            return f"{key} {summary.get(key)} but the raw samples give {again[key]:.4g}"
    return None


def hw2_summaries(ev: Evidence) -> Verdict:
    """HW2: medians and spreads recomputed from the raw samples equal the reported ones."""
    records = _records(ev)
    for r in records:
        problem = summary_mismatch(r.get("latency") or {}, (r.get("latency") or {}).get("raw") or [0.0])
        if problem:
            return False, f"{r.get('model')} O{r.get('opt_level')} graph {bool(r.get('cuda_graph'))}: {problem}"
    return True, f"median, p10, p90, min, max, mean of {len(records)} measurements recomputed from raw samples"


def hw2_graph_ordering(ev: Evidence) -> Verdict:
    """HW2: with a CUDA graph an engine is not slower (median, 10 % tolerance for noise)."""
    pairs: dict = {}
    for r in _records(ev):
        pairs.setdefault((r.get("model"), r.get("opt_level")), {})[bool(r.get("cuda_graph"))] = r["latency"]["median"]
    worse = [f"{m} O{lv}: {p[True]:.2f} ms with, {p[False]:.2f} ms without" for (m, lv), p in pairs.items()
             if len(p) == 2 and p[True] > p[False] * (1 + GRAPH_SLOWER_TOLERANCE)]
    if worse:
        return False, f"a CUDA graph made {len(worse)} engine(s) slower, e.g. {worse[0]}"
    return True, f"{sum(len(p) == 2 for p in pairs.values())} engine/level pairs: graph on <= graph off (+10 %)"


def hw2_plans(ev: Evidence) -> Verdict:
    """HW2: a plan sidecar per engine and level, at that level, with the manifest's TensorRT and GPU."""
    from course_lib.trt.plan import PlanSidecar
    tensorrt = (ev.machine.get("versions") or {}).get("tensorrt")
    levels = {(r.get("model"), r.get("opt_level")) for r in _records(ev)}
    for model, level in sorted(levels, key=str):
        rel = f"O{level}/{model}.plan.json"
        side = PlanSidecar.from_dict(ev.json(rel), source=rel)
        if side.builder_optimization_level != level or side.tensorrt != tensorrt or side.gpu != ev.gpu:
            return False, (f"{rel}: level {side.builder_optimization_level}, {side.describe()}; "
                           f"expected level {level}, TensorRT {tensorrt} on {ev.gpu}")
    return True, f"{len(levels)} plan sidecars agree with the measurements and the manifest (TensorRT {tensorrt})"
