"""Compare model outputs: parity tables (torch vs ONNX Runtime vs TensorRT) and layer-wise search.

Chapter 1 introduces :func:`compare_outputs` and :func:`check_onnx_against_torch` (is the exported ONNX the same function as the torch module?).
Chapters 2, 4 and 5 reuse the tables for engines and fused / INT8 models. Chapter 3 introduces
:func:`layerwise_compare`: run two versions of one graph (e.g. FP32 and FP16) with every tensor marked
as an output (Polygraphy) and name the first tensor, in graph order, whose values go bad.

Error measures, per output (computed in float64):

* ``max abs``  = max |candidate - reference|
* ``max rel``  = max |candidate - reference| / max |reference|, i.e. relative to the reference's scale
  (an element-wise ratio blows up wherever the reference crosses zero, and tells nothing there)
* ``allclose`` = every element satisfies |candidate - reference| <= atol + rtol * |reference|
  (numpy.allclose); NaN or Inf in either tensor, a shape mismatch or a missing output fail the row.
"""
from __future__ import annotations

import html
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from course_lib.onnx.session import ort_feed, ort_session, run_ort, to_numpy as _to_numpy



@dataclass(frozen=True)
class ComparisonRow:
    """One output (or one intermediate tensor) of one model compared with its reference."""
    name: str
    ref_shape: tuple
    cand_shape: tuple
    max_abs: float
    max_rel: float
    allclose: bool
    note: str = ""          # "shape mismatch", "NaN/Inf in candidate", "missing in candidate", ...
    model: str = ""         # the model (in a combined report) or the producing node (layer-wise)

    @property
    def passed(self) -> bool:
        return self.allclose and not self.note


@dataclass
class ComparisonTable:
    """Rows of a comparison; ``print(table)`` gives a fixed-width table, notebooks render HTML."""
    rows: list[ComparisonRow]
    rtol: float
    atol: float
    title: str = ""
    group_header: str = "model"

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failed(self) -> list[ComparisonRow]:
        return [r for r in self.rows if not r.passed]

    @classmethod
    def combine(cls, tables: Mapping[str, ComparisonTable], title: str = "") -> ComparisonTable:
        """Chapter 1: one report with a row per (model, output), e.g. ``{"clip": t1, "unet": t2}``."""
        rows = [replace(r, model=model) for model, table in tables.items() for r in table.rows]
        tols = {(t.rtol, t.atol) for t in tables.values()}
        rtol, atol = tols.pop() if len(tols) == 1 else (math.nan, math.nan)   # NaN: mixed tolerances
        return cls(rows, rtol, atol, title)

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        grouped = any(r.model for r in self.rows)
        headers = ([self.group_header] if grouped else []) + [
            "output", "shape", "max abs", "max rel", "allclose", "result"]
        body = []
        for r in self.rows:
            shape = "x".join(map(str, r.ref_shape)) if r.ref_shape == r.cand_shape else \
                f"{'x'.join(map(str, r.ref_shape))} vs {'x'.join(map(str, r.cand_shape))}"
            cells = [_num(r.max_abs), _num(r.max_rel), "yes" if r.allclose else "no",
                     "ok" if r.passed else ("FAIL" + (f": {r.note}" if r.note else ""))]
            body.append(([r.model] if grouped else []) + [r.name, shape or "()"] + cells)
        return headers, body

    def __str__(self) -> str:
        headers, body = self._cells()
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [self.title] if self.title else []
        out += [line(headers), line(["-" * w for w in widths])] + [line(row) for row in body]
        out.append(f"rtol={self.rtol:g} atol={self.atol:g}: " + ("PASSED" if self.passed else
                   f"FAILED ({len(self.failed)} of {len(self.rows)} rows)"))
        return "\n".join(out)

    __repr__ = __str__          # the table, not the dataclass fields, in a terminal or a notebook's text

    def _repr_html_(self) -> str:
        headers, body = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} of {len(self.rows)} rows)"
        caption = html.escape((self.title + " - " if self.title else "") + f"rtol={self.rtol:g} atol={self.atol:g}: {verdict}")
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{rows}</table>"


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3e}"


def compare_tensors(name: str, reference, candidate, rtol: float = 1e-3, atol: float = 1e-5) -> ComparisonRow:
    """Chapter 1: one :class:`ComparisonRow` for two arrays or tensors (see the module docstring)."""
    ref, cand = _to_numpy(reference), _to_numpy(candidate)
    if ref.shape != cand.shape:
        return ComparisonRow(name, ref.shape, cand.shape, math.nan, math.nan, False, "shape mismatch")
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    bad = [who for who, a in (("reference", ref64), ("candidate", cand64)) if not np.isfinite(a).all()]
    note = f"NaN/Inf in {' and '.join(bad)}" if bad else ""
    if ref64.size == 0:
        return ComparisonRow(name, ref.shape, cand.shape, 0.0, 0.0, True, note)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(cand64 - ref64)
        max_abs = float(np.nanmax(diff)) if not np.isnan(diff).all() else math.nan
        scale = float(np.nanmax(np.abs(ref64))) if not np.isnan(ref64).all() else math.nan
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        close = bool(np.allclose(cand64, ref64, rtol=rtol, atol=atol))
    return ComparisonRow(name, ref.shape, cand.shape, max_abs, max_rel, close, note)


def compare_outputs(reference: Mapping, candidate: Mapping, rtol: float = 1e-3, atol: float = 1e-5,
                    title: str = "") -> ComparisonTable:
    """Chapter 1: compare two ``{output_name: array or tensor}`` dicts, one row per reference output.

    Outputs missing from the candidate, or present only in the candidate, are failing rows.
    Returns a :class:`ComparisonTable` (``.passed``, ``.rows``, ``print(table)``).
    """
    rows = [compare_tensors(name, ref, candidate[name], rtol, atol) if name in candidate else
            ComparisonRow(name, tuple(_to_numpy(ref).shape), (), math.nan, math.nan, False, "missing in candidate")
            for name, ref in reference.items()]
    rows += [ComparisonRow(name, (), tuple(_to_numpy(c).shape), math.nan, math.nan, False, "not in reference")
             for name, c in candidate.items() if name not in reference]
    return ComparisonTable(rows, rtol, atol, title)


def check_onnx_against_torch(module, onnx_path, feed: Mapping, rtol: float = 1e-3, atol: float = 1e-5,
                             providers: Sequence[str] | None = None, title: str = "") -> ComparisonTable:
    """Chapter 1: run ``module(*feed.values())`` in torch and the ONNX model in ORT, and compare.

    ``feed`` is ``{input_name: torch.Tensor}`` in the module's argument order; the module returns a
    tensor, a tuple in the ONNX output order, or a dict by output name.
    """
    import torch

    session = ort_session(onnx_path, providers)
    names = [o.name for o in session.get_outputs()]
    with torch.no_grad():
        out = module(*feed.values())
    if isinstance(out, Mapping):
        reference = dict(out)
    else:
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if len(out) != len(names):
            raise ValueError(f"the module returned {len(out)} outputs, the ONNX model has {len(names)}: {names}")
        reference = dict(zip(names, out))
    return compare_outputs(reference, run_ort(session, feed), rtol, atol, title)


# --- layer-wise (chapter 3) -----------------------------------------------------------------------------

@dataclass
class LayerwiseComparison:
    """Every tensor two models share, in graph (topological) order; ``first_bad`` is the first failing one."""
    table: ComparisonTable
    producers: dict[str, str] = field(default_factory=dict)      # tensor name -> "OpType node_name"

    @property
    def first_bad(self) -> ComparisonRow | None:
        return next((r for r in self.table.rows if not r.passed), None)

    def __str__(self) -> str:
        bad = self.first_bad
        verdict = "every tensor within tolerance" if bad is None else \
            f"first tensor out of tolerance: {bad.name!r} from {self.producers.get(bad.name, '?')}"
        return f"{self.table}\n{verdict}"

    def _repr_html_(self) -> str:
        return self.table._repr_html_()


def _mark_all(path: Path, folder: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Polygraphy marks every tensor as an output; the copy is saved with external data (any size) for ORT."""
    import onnx

    poly_onnx = _require_polygraphy("backend.onnx")
    from polygraphy import constants

    model = poly_onnx.ModifyOutputs(poly_onnx.OnnxFromPath(str(path)), outputs=constants.MARK_ALL)()
    order, producers = [], {}
    for node in model.graph.node:                       # ONNX keeps nodes in topological order
        for out in node.output:
            if out:
                order.append(out)
                producers[out] = f"{node.op_type} {node.name}".strip()
    marked = folder / path.name
    onnx.save_model(model, str(marked), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return marked, producers, order


def _require_polygraphy(sub: str):
    from course_lib.env import require

    return require(f"polygraphy.{sub}", "the layer-wise comparison (chapter 3)")


def layerwise_compare(reference_onnx, candidate_onnx, feed: Mapping, rtol: float = 1e-3, atol: float = 1e-5,
                      providers: Sequence[str] | None = None,
                      candidate_providers: Sequence[str] | None = None) -> LayerwiseComparison:
    """Chapter 3: which layer goes bad first? Compare every intermediate tensor of two versions of a graph.

    Both models (e.g. the FP32 ONNX and its FP16 conversion; or one model on two providers, with
    ``candidate_onnx=reference_onnx``) get every tensor marked as an output (Polygraphy
    ``ModifyOutputs(outputs=MARK_ALL)``) and run in ONNX Runtime through Polygraphy's ``OnnxrtRunner``.
    Tensors present in both are compared in the reference graph's topological order; float inputs are
    cast to what the candidate expects (FP16 models without kept I/O types).
    Returns a :class:`LayerwiseComparison`; ``.first_bad`` names the first failing tensor.
    """
    onnxrt = _require_polygraphy("backend.onnxrt")
    from polygraphy.logger import G_LOGGER

    # Polygraphy prints "[I] Loading model ..." to stdout; keep its warnings and errors only
    with tempfile.TemporaryDirectory(prefix="layerwise-") as tmp, G_LOGGER.verbosity(G_LOGGER.WARNING):
        results, order, producers = [], [], {}
        for i, (onnx_path, prov) in enumerate([(reference_onnx, providers),
                                               (candidate_onnx, candidate_providers or providers)]):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            marked, prod, topo = _mark_all(Path(onnx_path), folder)
            if i == 0:
                order, producers = topo, prod
            session = ort_session(marked, prov)                     # checks providers, external data
            wants_fp16 = {inp.name for inp in session.get_inputs() if inp.type == "tensor(float16)"}
            typed = {name: _to_numpy(value) for name, value in feed.items()}
            typed = {name: a.astype(np.float16) if name in wants_fp16 and a.dtype == np.float32 else a
                     for name, a in typed.items()}
            with onnxrt.OnnxrtRunner(session) as runner:
                results.append(dict(runner.infer(ort_feed(session, typed))))
            del session
    reference, candidate = results
    rows = [replace(compare_tensors(name, reference[name], candidate[name], rtol, atol), model=producers[name])
            for name in order if name in reference and name in candidate]
    table = ComparisonTable(rows, rtol, atol, title="layer-wise comparison", group_header="producer")
    return LayerwiseComparison(table, producers)
