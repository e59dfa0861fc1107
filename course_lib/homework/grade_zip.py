"""Homework grading, one zip: open it safely, verify it, re-run its tests, score them. Used by :mod:`.grade`.

This is what runs in the grading process of each zip (:mod:`course_lib.homework.isolate` forks it):
:func:`_grade_job` takes the job :func:`course_lib.homework.grade.grade_submission` describes (paths,
roster, salt, limits, points) and returns the zip's results dict -- Gradescope's format, see
:mod:`.grade` -- whatever happens: a zip that fails any opening step (:func:`_open`:
:func:`course_lib.homework.safezip.safe_extract`, :func:`read_manifest`, the SHA-256 of every file,
file types, ONNX external data, one export's models) is "refused"; any other failure of its grading
is an "error" row naming it (:func:`_failed`). Only the grader's own full disk stops the run (no zip
is to blame for it), and a MemoryError is left to the process's memory limit.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from course_lib.files import sha256_file
from course_lib.homework import HOMEWORKS, TESTS, Evidence, derive_seed, run_tests
from course_lib.homework.contents import check_external_data, check_file_types
from course_lib.homework.safezip import UnsafeSubmission, ZipLimits, safe_extract, verify_hashes
from course_lib.homework.submit import FORMAT

RESULTS_FORMAT = "course_lib.homework.grade/1"


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


def _open(zip_path: Path, dest: Path, limits: ZipLimits) -> tuple[dict, dict]:
    """Unpack and verify; returns (manifest, claims by test name). Raises UnsafeSubmission."""
    safe_extract(zip_path, dest, limits)
    manifest = read_manifest(dest)
    verify_hashes(dest, manifest["files"])
    check_file_types(dest, manifest["files"], limits)
    artifacts = dest / "artifacts"
    for name in manifest["files"]:
        if name.endswith(".onnx"):
            stripped = name.removeprefix("artifacts/") in manifest["stripped"]
            check_external_data(dest / name, artifacts, must_exist=not stripped)
    if (artifacts / "onnx").is_dir():                   # one export's models, not two runs mixed
        from course_lib.onnx.folder import check_export_folder
        try:
            check_export_folder(artifacts / "onnx")
        except ValueError as e:
            raise UnsafeSubmission(str(e).replace(str(artifacts) + os.sep, "artifacts/")
                                   .split(": two exports")[0] + ": make the homework's files again") from None
    try:
        claims = json.loads((dest / "checks.json").read_text(encoding="utf-8")) if (dest / "checks.json").is_file() else {}
    except (ValueError, RecursionError) as e:
        raise UnsafeSubmission(f"checks.json is not valid JSON ({type(e).__name__})") from None
    tests = claims.get("tests", []) if isinstance(claims, dict) else []
    if not isinstance(tests, list):
        raise UnsafeSubmission(f'checks.json: "tests" is a {type(tests).__name__}, expected a list of results '
                               "(make the zip with python -m course_lib submit)")
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


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _grade_job(job: dict) -> dict:
    """One zip's results; any exception becomes an "error" row naming it (a refusal is already a row)."""
    zip_path = Path(job["zip_path"])
    try:
        return _grade(zip_path, Path(job["unpacked"]), job["roster"], job["salt"], ZipLimits(**job["limits"]),
                      job["points"], job["require_gpu"], job["progress"])
    except MemoryError:
        raise
    except OSError as e:
        if e.errno in _DISK_FULL:                           # the grader's disk, not the zip
            raise
        return _failed(zip_path, f"grading failed: {type(e).__name__}: {_first_line(e)}", None, job["points"],
                       status="error")
    except Exception as e:  # any failure of this one zip's grading is its row  # noqa: BLE001
        return _failed(zip_path, f"grading failed: {type(e).__name__}: {_first_line(e)}", None, job["points"],
                       status="error")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _grade(zip_path: Path, unpacked: Path, roster, salt, limits, points, require_gpu, progress) -> dict:
    manifest, flags = None, []
    try:
        manifest, claims = _open(zip_path, unpacked, limits)
    except MemoryError:
        raise
    except OSError as e:
        if e.errno in _DISK_FULL:                           # the grader's disk is full: stop, blame no zip
            raise
        return _refused(zip_path, f"{zip_path.name} could not be read: {type(e).__name__}: {_first_line(e)}",
                        None, points)
    except Exception as e:  # UnsafeSubmission, or whatever the zip, JSON or ONNX readers raise  # noqa: BLE001
        message = str(e) if isinstance(e, UnsafeSubmission) else \
            f"{zip_path.name} could not be read: {type(e).__name__}: {_first_line(e)}"
        try:
            if (unpacked / "manifest.json").is_file():
                manifest = read_manifest(unpacked)
        except Exception:  # noqa: BLE001
            pass
        return _refused(zip_path, message, manifest, points)
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
            "gpu": m.get("gpu"), "zip": zip_path.name, "zip_sha256": _zip_sha256(zip_path),
            "flags": flags, "refused": refused}


def _zip_sha256(zip_path: Path) -> str | None:
    try:
        return sha256_file(zip_path) if zip_path.is_file() and not zip_path.is_symlink() else None
    except OSError:                                     # unreadable: the row says so elsewhere
        return None


def _refused(zip_path: Path, message: str, manifest: dict | None, points) -> dict:
    return _failed(zip_path, message, manifest, points, status="refused")


def _failed(zip_path: Path, message: str, manifest: dict | None, points, status: str) -> dict:
    """The results of a zip that was refused (status "refused") or whose grading failed ("error"): 0 points,
    one test ``submission_opened`` / ``submission_graded`` whose output says why."""
    manifest = manifest if isinstance(manifest, dict) else None
    hw = (manifest or {}).get("homework")
    max_score = float(sum((points or {}).get(s.name, s.points) for s in TESTS[hw] if not s.gpu)) if hw in TESTS else 0.0
    text = f"{'refused' if status == 'refused' else 'could not grade'} {zip_path.name}: {message}"
    name = "submission_opened" if status == "refused" else "submission_graded"
    extra = _extra(zip_path, manifest, (manifest or {}).get("seed"), [], refused=status == "refused")
    extra["error"] = status == "error"
    return {"score": 0.0, "max_score": max_score, "visibility": "visible", "output": text,
            "tests": [{"name": name, "score": 0.0, "max_score": max_score, "status": "failed",
                       "output": text, "visibility": "visible", "tags": [status]}],
            "extra_data": extra}
