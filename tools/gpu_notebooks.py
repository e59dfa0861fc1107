"""Run the chapters' GPU cells on a GPU machine and bring their outputs home (issue #19).

On the GPU machine (no TensorRT needed; nbclient + ipykernel installed or carried as wheels):

    python tools/gpu_notebooks.py run --out DIR [--only 03_fp16_cudagraph ...] [--budget-s 300]

executes every chapter from its source the way ``build_notebooks.py`` does, except that a cell that raises
keeps its error and the chapter goes on, and writes ``DIR/<chapter>.ipynb`` plus ``DIR/gpu_cells.json``
(per hardware-tagged cell: ran, failed with which error, or not run here). Back on the authoring machine:

    python tools/gpu_notebooks.py merge --from DIR
    python tools/build_notebooks.py --keep-outputs-of-tagged

``merge`` copies the outputs of the hardware-tagged cells that ran *without an error* into the stored
notebooks (matched by source, as ``--keep-outputs-of-tagged`` matches them); the rebuild then re-runs every
CPU cell here and keeps those GPU outputs. A failed GPU cell keeps what it had before.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_notebooks as bn  # noqa: E402


def hardware_tagged(cell) -> bool:
    return cell.cell_type == "code" and any(t in bn.HARDWARE_TAGS for t in bn.cell_tags(cell))


def error_of(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"[:300]
    return None


def skipped_line(cell) -> str | None:
    """The %%needs magic's one line when the cell decided not to run here."""
    for out in cell.get("outputs", []):
        if "Skipped:" in "".join(out.get("text", "")):
            return "".join(out["text"]).strip()[:300]
    return None


def cmd_run(args) -> int:
    import nbformat

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(bn.REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["COURSE_PROGRESS"] = "off"
    have, demanded = bn.machine_capabilities()
    print(f"capabilities here: {', '.join(sorted(have)) or 'CPU only'}", flush=True)
    report, start = {"capabilities": sorted(have), "chapters": {}}, time.perf_counter()
    for name in args.only or bn.source_names():
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            report["chapters"][name] = {"skipped": f"budget spent ({args.budget_s:.0f} s)"}
            continue
        t0 = time.perf_counter()
        nb = bn.notebook_from_source(bn.SOURCES / f"{name}.py")
        plans = [bn.cell_plan(bn.cell_tags(c), have, demanded) if c.cell_type == "code" else ("run", "")
                 for c in nb.cells]
        try:
            bn.execute(nb, [what == "run" for what, _ in plans], cwd=bn.NOTEBOOKS, timeout=int(max(left, 20)),
                       allow_errors=True)
            status = "ran"
        except Exception as e:  # noqa: BLE001  (a cell timeout or a dead kernel: keep what ran)
            status = f"stopped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        cells = []
        for i, cell in enumerate(nb.cells):
            if hardware_tagged(cell):
                ran = cell.get("execution_count") is not None
                cells.append({"cell": bn.cell_name(nb, i), "ran": ran, "error": error_of(cell),
                              "skipped": skipped_line(cell)})
        bn.renumber(nb)
        nbformat.write(nb, str(out / f"{name}.ipynb"))
        report["chapters"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "cells": cells}
        ok = sum(c["ran"] and not c["error"] and not c["skipped"] for c in cells)
        print(f"{name}: {status} in {time.perf_counter() - t0:.0f} s; hardware cells ok {ok} / {len(cells)}", flush=True)
        for c in cells:
            if c["error"] or c["skipped"]:
                print(f"  {c['cell']}: {c['error'] or c['skipped']}", flush=True)
        (out / "gpu_cells.json").write_text(json.dumps(report, indent=1))
    return 0


def cmd_merge(args) -> int:
    import nbformat

    src = Path(getattr(args, "from"))
    merged = 0
    for ran_path in sorted(src.glob("*.ipynb")):
        stored_path = bn.NOTEBOOKS / ran_path.name
        if not stored_path.exists():
            print(f"{ran_path.name}: no stored notebook of that name; skipped")
            continue
        ran, stored = nbformat.read(ran_path, as_version=4), nbformat.read(stored_path, as_version=4)
        good: dict[str, list] = {}
        for cell in ran.cells:
            if hardware_tagged(cell) and cell.get("execution_count") is not None and not error_of(cell) \
                    and not skipped_line(cell):
                good.setdefault(bn.without_needs_line(cell.source), []).append(cell)
        count = 0
        for cell in stored.cells:
            if cell.cell_type == "code" and (match := good.get(bn.without_needs_line(cell.source))):
                kept = match.pop(0)
                cell.outputs, cell.execution_count = kept.outputs, kept.execution_count or 1
                count += 1
        nbformat.write(stored, str(stored_path))
        print(f"{ran_path.name}: {count} GPU cell(s) take the GPU run's outputs")
        merged += count
    print(f"{merged} cell(s) merged; now: python tools/build_notebooks.py --keep-outputs-of-tagged")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the chapters here (a GPU machine), errors kept, outputs to --out")
    r.add_argument("--out", required=True, help="folder for the executed notebooks and gpu_cells.json")
    r.add_argument("--only", action="append", default=[], metavar="NAME", help="a chapter, e.g. 03_fp16_cudagraph")
    r.add_argument("--budget-s", type=float, default=300.0, help="seconds for all chapters (default 300)")
    r.set_defaults(func=cmd_run)
    m = sub.add_parser("merge", help="copy the GPU cells' outputs of a run into the stored notebooks")
    m.add_argument("--from", required=True, help="the folder `run --out` wrote")
    m.set_defaults(func=cmd_merge)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
