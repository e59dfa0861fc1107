"""Homework 3's tests (chapter 4): the fused ONNX graphs' MatMul counts, the fused weights against the
concatenated loaded weights (wrong order, fused before loading), ONNX Runtime against the unfused reference.

Used by the homework submission and grading; see :mod:`course_lib.homework` (and :func:`course_lib.homework.check_hw3.check_hw3`,
whose checks these reuse).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from course_lib.homework.evidence import Evidence, NotApplicable, Verdict, strict_fp32



def matmul_count_test(name: str) -> Callable[[Evidence], Verdict]:
    def matmul_count(ev: Evidence) -> Verdict:
        from course_lib.cnsd import get_config
        from course_lib.onnx.attention_census import count_attention_matmuls, expected_matmul_counts
        found = count_attention_matmuls(ev.path(f"onnx/{name}.onnx"))
        expected = expected_matmul_counts(get_config(ev.config), name, fused=True)
        wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if found[k] != expected[k]]
        return not wrong, ("not the fused graph: " + ", ".join(wrong)) if wrong else \
            f"{expected['total']} attention MatMuls, as a fused {name} has"
    matmul_count.__doc__ = f"HW3: the fused {name} ONNX has one q/k/v MatMul per self-attention layer, two per cross."
    return matmul_count


@functools.lru_cache(maxsize=2)
def _attention_layers(config_name: str) -> dict[str, bool]:
    import torch
    from course_lib.cnsd import get_config
    from course_lib.cnsd.attention import CrossAttention
    from course_lib.cnsd.model import CNSD
    with torch.device("meta"):
        layout = CNSD(get_config(config_name))
    return {p: m.is_self_attention for p, m in layout.named_modules() if isinstance(m, CrossAttention)}


def _fused_file(ev: Evidence) -> dict:
    if "fused" not in ev._cache:
        from safetensors.torch import load_file
        ev._cache["fused"] = load_file(str(ev.with_weights("fused_qkv.safetensors")), device="cpu")
    return ev._cache["fused"]


def hw3_fused_layers(ev: Evidence) -> Verdict:
    """HW3: fused_qkv.safetensors has to_q/to_k/to_v and to_qkv (self) or to_kv (cross) of every layer."""
    tensors, layers = _fused_file(ev), _attention_layers(ev.config)
    for path, is_self in layers.items():
        for part in ("to_q", "to_k", "to_v", "to_qkv" if is_self else "to_kv"):
            if f"{path}.{part}.weight" not in tensors:
                return False, f"{path}.{part}.weight is not in fused_qkv.safetensors"
    n_self = sum(layers.values())
    return True, f"{n_self} self-attention layers with to_qkv, {len(layers) - n_self} cross-attention with to_kv"


def hw3_loaded_weights(ev: Evidence) -> Verdict:
    """HW3: the to_q/to_k/to_v weights handed in are the reference's (the seed's "checkpoint")."""
    import torch
    tensors, state = _fused_file(ev), ev.reference().state_dict()
    keys = [f"{p}.{part}.weight" for p in _attention_layers(ev.config) for part in ("to_q", "to_k", "to_v")]
    bad = [k for k in keys if k not in tensors or not torch.equal(tensors[k].float(), state[k].float().cpu())]
    if bad:
        return False, (f"{len(bad)} of {len(keys)} to_q/to_k/to_v weights differ from the {ev.reference_label} "
                       f"model's, e.g. {bad[0]}")
    return True, f"{len(keys)} to_q/to_k/to_v weights are the {ev.reference_label} model's"


def fused_weight_problem(weight, parts: dict) -> str | None:
    """None when ``weight`` is cat(``parts``) row-wise in that order, else what it holds instead."""
    import torch
    expected = torch.cat(list(parts.values()))
    if weight.shape != expected.shape:
        return f"shape {tuple(weight.shape)}, expected {tuple(expected.shape)} = cat({', '.join(parts)})"
    if torch.equal(weight, expected):
        return None
    found = [next((n for n, w in parts.items() if torch.equal(chunk, w)), "?") for chunk in weight.chunk(len(parts))]
    if "?" not in found:
        return f"rows hold [{', '.join(found)}], expected [{', '.join(parts)}]: wrong concatenation order"
    if set(found) == {"?"}:
        return "matches none of the loaded weights: fused before the checkpoint was loaded?"
    return f"rows hold [{', '.join(found)}] ('?': none of the loaded weights), expected [{', '.join(parts)}]"


def hw3_fused_weights(ev: Evidence) -> Verdict:
    """HW3: each fused weight is cat(to_q, to_k, to_v) / cat(to_k, to_v) of the loaded weights, in order."""
    tensors, state = _fused_file(ev), ev.reference().state_dict()
    layers, bad = _attention_layers(ev.config), []
    for path, is_self in layers.items():
        key = f"{path}.{'to_qkv' if is_self else 'to_kv'}.weight"
        if key not in tensors:
            return False, f"{key} is not in fused_qkv.safetensors"
        parts = {n: state[f"{path}.{n}.weight"].float().cpu() for n in (("to_q",) if is_self else ()) + ("to_k", "to_v")}
        problem = fused_weight_problem(tensors[key].float(), parts)
        if problem:
            bad.append(f"{key}: {problem}")
    if bad:
        return False, f"{len(bad)} of {len(layers)} fused weights are wrong, first: {bad[0]}"
    return True, (f"{len(layers)} fused weights equal cat(to_q, to_k, to_v) or cat(to_k, to_v) "
                  f"of the {ev.reference_label} weights")


def onnx_outputs_test(name: str) -> Callable[[Evidence], Verdict]:
    def onnx_outputs(ev: Evidence) -> Verdict:
        from course_lib.homework.check_hw3 import check_hw3
        path = str(ev.with_weights(f"onnx/{name}.onnx"))
        with strict_fp32():
            check = check_hw3(path, ev.reference(), seed=ev.input_seed)["onnx_outputs"]
        return check.passed, check.message
    onnx_outputs.__doc__ = f"HW3: ONNX Runtime runs the fused {name} like the unfused reference (fresh inputs)."
    return onnx_outputs


def hw3_timing(ev: Evidence) -> Verdict:
    """HW3 (optional): the fused/unfused medians in timing.json are those of its raw samples."""
    if not (ev.root / "timing.json").is_file():
        raise NotApplicable("no timing.json handed in")
    t = ev.json("timing.json")
    for key in ("unfused", "fused"):
        raw = t.get(f"{key}_samples") or []
        if not raw or not math.isclose(float(np.median(raw)), t.get(f"{key}_ms", math.nan), rel_tol=1e-6):
            return False, f"timing.json: {key}_ms {t.get(f'{key}_ms')} is not the median of its {len(raw)} samples"
    return True, (f"{t.get('model_name')}: unfused {t['unfused_ms']:.2f} ms, fused {t['fused_ms']:.2f} ms "
                  "(medians of raw samples)")
