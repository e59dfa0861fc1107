"""Homework grading: a folder of submission zips -> one ``results.json`` per student and a class CSV.

The instructor's side of the homework submission (:mod:`course_lib.homework.submit`), on a CPU machine::

    python -m course_lib grade submissions/ --out results/ [--roster roster.csv]

For each zip: open it safely (:func:`course_lib.homework.safezip.safe_extract`: no path traversal, absolute paths,
links, oversize members; ONNX external data kept inside), verify every SHA-256 of the manifest, then re-run
each homework test (:mod:`course_lib.homework`) on inputs derived from the issued seed. A zip that fails
any of the opening steps is refused: its results say why in one line, and nothing is written outside
``--out`` (it is unpacked into a hidden folder there, removed afterwards).

``results/<student>/results.json`` uses the format autograders read (Gradescope's)::

    {"score": 16.0, "max_score": 16.0, "output": "...", "visibility": "visible",
     "tests": [{"name": "onnx_parity_unet", "score": 2.0, "max_score": 2.0, "status": "passed",
                "output": "...", "visibility": "hidden", "tags": ["re-checked"]}, ...],
     "extra_data": {"student": ..., "homework": ..., "seed": ..., "flags": [...], ...}}

``tags`` says how far to trust a test: "re-checked" (run again here), "consistency" (GPU numbers checked
for consistency), "trusted" (not re-checkable on CPU: the points follow the student's own run, flagged),
"not applicable" (0 of 0 points, e.g. engines in a CPU submission; ``require_gpu=True`` makes them count).
``results/summary.csv`` has one row per zip.

One zip never stops the class: each is graded in a process of its own (:mod:`course_lib.homework.isolate`:
forked from a helper that imported the grader once, so a fork costs milliseconds), under a wall-clock
limit (``timeout``, killed when over) and a memory limit (``max_memory_mb`` on top of what the process
starts with: ``RLIMIT_DATA``, so an allocation over it fails in that process only). Whatever happens there (an
exception of any kind, the limits, a crash) becomes that zip's row: status "refused" (the zip could not be
opened or is not what it says) or "error" (its grading failed), with the reason; the run goes on and
writes ``summary.csv``. A student ID that is one of the grader's own names (``summary.csv``) gets another
folder, with a flag.

This module runs the class (the job of each zip, its process, its results folder, the CSV); what that
process does with one zip -- open, verify, re-run, score -- is :mod:`course_lib.homework.grade_zip`.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from course_lib.files import atomic_write_text, temp_dir_beside
from course_lib.homework import FOLDERS, TESTS
# one zip's grading lives in grade_zip (the worker process runs it); its names are this module's API too
from course_lib.homework.grade_zip import (RESULTS_FORMAT, _failed, _grade_job, read_manifest,  # noqa: F401
                                          score_test)
from course_lib.homework.safezip import MAX_MEMORY_MB, TIMEOUT_S, ZipLimits
from course_lib.homework.submit import sanitize_student_id

RESERVED = ("summary.csv",)
"""The grader's own names in ``--out``: never a student's folder (compared ignoring case)."""

CSV_COLUMNS = ("student", "homework", "seed", "config", "score", "max_score", "percent", "status", "failed",
               "trusted", "flags", "gpu", "tensorrt", "zip", "zip_sha256", "results", "message")


def read_roster(path: str | Path) -> dict[str, int]:
    """Homework grading: ``{student: issued seed}`` from a CSV with the columns ``student`` and ``seed``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--roster {path}: no such file (expected a CSV with columns student,seed)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"student", "seed"} <= set(rows[0]):
        raise ValueError(f"--roster {path}: expected a CSV header with the columns student and seed")
    try:
        return {r["student"].strip(): int(r["seed"]) for r in rows}
    except ValueError as e:
        raise ValueError(f"--roster {path}: a seed is not an integer ({e})") from None


def _folder_name(manifest: dict | None, zip_path: Path) -> str:
    student = (manifest or {}).get("student")
    try:
        if isinstance(student, str):
            return sanitize_student_id(student)
    except ValueError:
        pass
    return re.sub(r"[^A-Za-z0-9._-]", "_", zip_path.stem).lstrip("._-")[:64] or "submission"


def grade_submission(zip_path: str | Path, out_dir: str | Path, *, roster: Mapping[str, int] | None = None,
                     salt: str = "", limits: ZipLimits = ZipLimits(), points: Mapping[str, float] | None = None,
                     require_gpu: bool = False, keep: bool = False, progress: bool = False,
                     timeout: float | None = TIMEOUT_S, max_memory_mb: float | None = MAX_MEMORY_MB,
                     isolate: bool = True, _taken: dict[str, str | None] | None = None) -> dict:
    """Homework grading: grade one submission zip; writes ``out_dir/<student>/results.json`` and returns it.

    Args:
        roster: ``{student: issued seed}``; the reference is rebuilt from the roster's seed (a student who
            hands in someone else's files fails the re-checks). Without it the manifest's seed is used.
        salt: a secret mixed into the seeds of the fresh inputs (:func:`~course_lib.homework.derive_seed`).
        limits: size limits of the zip. points: per-test points, overriding :data:`~course_lib.homework.TESTS`.
        require_gpu: GPU evidence (engines) counts; without it a CPU submission is graded on its CPU part.
        keep: keep the unpacked files in ``out_dir/<student>/files/``.
        timeout, max_memory_mb: wall-clock seconds and MB of memory this zip's grading may take (None: no
            limit); over either, the zip gets an "error" row saying which.
        isolate: grade in a process of its own (the limits need it; False grades here, for debugging).
    The results folder is the manifest's student ID (the zip's name when that is unusable or refused). Any
    failure of this zip's opening, checks or tests is its row (status refused or error), never an exception.
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    check_points(points)
    for name, value in (("timeout", timeout), ("max_memory_mb", max_memory_mb)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} {value!r}: expected a number > 0 (or None for no limit)")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = temp_dir_beside(out_dir / "unpack")            # inside --out, removed below (or by the next run)
    unpacked = work / "submission"
    # absolute paths: the grading process's working folder need not be ours
    job = dict(zip_path=os.path.abspath(zip_path), unpacked=os.path.abspath(unpacked),
               roster=dict(roster) if roster is not None else None,
               salt=salt, limits=asdict(limits), points=dict(points) if points else None, require_gpu=require_gpu,
               progress=progress and not isolate)
    try:
        if isolate:
            results = _grade_isolated(job, work / "result.json", timeout, max_memory_mb)
        else:
            results = _grade_job(job)
        x = results["extra_data"]
        name = _results_folder(x, zip_path, hw=x.get("homework"), taken=_taken)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        x["results"] = str(folder / "results.json")
        atomic_write_text(folder / "results.json", json.dumps(results, indent=1) + "\n")
        if keep and unpacked.is_dir():
            shutil.rmtree(folder / "files", ignore_errors=True)
            os.replace(unpacked, folder / "files")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _results_folder(x: dict, zip_path: Path, hw, taken: dict[str, str | None] | None) -> str:
    """The folder in ``--out`` for these results: the student ID, never one of :data:`RESERVED`; with
    ``taken`` ({folder: homework} of the zips graded before, this run) another homework's or zip's name."""
    name = student = _folder_name({"student": x["student"]}, zip_path)
    if name.lower() in RESERVED:
        name = f"{student}~{FOLDERS.get(hw, 'unread')}"     # ~ is in no ID and no zip stem: never a name above
        x["flags"].append(f"the student ID {student!r} is a name the grader writes itself: these results are "
                          f"in {name}")
    if taken is None:
        return name
    if name in taken and taken[name] != hw and hw in FOLDERS:
        name = f"{student}~{FOLDERS[hw]}"                   # the same student's other homework
    if name in taken:                                       # two ~ (IDs and zip stems have none): never a name above
        again = base = f"{student}~{FOLDERS.get(hw, 'unread')}~{_folder_name(None, zip_path)}"
        n = 2
        while again in taken:                               # the same zip name in two places, or a third copy
            again, n = f"{base}~{n}", n + 1
        what = f"zip of {x['student'] or name}'s homework {hw}" if hw in FOLDERS else f"submission for {name}"
        x["flags"].append(f"another {what} was graded first: these results are in {again}")
        name = again
    taken[name] = hw
    return name


# ------------------------------------------------------------------------------------------ isolation


def _grade_isolated(job: dict, result_path: Path, timeout: float | None, max_memory_mb: float | None) -> dict:
    """Grade ``job`` in a process of its own under the limits (:mod:`course_lib.homework.isolate`); its results,
    or an "error" results dict saying what happened. The grader's own disk filling up stops the run
    (OSError): no zip is to blame for it."""
    from course_lib.homework.isolate import EXIT_DISK_FULL, EXIT_MEMORY, run_isolated

    outcome = run_isolated("course_lib.homework.grade_zip._grade_job", [job], result_path, timeout=timeout,
                           max_memory_mb=max_memory_mb, preload=("course_lib.homework.grade_zip",))
    result = outcome.result
    if outcome.finished and isinstance(result, dict) and isinstance(result.get("extra_data"), dict):
        return result
    if outcome.exit_code == EXIT_DISK_FULL:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(result_path.parent.parent))
    if outcome.timed_out:
        why = f"grading took longer than the time limit of {timeout:g} s (grade --timeout raises it)"
    elif outcome.exit_code == EXIT_MEMORY:
        why = f"grading needed more than the memory limit of {max_memory_mb:g} MB (grade --max-memory-mb raises it)"
    else:
        why = f"the grading process {outcome.describe()}"
    return _failed(Path(job["zip_path"]), why, None, job["points"], status="error")


def check_points(points: Mapping[str, float] | None) -> None:
    """Homework grading: ``points`` names known tests and gives each a non-negative number (else ValueError)."""
    known = {t.name for tests in TESTS.values() for t in tests}
    for name, value in (points or {}).items():
        if name not in known:
            raise ValueError(f"--points: no test named {name!r}; the tests are {', '.join(sorted(known))}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ValueError(f"--points: {name} = {value!r}, expected a finite number >= 0")


def summary_row(results: dict) -> dict:
    """Homework grading: one CSV row (:data:`CSV_COLUMNS`) of a results dict."""
    x = results["extra_data"]
    tags = {t["name"]: t["tags"][0] for t in results["tests"]}
    return {"student": x.get("student"), "homework": x.get("homework"), "seed": x.get("seed"),
            "config": x.get("config"),
            "score": results["score"], "max_score": results["max_score"],
            "percent": round(100 * results["score"] / results["max_score"], 1) if results["max_score"] else 0.0,
            "status": "refused" if x.get("refused") else "error" if x.get("error") else "graded",
            "failed": ";".join(t["name"] for t in results["tests"] if t["status"] == "failed"),
            "trusted": ";".join(n for n, k in tags.items() if k == "trusted"), "flags": len(x.get("flags") or []),
            "gpu": (x.get("gpu") or {}).get("name") or "", "tensorrt": (x.get("versions") or {}).get("tensorrt") or "",
            "zip": x.get("zip"), "zip_sha256": x.get("zip_sha256"), "results": x.get("results"),
            "message": results["output"] if x.get("refused") or x.get("error") else ""}


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Homework grading: the class table as CSV (one row per zip), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    atomic_write_text(path, buffer.getvalue())
    return path


def grade_folder(submissions: str | Path, out_dir: str | Path, *, progress: bool = True, **options) -> list[dict]:
    """Homework grading: grade every ``*.zip`` in ``submissions`` (sorted), write ``out_dir/summary.csv``.

    ``options`` are :func:`grade_submission`'s (roster, salt, limits, points, require_gpu, keep, timeout,
    max_memory_mb, isolate). Every zip gets its row, whatever happens while it is graded. A student's
    other homework graded in the same run gets the folder ``<student>~<hw1|hw2|hw3|int8>``; a second zip of
    the same homework ``<student>~<hw1|...>~<zip name>`` (``~2``, ``~3``, ... if taken), and a flag. Returns the
    results, in order.
    """
    from course_lib.progress import tqdm

    submissions, out_dir = Path(submissions), Path(out_dir)
    if not submissions.is_dir():
        raise FileNotFoundError(f"{submissions}: no such folder (expected a folder of submission zips)")
    zips = sorted(p for p in submissions.iterdir() if p.suffix.lower() == ".zip")
    if not zips:
        raise FileNotFoundError(f"{submissions}: no .zip files in it")
    if out_dir.resolve() == submissions.resolve() or submissions.resolve() in out_dir.resolve().parents:
        raise ValueError(f"--out {out_dir}: expected a folder outside the submissions folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file: expected a folder (it is created if missing)")
    check_points(options.get("points"))                 # a bad --points file is one error, before any grading
    taken: dict[str, str | None] = {}
    all_results = [grade_submission(z, out_dir, _taken=taken, **options)
                   for z in tqdm(zips, desc="grading", unit="zip", disable=not progress)]
    write_summary([summary_row(r) for r in all_results], out_dir / "summary.csv")
    return all_results
