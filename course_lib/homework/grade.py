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
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from course_lib.files import atomic_write_text, sha256_file
from course_lib.homework import FOLDERS, HOMEWORKS, TESTS, Evidence, derive_seed, run_tests
from course_lib.homework.safezip import (UnsafeSubmission, ZipLimits, check_external_data, check_file_types, safe_extract,
                      verify_hashes)
from course_lib.homework.submit import FORMAT, sanitize_student_id

RESULTS_FORMAT = "course_lib.homework.grade/1"
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


def read_manifest(root: Path) -> dict:
    """Homework grading: the unpacked zip's manifest.json, checked field by field (UnsafeSubmission if bad)."""
    path = root / "manifest.json"
    if not path.is_file():
        raise UnsafeSubmission("the zip has no manifest.json: make it with python -m course_lib submit")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsafeSubmission(f"manifest.json is not valid JSON ({e})") from None
    problems = [] if isinstance(manifest, dict) else ["not a JSON object"]
    if not problems:
        checks = (("format", lambda v: v == FORMAT), ("homework", lambda v: v in HOMEWORKS),
                  ("student", lambda v: isinstance(v, str)), ("config", lambda v: v in ("tiny", "sd15")),
                  ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                  ("files", lambda v: isinstance(v, dict)), ("versions", lambda v: isinstance(v, dict)),
                  ("gpu", lambda v: isinstance(v, dict)), ("stripped", lambda v: isinstance(v, dict)))
        problems = [f"{key}={manifest.get(key)!r}" for key, ok in checks if not ok(manifest.get(key))]
    if problems:
        raise UnsafeSubmission(f"manifest.json: unexpected {', '.join(problems)[:200]} (format {FORMAT})")
    if manifest["config"] == "tiny" and manifest["stripped"]:          # only sd15 may leave weights out
        raise UnsafeSubmission("manifest.json: a tiny-preset submission lists files without their weights "
                               f"({', '.join(sorted(manifest['stripped']))[:120]}); tiny files are re-checked whole")
    return manifest


def _folder_name(manifest: dict | None, zip_path: Path) -> str:
    student = (manifest or {}).get("student")
    try:
        if isinstance(student, str):
            return sanitize_student_id(student)
    except ValueError:
        pass
    return re.sub(r"[^A-Za-z0-9._-]", "_", zip_path.stem).lstrip("._-")[:64] or "submission"


def _open(zip_path: Path, dest: Path, limits: ZipLimits) -> tuple[dict, dict]:
    """Unpack and verify; returns (manifest, claims by test name). Raises UnsafeSubmission."""
    safe_extract(zip_path, dest, limits)
    manifest = read_manifest(dest)
    verify_hashes(dest, manifest["files"])
    check_file_types(dest, manifest["files"])
    artifacts = dest / "artifacts"
    for name in manifest["files"]:
        if name.endswith(".onnx"):
            stripped = name.removeprefix("artifacts/") in manifest["stripped"]
            check_external_data(dest / name, artifacts, must_exist=not stripped)
    claims = json.loads((dest / "checks.json").read_text()) if (dest / "checks.json").is_file() else {}
    tests = claims.get("tests", []) if isinstance(claims, dict) else []
    return manifest, {t["name"]: t for t in tests if isinstance(t, dict) and isinstance(t.get("name"), str)}


def score_test(spec, outcome, claim: dict | None, points: float, require_gpu: bool, flags: list[str]) -> dict:
    """Homework grading: one results.json test entry from a test's outcome, the student's own result and its points."""
    status, output, kind, max_score = outcome.status, outcome.output, spec.kind, float(points)
    claimed = claim.get("status") if claim else None
    if status == "not re-checkable":
        kind = "trusted"
        ok = claimed == "passed"
        output += f"; trusted from the student's own run: {claimed or 'no result'}" + \
            (f" ({claim.get('output', '')})" if claim else "")
        status = "passed" if ok else "failed"
        flags.append(f"{spec.name}: trusted (not re-checkable on CPU)")
    elif status == "not applicable":
        if spec.gpu and require_gpu:
            status, output = "failed", f"GPU evidence required: {output}"
        else:
            kind, max_score, status = "not applicable", 0.0, "passed"
    elif claimed in ("passed", "failed") and claimed != status:
        flags.append(f"{spec.name}: the student's run said {claimed}, the re-check {status}")
        output += f" (the student's own run said: {claimed})"
    score = max_score if status == "passed" else 0.0
    return {"name": spec.name, "score": score, "max_score": max_score, "status": status, "output": output,
            "visibility": spec.visibility, "tags": [kind]}


def grade_submission(zip_path: str | Path, out_dir: str | Path, *, roster: Mapping[str, int] | None = None,
                     salt: str = "", limits: ZipLimits = ZipLimits(), points: Mapping[str, float] | None = None,
                     require_gpu: bool = False, keep: bool = False, progress: bool = False,
                     _taken: dict[str, str | None] | None = None) -> dict:
    """Homework grading: grade one submission zip; writes ``out_dir/<student>/results.json`` and returns it.

    Args:
        roster: ``{student: issued seed}``; the reference is rebuilt from the roster's seed (a student who
            hands in someone else's files fails the re-checks). Without it the manifest's seed is used.
        salt: a secret mixed into the seeds of the fresh inputs (:func:`~course_lib.homework.derive_seed`).
        limits: size limits of the zip. points: per-test points, overriding :data:`~course_lib.homework.TESTS`.
        require_gpu: GPU evidence (engines) counts; without it a CPU submission is graded on its CPU part.
        keep: keep the unpacked files in ``out_dir/<student>/files/``.
    The results folder is the manifest's student ID (the zip's name when that is unusable or refused).
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    check_points(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=out_dir))          # inside --out, removed below
    unpacked = work / "submission"
    try:
        results = _grade(zip_path, unpacked, roster, salt, limits, points, require_gpu, progress)
        x = results["extra_data"]
        name = student = _folder_name({"student": x["student"]}, zip_path)
        if _taken is not None:                      # {folder: homework} of the zips graded before, this run
            hw = x.get("homework")
            if name in _taken and _taken[name] != hw and hw in FOLDERS:
                name = f"{student}~{FOLDERS[hw]}"   # the same student's other homework
            if name in _taken:                      # two ~ (IDs and zip stems have none): never a name above
                again = base = f"{student}~{FOLDERS.get(hw, 'unread')}~{_folder_name(None, zip_path)}"
                n = 2
                while again in _taken:              # the same zip name in two places, or a third copy
                    again, n = f"{base}~{n}", n + 1
                what = f"zip of {x['student'] or name}'s homework {hw}" if hw in FOLDERS else f"submission for {name}"
                x["flags"].append(f"another {what} was graded first: these results are in {again}")
                name = again
            _taken[name] = hw
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


def check_points(points: Mapping[str, float] | None) -> None:
    """Homework grading: ``points`` names known tests and gives each a non-negative number (else ValueError)."""
    known = {t.name for tests in TESTS.values() for t in tests}
    for name, value in (points or {}).items():
        if name not in known:
            raise ValueError(f"--points: no test named {name!r}; the tests are {', '.join(sorted(known))}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ValueError(f"--points: {name} = {value!r}, expected a finite number >= 0")


def _grade(zip_path: Path, unpacked: Path, roster, salt, limits, points, require_gpu, progress) -> dict:
    manifest, flags = None, []
    try:
        manifest, claims = _open(zip_path, unpacked, limits)
    except UnsafeSubmission as e:
        if (unpacked / "manifest.json").is_file():
            try:
                manifest = read_manifest(unpacked)
            except UnsafeSubmission:
                pass
        return _refused(zip_path, str(e), manifest, points)
    hw, student, seed = manifest["homework"], manifest["student"], manifest["seed"]
    issued = None if roster is None else roster.get(student)
    if roster is not None and issued is None:
        flags.append(f"student {student!r} is not in the roster: the manifest's seed was used")
    used = seed if issued is None else issued
    ev = Evidence(hw, unpacked / "artifacts", used, manifest["config"], manifest,
                  input_seed=derive_seed(used, "grader", salt), claimed_seed=None if issued is None else seed,
                  stripped=frozenset(manifest["stripped"]), originals=dict(manifest["stripped"]),
                  providers=("CPUExecutionProvider",))
    outcomes = run_tests(ev, progress=progress)
    tests = [score_test(spec, o, claims.get(spec.name), (points or {}).get(spec.name, spec.points), require_gpu, flags)
             for spec, o in zip(TESTS[hw], outcomes)]
    score, max_score = sum(t["score"] for t in tests), sum(t["max_score"] for t in tests)
    return {"score": score, "max_score": max_score, "visibility": "visible", "stdout_visibility": "hidden",
            "output": f"homework {hw} of {student} (seed {used}, {manifest['config']}): {score:g}/{max_score:g}"
                      + (f"; {len(flags)} flag(s): " + "; ".join(flags) if flags else ""),
            "tests": tests, "extra_data": _extra(zip_path, manifest, used, flags, refused=False)}


def _extra(zip_path: Path, manifest: dict | None, seed, flags: list[str], refused: bool) -> dict:
    m = manifest or {}
    return {"format": RESULTS_FORMAT, "student": m.get("student"), "homework": m.get("homework"), "seed": seed,
            "config": m.get("config"), "created": m.get("created"), "versions": m.get("versions"),
            "gpu": m.get("gpu"), "zip": zip_path.name,
            "zip_sha256": sha256_file(zip_path) if zip_path.is_file() and not zip_path.is_symlink() else None,
            "flags": flags, "refused": refused}


def _refused(zip_path: Path, message: str, manifest: dict | None, points) -> dict:
    hw = (manifest or {}).get("homework")
    max_score = float(sum((points or {}).get(s.name, s.points) for s in TESTS[hw] if not s.gpu)) if hw in TESTS else 0.0
    text = f"refused {zip_path.name}: {message}"
    return {"score": 0.0, "max_score": max_score, "visibility": "visible", "output": text,
            "tests": [{"name": "submission_opened", "score": 0.0, "max_score": max_score, "status": "failed",
                       "output": text, "visibility": "visible", "tags": ["refused"]}],
            "extra_data": _extra(zip_path, manifest, (manifest or {}).get("seed"), [], refused=True)}


def summary_row(results: dict) -> dict:
    """Homework grading: one CSV row (:data:`CSV_COLUMNS`) of a results dict."""
    x = results["extra_data"]
    tags = {t["name"]: t["tags"][0] for t in results["tests"]}
    return {"student": x.get("student"), "homework": x.get("homework"), "seed": x.get("seed"),
            "config": x.get("config"),
            "score": results["score"], "max_score": results["max_score"],
            "percent": round(100 * results["score"] / results["max_score"], 1) if results["max_score"] else 0.0,
            "status": "refused" if x.get("refused") else "graded",
            "failed": ";".join(t["name"] for t in results["tests"] if t["status"] == "failed"),
            "trusted": ";".join(n for n, k in tags.items() if k == "trusted"), "flags": len(x.get("flags") or []),
            "gpu": (x.get("gpu") or {}).get("name") or "", "tensorrt": (x.get("versions") or {}).get("tensorrt") or "",
            "zip": x.get("zip"), "zip_sha256": x.get("zip_sha256"), "results": x.get("results"),
            "message": results["output"] if x.get("refused") else ""}


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

    ``options`` are :func:`grade_submission`'s (roster, salt, limits, points, require_gpu, keep). A student's
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
    check_points(options.get("points"))                 # a bad --points file is one error, before any grading
    taken: dict[str, str | None] = {}
    all_results = [grade_submission(z, out_dir, _taken=taken, **options)
                   for z in tqdm(zips, desc="grading", unit="zip", disable=not progress)]
    write_summary([summary_row(r) for r in all_results], out_dir / "summary.csv")
    return all_results
