"""The homework hand-in on a CUDA machine, then graded on its CPU: everything of it that needs no TensorRT.

    python tools/handin_gpu_check.py --out DIR            # tiny, then sd15 (random weights): ~5 min on an H100 host
    python tools/handin_gpu_check.py --out DIR --presets tiny   # about a minute; runs on CPU too

Students run the hand-in cells with their model on the GPU; the grader re-runs on a CPU machine. This runs
both halves in one call, as a student and as an instructor would:

* tiny, model on ``cuda``: ``write_hw1_evidence`` (torch on the GPU, ONNX Runtime on the CPU; no plan_dir:
  no TensorRT), ``write_hw3_evidence`` (fused model, ``time_attention`` on the GPU), ``write_int8_evidence``
  (calibration recorded from the pipeline on the GPU); ``submit`` with the GPU model as reference; then
  ``grade_folder`` on the CPU with the reference rebuilt from the seed.
* sd15 (random weights saved as a checkpoint in the original layout): HW3 and INT8 evidence at 64x64 from the
  model on the GPU, then ``python -m course_lib submit --config sd15 --checkpoint`` (the CLI puts the
  reference on the GPU) and ``python -m course_lib grade`` as subprocesses, their wall time measured.

Writes DIR/handin_gpu.json (each step: seconds, scores, tests that did not pass) after every step, so a run
cut short still reports what it did, and DIR/handin_gpu.md (a table).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from course_lib.cnsd import build_cnsd, get_config  # noqa: E402
from course_lib.cnsd.fusion import fuse_qkv, time_attention  # noqa: E402
from course_lib.homework.grade import grade_folder  # noqa: E402
from course_lib.homework.handin import write_hw1_evidence, write_hw3_evidence, write_int8_evidence  # noqa: E402
from course_lib.homework.submit import submit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Report:
    def __init__(self, out: Path):
        self.out, self.steps = out, []
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, start: float, **facts) -> None:
        self.steps.append({"step": name, "seconds": round(time.perf_counter() - start, 1), **facts})
        print(f"{name}: {self.steps[-1]}", flush=True)
        info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        (self.out / "handin_gpu.json").write_text(json.dumps({"machine": info, "steps": self.steps}, indent=1) + "\n")
        rows = [f"| {s['step']} | {s['seconds']} | {s.get('score', s.get('passed', s.get('returncode', '')))} "
                f"| {', '.join(s.get('not_passed', []))} |" for s in self.steps]
        (self.out / "handin_gpu.md").write_text("\n".join(
            [f"machine: {info}", "", "| step | s | score, passed or exit code | not passed |", "|---|---|---|---|",
             *rows]) + "\n")


def graded(results) -> dict:
    return {f"{r['extra_data']['student']} homework {r['extra_data']['homework']}":
            {"score": f"{r['score']:g}/{r['max_score']:g}", "refused": r["extra_data"].get("refused", False),
             "lost": sorted(t["name"] for t in r["tests"] if t["score"] < t["max_score"]),
             "not_rechecked": sorted(t["name"] for t in r["tests"] if "trusted" in t.get("tags", []))}
            for r in results}


def tiny_on_gpu(report: Report, work: Path, device: str, seed: int = 5) -> None:
    subs = work / "subs"
    t = time.perf_counter()
    model = build_cnsd(get_config("tiny"), seed=seed).to(device)
    write_hw1_evidence(model, work / "student", height=64, width=64, progress=False)
    report.step(f"tiny hw1 evidence, model on {device}", t)
    t = time.perf_counter()
    fused = copy.deepcopy(model)
    fuse_qkv(fused)
    timing = time_attention(fused, height=64, width=64, repeats=5)
    write_hw3_evidence(fused, work / "student", height=64, width=64, timing=timing, progress=False)
    report.step(f"tiny hw3 evidence, model on {device}", t, timing=str(timing))
    t = time.perf_counter()
    write_int8_evidence(model, work / "student", progress=False)
    report.step(f"tiny int8 evidence, calibration on {device}", t)
    for hw in ("1", "3", "int8"):
        t = time.perf_counter()
        sub = submit(hw, "gpu-student", seed, work=work / "student", out=subs / f"gpu-student_{hw}.zip",
                     reference=model, progress=False)
        report.step(f"tiny submit hw {hw}, reference on {device}", t, passed=sub.passed,
                    not_passed=[f"{c.name} ({c.status})" for c in sub.checks if c.status != "passed"])
    t = time.perf_counter()
    results = grade_folder(subs, work / "results", progress=False)             # reference rebuilt on the CPU
    for name, r in graded(results).items():
        report.step(f"tiny grade on CPU: {name}", t, score=r["score"], not_passed=r["lost"], refused=r["refused"])


def sd15_on_gpu(report: Report, work: Path, device: str) -> None:
    from safetensors.torch import save_file

    from course_lib.cnsd.checkpoint import checkpoint_state, load_checkpoint
    from course_lib.cnsd.tokenizer import byte_level_tokenizer

    t = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cfg = get_config("sd15")
    state = {k: v.contiguous() for k, v in checkpoint_state(build_cnsd(cfg, seed=11)).items()}
    save_file(state, str(work / "ckpt.safetensors"))
    del state
    model = build_cnsd(cfg, seed=0)
    load_checkpoint(work / "ckpt.safetensors", model)
    model.to(device)
    report.step("sd15 checkpoint written (random weights) and loaded", t)
    t = time.perf_counter()
    write_int8_evidence(model, work / "sd15", height=64, width=64, models=["controlnet"],
                        tokenizer=byte_level_tokenizer(), progress=False)
    report.step(f"sd15 int8 evidence (controlnet, 64x64), calibration on {device}", t)
    t = time.perf_counter()
    fuse_qkv(model)
    write_hw3_evidence(model, work / "sd15", height=64, width=64, progress=False)
    report.step(f"sd15 hw3 evidence (64x64), model on {device}", t)
    del model
    torch.cuda.empty_cache()
    for hw in ("3", "int8"):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "course_lib", "submit", "--hw", hw, "--student", "sd15-student", "--seed", "0",
               "--config", "sd15", "--checkpoint", str(work / "ckpt.safetensors"), "--work", str(work / "sd15"),
               "--out", str(work / "sd15subs" / f"sd15-student_{hw}.zip"), "--quiet"]
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        report.step(f"sd15 CLI submit hw {hw} (reference on the GPU)", t, returncode=run.returncode,
                    tail=(run.stdout + run.stderr)[-1500:])
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "course_lib", "grade", str(work / "sd15subs"), "--out",
                          str(work / "sd15results"), "--quiet"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    report.step("sd15 CLI grade on the CPU", t, returncode=run.returncode, tail=(run.stdout + run.stderr)[-1500:])
    for path in sorted((work / "sd15results").glob("*/results.json")):
        r = graded([json.loads(path.read_text())])
        for name, g in r.items():
            report.step(f"sd15 graded: {name}", t, score=g["score"], not_passed=g["lost"],
                        not_rechecked=g["not_rechecked"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", nargs="+", choices=("tiny", "sd15"), default=("tiny", "sd15"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = Report(args.out)
    with tempfile.TemporaryDirectory(prefix="handin_gpu_") as tmp:
        if "tiny" in args.presets:
            tiny_on_gpu(report, Path(tmp) / "tiny", device)
        if "sd15" in args.presets:
            sd15_on_gpu(report, Path(tmp) / "sd15", device)


if __name__ == "__main__":
    main()
