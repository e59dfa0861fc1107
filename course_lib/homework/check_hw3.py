"""Homework 3's check: is the q/k/v fusion of this model (or ONNX file) right?

Chapter 4 introduces :func:`check_hw3`. Each check is a named entry (name, passed, message), the unit
an autograder turns into one test:

=================== ==========================================================================
check               passes when
=================== ==========================================================================
state_dict_keys     the fused model saves exactly the unfused model's keys (to_q/to_k/to_v stay)
fused_layer_count   every self-attention layer has ``to_qkv``, every cross-attention ``to_kv``
                    (sd15: 23 + 23), decided by the layer's role, not by its sizes
fused_weights       each fused weight equals cat(to_q, to_k, to_v) / cat(to_k, to_v) of the loaded
                    weights, in that order (catches a wrong order and fusing before loading)
outputs             ControlNet and UNet outputs equal the unfused model's (fp32, rtol 1e-3, atol 1e-5)
matmul_count        (ONNX) the graph has the attention MatMuls a fused model predicts
onnx_outputs        (ONNX) ONNX Runtime's outputs equal the torch reference's (atol 1e-4)
=================== ==========================================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from course_lib.cnsd.attention import CrossAttention
from course_lib.cnsd.contract import contracts, example_inputs
from course_lib.cnsd.fusion import attention_layer_counts
from course_lib.onnx.attention_census import count_attention_matmuls, expected_matmul_counts

FUSED_MODELS = ("controlnet", "unet")           # the sub-models with attention layers


@dataclass(frozen=True)
class HW3Check:
    """One named check: did it pass, and why (one line)."""
    name: str
    passed: bool
    message: str

    def __str__(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name:<18} {self.message}"


@dataclass
class HW3Result:
    """All checks of one :func:`check_hw3` call; ``print(result)`` shows them, ``result["outputs"]`` one."""
    subject: str
    checks: list[HW3Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[HW3Check]:
        return [c for c in self.checks if not c.passed]

    def __getitem__(self, name: str) -> HW3Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}: the checks are {[c.name for c in self.checks]}")

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} of {len(self.checks)} checks)"
        return "\n".join([f"HW3 check of {self.subject}: {verdict}"] + [f"  {c}" for c in self.checks])


def check_hw3(candidate, reference: nn.Module | None = None, *, height: int = 64, width: int = 64,
              batch: int = 1, seed: int = 0, rtol: float = 1e-3, atol: float = 1e-5,
              onnx_atol: float = 1e-4) -> HW3Result:
    """Chapter 4: run homework 3's checks on a fused CNSD or on an exported fused ONNX file.

    Args:
        candidate: a CNSD (``build_cnsd``) with fused attention, or the path of a ControlNet / UNet
            ONNX file (the sub-model is recognised by its inputs: ``hint`` or ``control0``).
        reference: the unfused CNSD holding the loaded weights. For a model it may be left out: it is
            then built from the candidate's own ``state_dict`` (whose to_q/to_k/to_v are the loaded
            weights). For an ONNX file it is required (any CNSD with the weights that were exported).
        height, width, batch, seed: the example inputs (``contract.example_inputs``); an ONNX file with
            static shapes uses its own.
        rtol, atol: output tolerance (numpy.allclose), fp32: fused and unfused torch agree to the bit.
        onnx_atol: ``atol`` of ONNX Runtime vs torch. ORT's fp32 kernels round differently from torch's:
            the sd15 ControlNet at 256x384 differs by up to 6e-5 on outputs of size ~20, fused or not.
    Returns:
        :class:`HW3Result` with the checks of the module table above.
    """
    if isinstance(candidate, nn.Module):
        if not hasattr(candidate, "positional") or not hasattr(candidate, "config"):
            raise ValueError(f"candidate: expected a CNSD (build_cnsd) or an ONNX path, got {type(candidate).__name__}")
        return _check_model(candidate, reference, (batch, height, width), seed, rtol, atol)
    if isinstance(candidate, (str, os.PathLike)):
        if reference is None:
            raise ValueError("reference: checking an ONNX file needs the torch CNSD it was exported from")
        return _check_onnx(os.fspath(candidate), reference, (batch, height, width), seed, rtol, onnx_atol)
    raise ValueError(f"candidate: expected a CNSD or the path of an ONNX file, got {type(candidate).__name__}")


# --- a torch model ----------------------------------------------------------------------------------------

def _check_model(candidate, reference, size, seed, rtol, atol) -> HW3Result:
    from course_lib.cnsd.model import CNSD

    result = HW3Result(f"CNSD {candidate.config.name!r}")
    with torch.device("meta"):
        layout = CNSD(candidate.config)                        # the course's layout: structure only, no memory
    if reference is None:
        try:                                                   # unfused, sharing the candidate's tensors
            layout.load_state_dict(candidate.state_dict(), strict=True, assign=True)
            reference = layout
        except RuntimeError:                                   # other keys: the keys check says which
            reference = None
    elif any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in reference.modules()):
        raise ValueError("reference: expected the unfused model (it has to_qkv/to_kv layers)")
    layers = {path: m.is_self_attention for path, m in layout.named_modules() if isinstance(m, CrossAttention)}
    result.checks.append(_keys_check(list(candidate.state_dict()), list(layout.state_dict())))
    result.checks.append(_count_check(candidate, layers))
    if reference is None:
        why = "not run: no unfused reference can be built from a state_dict with other keys (pass reference=)"
        result.checks += [HW3Check("fused_weights", False, why), HW3Check("outputs", False, why)]
        return result
    result.checks.append(_weights_check(candidate, reference, layers))
    result.checks.append(_outputs_check(candidate, reference, size, seed, rtol, atol))
    return result


def _keys_check(got: list[str], expected: list[str]) -> HW3Check:
    got_set, expected_set = set(got), set(expected)
    missing, extra = [k for k in expected if k not in got_set], [k for k in got if k not in expected_set]
    if not missing and not extra:
        return HW3Check("state_dict_keys", True, f"{len(got)} keys, the same as the unfused model's")
    parts = ([f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []) + \
            ([f"{len(extra)} extra (e.g. {extra[0]!r})"] if extra else [])
    return HW3Check("state_dict_keys", False, ", ".join(parts) + ": keep to_q/to_k/to_v as the saved weights")


def _count_check(candidate: nn.Module, layers: dict[str, bool]) -> HW3Check:
    n_self = sum(layers.values())
    ok = {True: 0, False: 0}
    problems = []
    for path, is_self in layers.items():
        try:
            layer = candidate.get_submodule(path)
        except AttributeError:
            problems.append(f"{path!r} is missing")
            continue
        has_qkv, has_kv = hasattr(layer, "to_qkv"), hasattr(layer, "to_kv")
        if is_self and has_qkv and not has_kv or not is_self and has_kv and not has_qkv:
            ok[is_self] += 1
        elif not has_qkv and not has_kv:
            problems.append(f"{path!r} is not fused")
        else:
            want = "to_qkv (q, k and v all read x)" if is_self else "to_kv (q reads x, k and v the context)"
            problems.append(f"{'self' if is_self else 'cross'}-attention layer {path!r} needs {want}: "
                            "decide self/cross by is_self_attention, not by sizes")
    message = (f"{ok[True]}/{n_self} self-attention layers have to_qkv, "
               f"{ok[False]}/{len(layers) - n_self} cross-attention layers have to_kv")
    if problems:
        message += f"; {len(problems)} wrong, first: {problems[0]}"
    return HW3Check("fused_layer_count", not problems, message)


def _weights_check(candidate: nn.Module, reference: nn.Module, layers: dict[str, bool]) -> HW3Check:
    checked, bad = 0, []
    for path, is_self in layers.items():
        try:
            fused = getattr(candidate.get_submodule(path), "to_qkv" if is_self else "to_kv")
        except AttributeError:
            continue                                    # the layer count check reports it
        ref = reference.get_submodule(path)
        names = ("to_q", "to_k", "to_v") if is_self else ("to_k", "to_v")
        parts = {n: getattr(ref, n).weight.detach().float().cpu() for n in names}
        weight = getattr(fused, "weight", None)
        problem = ("has no .weight" if not isinstance(weight, torch.Tensor)
                   else _diagnose(weight.detach().float().cpu(), parts))
        checked += 1
        if problem:
            bad.append(f"{path}.{'to_qkv' if is_self else 'to_kv'}: {problem}")
    if not checked:
        return HW3Check("fused_weights", False, "no fused layer (to_qkv / to_kv) found")
    if bad:
        return HW3Check("fused_weights", False, f"{len(bad)} of {checked} fused weights are wrong, first: {bad[0]}")
    return HW3Check("fused_weights", True, f"{checked} fused weights equal cat(to_q, to_k, to_v) or cat(to_k, to_v) "
                                           "of the loaded weights")


def _diagnose(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> str | None:
    """None if ``weight`` is the row-wise concatenation of ``parts`` in order, else what it is instead."""
    expected = torch.cat(list(parts.values()))
    if weight.shape != expected.shape:
        return f"shape {tuple(weight.shape)}, expected {tuple(expected.shape)} = cat({', '.join(parts)})"
    if torch.equal(weight, expected):
        return None
    found = [next((n for n, w in parts.items() if torch.equal(chunk, w)), "?")
             for chunk in weight.split(expected.shape[0] // len(parts))]
    if "?" not in found:
        return f"rows hold [{', '.join(found)}], expected [{', '.join(parts)}]: wrong concatenation order"
    if set(found) == {"?"}:
        return "matches none of the loaded weights: fused before the checkpoint was loaded?"
    return f"rows hold [{', '.join(found)}] ('?' = none of the loaded weights), expected [{', '.join(parts)}]"


@torch.no_grad()
def _outputs_check(candidate, reference, size, seed, rtol, atol) -> HW3Check:
    from course_lib.onnx.compare import compare_outputs

    batch, height, width = size
    specs = contracts(candidate.config, batch, height, width)
    notes, passed = [], True
    for name in FUSED_MODELS:
        feed = example_inputs(specs[name], seed)
        got = _run(candidate.positional(name), feed)
        want = _run(reference.positional(name), feed)
        table = compare_outputs(dict(zip(specs[name].output_names, want)), dict(zip(specs[name].output_names, got)),
                                rtol, atol)
        passed &= table.passed
        worst = max(r.max_abs for r in table.rows)
        notes.append(f"{name} {len(table.rows) - len(table.failed)}/{len(table.rows)} outputs close "
                     f"(max abs err {worst:.1e})")
    return HW3Check("outputs", passed, f"{'; '.join(notes)} at {batch}x{height}x{width}, rtol={rtol:g} atol={atol:g}")


def _run(module: nn.Module, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    device = next(module.parameters()).device
    return tuple(t.cpu() for t in module(*(t.to(device) for t in feed.values())))


# --- an ONNX file -------------------------------------------------------------------------------------------

def _check_onnx(path: str, reference, size, seed, rtol, atol) -> HW3Result:
    import onnx

    from course_lib.onnx.compare import compare_outputs

    from course_lib.onnx.session import run_ort

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    graph = onnx.load(path, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    name = "controlnet" if "hint" in inputs else "unet" if "control0" in inputs else None
    if name is None:
        raise ValueError(f"{path}: inputs {sorted(inputs)} are neither the ControlNet's nor the UNet's")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs["x_noisy"].type.tensor_type.shape.dim]
    batch, height, width = (dims[0], dims[2] * 8, dims[3] * 8) if None not in dims else size
    result = HW3Result(f"{os.path.basename(path)} ({name})")

    found = count_attention_matmuls(path)
    expected = expected_matmul_counts(reference.config, name, fused=True)
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if found[k] != expected[k]]
    n_self, n_cross = attention_layer_counts(reference.config, name)
    ok_msg = (f"{expected['total']} attention MatMuls: {expected['self_projection']} self-attention projections "
              f"for {n_self} layers, {expected['cross_projection']} cross-attention projections for {n_cross} layers")
    result.checks.append(HW3Check("matmul_count", not wrong, ok_msg if not wrong else
                                  "not the fused graph: " + ", ".join(wrong)))

    spec = contracts(reference.config, batch, height, width)[name]
    feed = example_inputs(spec, seed)
    with torch.no_grad():
        want = _run(reference.positional(name), feed)
    table = compare_outputs(dict(zip(spec.output_names, want)), run_ort(path, feed), rtol, atol)
    worst = max(r.max_abs for r in table.rows)
    message = (f"{len(table.rows) - len(table.failed)}/{len(table.rows)} outputs close to torch (max abs err "
               f"{worst:.1e}) at {batch}x{height}x{width}, rtol={rtol:g} atol={atol:g}")
    result.checks.append(HW3Check("onnx_outputs", table.passed, message))
    return result
