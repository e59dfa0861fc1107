"""Homework submission: run a homework's tests on the student's machine and hand in one zip.

Each homework chapter ends with a "Hand it in" cell; from a terminal::

    python -m course_lib submit --hw 1 --student alice --seed 1234 --out alice_hw1.zip

The homework's files live in ``homework/<hw1|hw2|hw3|int8>/``: :mod:`course_lib.homework.handin` writes them (see
:data:`course_lib.homework.ARTIFACTS` for each file and the chapter cell that makes it). :func:`submit` runs
the homework's tests here (the same tests the grader re-runs, see :mod:`course_lib.homework`), then writes
one zip, atomically::

    manifest.json      homework, student, issued seed, config, time (UTC), course_lib / Python / torch / onnx /
                       onnxruntime / TensorRT versions, GPU name and driver, SHA-256 and size of every member
    checks.json        the tests' results on this machine
    artifacts/...      ONNX (+ external data), sidecars (never the .plan files), images, JSON, safetensors

No pickles: JSON, ONNX, NPZ, PNG and safetensors only. For sd15 the weights stay out (gigabytes, and the
grader can't rebuild the real checkpoint anyway): the ONNX files go in as graphs only, safetensors not at
all; their structure is graded, their numbers are trusted from ``checks.json``.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.homework import ARTIFACTS, FOLDERS, Evidence, Outcome, derive_seed, homework_name, run_tests
from course_lib.homework.contents import check_external_data
from course_lib.homework.safezip import ALLOWED_SUFFIXES, ZipLimits, hash_files, write_zip

FORMAT = "course_lib.submission/1"
_STUDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def sanitize_student_id(student) -> str:
    """Homework submission: the student ID if it is 1-64 letters, digits, '.', '_', '-' (a letter or digit
    first), else a ValueError."""
    text = str(student).strip()
    if not _STUDENT_ID.fullmatch(text) or text.endswith("."):
        raise ValueError(f"--student {student!r}: expected 1-64 letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit), e.g. the ID on your course account")
    return text


def check_seed(seed) -> int:
    """Homework submission: the issued seed if it is a non-negative integer, else a ValueError."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed {seed!r}: expected the non-negative integer your instructor issued")
    return seed


def machine_info() -> dict:
    """Homework submission: versions (course_lib, Python, torch, onnx, onnxruntime, TensorRT, CUDA) and GPU."""
    import onnx

    from course_lib import __version__
    from course_lib.env import detect

    env = detect()
    gpu = {}
    if env.has_gpu:
        gpu = {"name": env.gpu_name, "compute_capability": env.compute_capability, "driver": _driver()}
    return {"versions": {"course_lib": __version__, "python": env.python, "torch": env.torch, "onnx": onnx.__version__,
                         "onnxruntime": env.onnxruntime, "tensorrt": env.tensorrt, "cuda": env.cuda_runtime},
            "gpu": gpu, "platform": platform.platform()}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect(hw, work: str | Path = "homework") -> list[str]:
    """Homework submission: the files of homework ``hw`` under ``work/<folder>`` (names relative to it).

    The artifacts of :data:`~course_lib.homework.ARTIFACTS` plus each ONNX file's external data; hidden files
    (an interrupted write's temporary) are left out. A missing required file is a FileNotFoundError naming it
    and the chapter cell that makes it.
    """
    hw = homework_name(hw)
    root = Path(work) / FOLDERS[hw]
    names: list[str] = []
    for artifact in ARTIFACTS[hw]:
        found = sorted(p for p in root.glob(artifact.pattern)                # ".name.tmp" files are unfinished
                       if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
        if not found and artifact.required:
            raise FileNotFoundError(f"homework {hw}: {root / artifact.pattern} is missing; "
                                    f"it is made by {artifact.made_by}")
        for p in found:
            if p.is_symlink():
                raise ValueError(f"{p} is a symbolic link: copy the file itself into {root}")
            names.append(p.relative_to(root).as_posix())
    for name in [n for n in names if n.endswith(".onnx")]:
        for location in check_external_data(root / name, root):
            data = (Path(name).parent / location).as_posix()
            if Path(data).suffix not in ALLOWED_SUFFIXES:
                raise ValueError(f"{name}: external data {location!r} must end in .data to be handed in")
            names.append(data)
    return list(dict.fromkeys(names))


def strip_weights(src: str | Path, dst: str | Path, min_bytes: int = 1024) -> None:
    """Homework submission (sd15): copy an ONNX graph without its weights (tensors of ``min_bytes`` or more).

    The weights become external data in ``<name>.stripped``, a file that is not handed in: the graph, names,
    shapes and small constants (Q/DQ scales) stay readable; ONNX Runtime can't run it.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    location = Path(dst).name + ".stripped"
    for tensor in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor) or len(tensor.raw_data) < min_bytes:
            continue
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dst))


# ------------------------------------------------------------------------------------------ submitting

@dataclass
class Submission:
    """What :func:`submit` handed in (or would, with ``out=None``): files with sizes, the tests' results."""
    homework: str
    student: str
    seed: int
    files: dict[str, int]
    checks: list[Outcome]
    path: Path | None = None
    stripped: list[str] = field(default_factory=list)     # handed in without their weights (sd15), or left out:
    left_out: list[str] = field(default_factory=list)     # files that stay on the student's machine (sd15 weights)

    @property
    def passed(self) -> bool:
        return all(c.status != "failed" for c in self.checks)

    def __str__(self) -> str:
        head = f"homework {self.homework}, student {self.student}, seed {self.seed}: " + \
            (f"{self.path} ({self.path.stat().st_size / 2**20:.1f} MB)" if self.path else "not written (dry run)")
        lines = [head, "files:"]
        lines += [f"  {size / 2**20:8.2f} MB  {name}" + ("  (weights left out)" if name in self.stripped else "")
                  for name, size in self.files.items()]
        lines += [f"  {'-':>8}     {name}  (left out: weights stay on your machine)" for name in self.left_out]
        lines.append("tests on this machine:")
        lines += [f"  [{c.status.upper()}] {c.name}: {c.output}" for c in self.checks]
        return "\n".join(lines)

    __repr__ = __str__

    def report(self, outputs: bool = False) -> str:
        """What a chapter's "Hand it in" cell shows: the files that would go in, each test's status (with
        ``outputs`` also its line, whose numbers vary a little between machines) and whether all passed."""
        lines = [f"homework {self.homework}: {len(self.files)} files to hand in"]
        lines += [f"  {name}" + ("  (weights left out)" if name in self.stripped else "") for name in self.files]
        lines += [f"  {name}  (left out: weights stay on your machine)" for name in self.left_out]
        lines.append("tests on this machine:")
        lines += [f"  [{c.status}] {c.name}" + (f": {c.output}" if outputs else "") for c in self.checks]
        lines.append(f"ready to hand in: {self.passed}")
        return "\n".join(lines)


def submit(hw, student: str, seed: int = 0, *, work: str | Path = "homework", out: str | Path | None = None,
           config: str = "tiny", reference=None, limits: ZipLimits = ZipLimits(), progress: bool = True) -> Submission:
    """Homework submission: run homework ``hw``'s tests on this machine and write the zip ``out``.

    Args:
        hw: "1", "2", "3" or "int8". student: your ID (letters, digits, '.', '_', '-').
        seed: the seed your instructor issued (the tiny model is ``build_cnsd(get_config("tiny"), seed)``).
        work: the folder holding ``hw1/``, ``hw2/``, ``hw3/``, ``int8/``.
        out: the zip to write; None only runs the tests and lists the files (what the notebook cell shows).
        config: "tiny" or "sd15" (sd15: the weights stay out of the zip: ONNX as graphs, no safetensors).
        reference: the unfused CNSD with the weights you used (sd15: with the checkpoint loaded); the tiny
            preset's is rebuilt from ``seed``.
    Returns a :class:`Submission`. Raises FileNotFoundError naming a missing file and the cell that makes it.
    """
    hw, student = homework_name(hw), sanitize_student_id(student)
    check_seed(seed)
    if config not in ("tiny", "sd15"):
        raise ValueError(f"--config {config!r}: expected 'tiny' or 'sd15'")
    if out is not None and Path(out).suffix != ".zip":
        raise ValueError(f"--out {out}: expected a file name ending in .zip")
    root = Path(work) / FOLDERS[hw]
    names = collect(hw, work)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="course_submit_") as tmp:
        sources = {n: root / n for n in names}
        stripped, originals = [], {}
        if config != "tiny":                           # leave the gigabytes of weights out
            from course_lib.homework.safezip import sha256_file
            for name in [n for n in names if n.endswith((".onnx", ".safetensors"))]:
                originals[name] = sha256_file(root / name)
                stripped.append(name)
                if name.endswith(".onnx"):             # the graph stays: names, shapes, structure
                    (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                    strip_weights(root / name, Path(tmp) / name)
                    sources[name] = Path(tmp) / name
            sources = {n: p for n, p in sources.items() if not n.endswith((".data", ".safetensors"))}
        sizes = {n: p.stat().st_size for n, p in sources.items()}
        total = sum(sizes.values())
        if total > limits.max_total_mb * 2**20 or max(sizes.values()) > limits.max_file_mb * 2**20:
            raise ValueError(f"homework {hw}: {total / 2**20:.0f} MB of files, over the grader's limits "
                             f"({limits.max_total_mb:g} MB in all, {limits.max_file_mb:g} MB per file): hand in "
                             "the tiny preset's files, or ask your instructor")
        if len(sizes) + 2 > limits.max_members:                      # + manifest.json and checks.json
            raise ValueError(f"homework {hw}: {len(sizes) + 2} files in the zip, over the grader's limit of "
                             f"{limits.max_members}: remove stray files from {root}, or ask your instructor")
        ev = Evidence(hw, root, seed, config, machine, input_seed=derive_seed(seed, "student"),
                      reference_model=reference)
        checks = run_tests(ev, progress=progress)
        submission = Submission(hw, student, seed, sizes, checks, stripped=stripped,
                                left_out=[n for n in names if n not in sources])
        if out is None:
            return submission
        checks_json = json.dumps({"homework": hw, "seed": seed, "input_seed": ev.input_seed,
                                  "tests": [c.to_dict() for c in checks]}, indent=1).encode()
        checks_path = Path(tmp) / "checks.json"
        checks_path.write_bytes(checks_json)
        members = {"checks.json": checks_path, **{f"artifacts/{n}": p for n, p in sources.items()}}
        manifest = {"format": FORMAT, "homework": hw, "student": student, "seed": seed, "config": config,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine,
                    "stripped": originals, "files": hash_files(members, progress=progress)}
        zip_members = {"manifest.json": json.dumps(manifest, indent=1).encode(), **members}
        submission.path = write_zip(out, zip_members)
    return submission

