"""Activation ranges: where would a model overflow (or underflow) in FP16?

Chapter 3 introduces this module. FP16 holds magnitudes up to 65504 and keeps full precision down to
6.1e-5 (its smallest normal number; below it values lose bits, below 6e-8 they become 0). Before
converting a model to FP16 (``course_lib.precision.fp16``) we run the FP32 model once in torch and record,
for every layer in execution order, the largest magnitude it produces. Three kinds of points are
recorded:

* ``output``: the output of every leaf module (Conv2d, Linear, GroupNorm, SiLU, ...);
* ``norm x^2``: for GroupNorm / LayerNorm, the largest squared deviation from the mean that the
  variance sums up -- it passes 65504 as soon as an input strays 256 from its mean, long before the
  output (which is normalised) looks large. That is why the FP16 ONNX keeps normalisation in FP32;
* ``softmax input``: the attention scores (every ``softmax`` call, and ``scaled_dot_product_attention``'s
  implicit scores), masks included: a causal mask of ``-inf`` or float32's minimum overflows FP16,
  the course's CLIP uses ``-1e4`` instead (``course_lib.cnsd.clip.MASK_VALUE``).

:func:`survey_ranges` returns a :class:`RangeTable`; :func:`plot_ranges` draws it (log scale, with the
FP16 limits as lines).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14          # 6.1035e-05
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class RangeRow:
    """One recorded point: ``name`` (module path), ``point`` (output / norm x^2 / softmax input).

    ``max_abs`` is the largest magnitude seen over all calls, ``min_abs`` the smallest non-zero one,
    ``tiny_fraction`` the share of non-zero elements below FP16's smallest normal, ``in_max_abs`` the
    largest magnitude among the module's float inputs (``output`` rows only, else NaN).
    """
    index: int
    name: str
    module_type: str
    point: str
    max_abs: float
    min_abs: float
    tiny_fraction: float
    in_max_abs: float
    calls: int

    @property
    def overflow(self) -> bool:
        """Larger than FP16's 65504, or already inf/NaN in FP32."""
        return not math.isfinite(self.max_abs) or self.max_abs > FP16_MAX

    @property
    def underflow(self) -> bool:
        """Non-zero, but every value lies below FP16's smallest normal (6.1e-5)."""
        return 0.0 < self.max_abs < FP16_MIN_NORMAL


@dataclass
class RangeTable:
    """The survey's rows in execution order; ``print(table)`` shows a fixed-width table."""
    rows: list[RangeRow]
    title: str = "activation ranges"

    @property
    def overflows(self) -> list[RangeRow]:
        return [r for r in self.rows if r.overflow]

    @property
    def underflows(self) -> list[RangeRow]:
        return [r for r in self.rows if r.underflow]

    def top(self, n: int = 10) -> RangeTable:
        """Chapter 3: the ``n`` rows with the largest ``max_abs`` (non-finite first), kept in execution order."""
        key = lambda r: math.inf if not math.isfinite(r.max_abs) else r.max_abs  # noqa: E731
        keep = {r.index for r in sorted(self.rows, key=key, reverse=True)[:n]}
        return RangeTable([r for r in self.rows if r.index in keep], f"{self.title}: top {n} by max |x|")

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["#", "layer", "type", "point", "max |x|", "min |x|>0", "< 6.1e-5", "fp16"]
        body = [[str(r.index), r.name or "(root)", r.module_type, r.point, f"{r.max_abs:.3e}",
                 "-" if math.isnan(r.min_abs) else f"{r.min_abs:.1e}", f"{r.tiny_fraction:.1%}",
                 "OVERFLOW" if r.overflow else ("UNDERFLOW" if r.underflow else "ok")] for r in self.rows]
        return headers, body

    def summary(self) -> str:
        return (f"{len(self.rows)} points; {len(self.overflows)} above {FP16_MAX:g}, "
                f"{len(self.underflows)} entirely below {FP16_MIN_NORMAL:.2g}")

    def __str__(self) -> str:
        headers, body = self._cells()
        widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([self.title, line(headers), line(["-" * w for w in widths])]
                         + [line(row) for row in body] + [self.summary()])

    def _repr_html_(self) -> str:
        import html

        headers, body = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        caption = html.escape(f"{self.title}: {self.summary()}")
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{rows}</table>"


class _Recorder:
    """Accumulates statistics per (module name, point), remembering the order of first appearance."""

    def __init__(self):
        self.stats: dict[tuple[str, str], dict] = {}
        self.stack: list[tuple[str, str]] = [("", "")]          # (name, type) of the modules being run

    def add(self, name: str, module_type: str, point: str, tensors, inputs=()) -> None:
        floats = [t.detach() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats:
            return
        a = torch.cat([t.reshape(-1).abs().float() for t in floats])
        nonzero = a[a > 0]
        s = self.stats.setdefault((name, point), dict(type=module_type, max=0.0, min=math.inf, tiny=0,
                                                      nonzero=0, in_max=math.nan, calls=0))
        s["max"] = max(s["max"], float(a.max()) if a.numel() else 0.0)
        if nonzero.numel():
            s["min"] = min(s["min"], float(nonzero.min()))
            s["tiny"] += int((nonzero < FP16_MIN_NORMAL).sum())
            s["nonzero"] += nonzero.numel()
        in_floats = [t.detach() for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if in_floats:
            m = max(float(t.abs().max()) for t in in_floats)
            s["in_max"] = m if math.isnan(s["in_max"]) else max(s["in_max"], m)
        s["calls"] += 1

    def table(self, title: str) -> RangeTable:
        rows = [RangeRow(i, name, s["type"], point, s["max"], s["min"] if s["nonzero"] else math.nan,
                         s["tiny"] / s["nonzero"] if s["nonzero"] else 0.0, s["in_max"], s["calls"])
                for i, ((name, point), s) in enumerate(self.stats.items())]
        return RangeTable(rows, title)


def _norm_square(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(x - mean)^2 over the groups (GroupNorm) or the normalised trailing dims (LayerNorm), in fp32."""
    x = x.detach().float()
    if isinstance(module, nn.GroupNorm):
        x = x.reshape(x.shape[0], module.num_groups, -1)
        dims: tuple[int, ...] = (-1,)
    else:
        dims = tuple(range(-len(module.normalized_shape), 0))
    return (x - x.mean(dim=dims, keepdim=True)).square()


class _SoftmaxSpy(TorchFunctionMode):
    """Records the input of every softmax (and the scores inside scaled_dot_product_attention)."""

    SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax}

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, module_type = self.recorder.stack[-1]
        if func in self.SOFTMAX:
            self.recorder.add(name, module_type, "softmax input", [args[0]])
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale           # (B, nh, N, M)
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            if isinstance(mask, torch.Tensor) and mask.is_floating_point():
                scores = scores + mask
            self.recorder.add(name, module_type, "softmax input", [scores])
        return func(*args, **kwargs)


def _as_args(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        return tuple(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise ValueError(f"inputs: expected a tensor, a tuple of tensors or a dict name -> tensor "
                     f"(in the forward's argument order), got {type(inputs).__name__}")


def survey_ranges(module: nn.Module, inputs, *, norm_statistics: bool = True, softmax_inputs: bool = True,
                  title: str | None = None) -> RangeTable:
    """Chapter 3: run ``module`` once and record the largest magnitude at every layer, in execution order.

    Args:
        module: an FP32 torch module (e.g. ``cnsd.positional("unet")``); it is run under ``no_grad``.
        inputs: a tensor, a tuple of tensors, or ``{name: tensor}`` in the forward's argument order
            (``example_inputs(contract)``); they are passed positionally.
        norm_statistics: add a ``norm x^2`` row for every GroupNorm / LayerNorm.
        softmax_inputs: add a ``softmax input`` row wherever softmax (or SDPA) runs.
        title: the table's title (default: the module's ``name`` attribute, else its class name).
    Returns:
        :class:`RangeTable`; ``.overflows`` are the rows above 65504 (or inf/NaN), ``.underflows`` the
        non-zero rows entirely below 6.1e-5. Hooks are removed afterwards, even on error.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(inputs)
    recorder = _Recorder()
    handles = []

    def enter(name, mod):
        def pre_hook(_m, _inputs):
            recorder.stack.append((name, type(mod).__name__))
            if norm_statistics and isinstance(mod, NORM_TYPES) and _inputs and isinstance(_inputs[0], torch.Tensor):
                recorder.add(name, type(mod).__name__, "norm x^2", [_norm_square(mod, _inputs[0])])
        return pre_hook

    def leave(name, mod, leaf):
        def hook(_m, _inputs, output):
            recorder.stack.pop()
            if leaf:
                outs = output if isinstance(output, (tuple, list)) else [output]
                recorder.add(name, type(mod).__name__, "output", outs, _inputs)
        return hook

    for name, mod in module.named_modules():
        leaf = next(mod.children(), None) is None
        handles.append(mod.register_forward_pre_hook(enter(name, mod)))
        handles.append(mod.register_forward_hook(leave(name, mod, leaf)))
    try:
        with torch.no_grad():
            if softmax_inputs:
                with _SoftmaxSpy(recorder):
                    module(*args)
            else:
                module(*args)
    finally:
        for h in handles:
            h.remove()
    name = getattr(module, "name", None)                 # CNSD.positional(...) modules carry their name
    return recorder.table(title or f"activation ranges of {name if isinstance(name, str) else type(module).__name__}")


def plot_ranges(table: RangeTable, ax=None, title: str | None = None):
    """Chapter 3: max |x| per recorded point (x: execution order, y: log scale) with FP16's limits.

    Points above 65504 are red; inf/NaN are drawn at the top edge as red crosses; all-zero points are
    left out (log scale). Returns the matplotlib Figure (size 10 x 4 inches unless ``ax`` is given).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 4))
    else:
        fig = ax.figure
    finite = [r.max_abs for r in table.rows if math.isfinite(r.max_abs) and r.max_abs > 0]
    top = max(finite + [FP16_MAX]) * 10
    markers = {"output": ("o", "tab:blue"), "norm x^2": ("s", "tab:orange"), "softmax input": ("^", "tab:green")}
    for point, (marker, color) in markers.items():
        rows = [r for r in table.rows if r.point == point and math.isfinite(r.max_abs) and r.max_abs > 0]
        if rows:
            ax.scatter([r.index for r in rows], [r.max_abs for r in rows], s=12, marker=marker, color=color,
                       label=point)
    over = [r for r in table.rows if r.overflow and math.isfinite(r.max_abs)]
    if over:
        ax.scatter([r.index for r in over], [r.max_abs for r in over], s=30, color="red", label="> fp16 max")
    bad = [r for r in table.rows if not math.isfinite(r.max_abs)]
    if bad:
        ax.scatter([r.index for r in bad], np.full(len(bad), top), s=40, marker="x", color="red", label="inf / NaN")
    ax.axhline(FP16_MAX, color="red", linestyle="--", linewidth=1)
    ax.axhline(FP16_MIN_NORMAL, color="gray", linestyle=":", linewidth=1)
    ax.text(0, FP16_MAX * 1.3, "fp16 max 65504", color="red", fontsize=8)
    ax.text(0, FP16_MIN_NORMAL * 1.3, "fp16 smallest normal 6.1e-5", color="gray", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(min(finite + [FP16_MIN_NORMAL]) / 10, top * 3)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("max |x|")
    ax.set_title(title or table.title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["FP16_MAX", "FP16_MIN_NORMAL", "RangeRow", "RangeTable", "plot_ranges", "survey_ranges"]
