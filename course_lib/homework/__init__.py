"""The homeworks: what each hands in, and the tests that grade it.

Used by the homework submission and grading (:mod:`course_lib.homework.submit`, :mod:`course_lib.homework.grade`). The same
test functions run twice: by ``submit`` on the student's machine (the results go into the zip's
``checks.json``) and by ``grade`` on the instructor's CPU machine, on fresh inputs derived from the seed
the instructor issued. A test's ``kind`` says how far the grader can trust it:

* ``re-checked``: the grader re-ran it on CPU against its own rebuild of the course's reference model
  (the tiny preset's weights come from the seed: ``build_cnsd(get_config("tiny"), seed=S)``);
* ``consistency``: numbers from the student's GPU (TensorRT timings, plan sidecars) checked for
  consistency -- medians against the raw samples, CUDA graph on/off ordering, versions present;
* ``trusted`` (set at grading): not re-checkable on CPU (sd15's reference is the real checkpoint), so the
  points follow the student's own result of the same test, and the results say so.

Homeworks (course_facts.md): "1" export + engines + pipeline run, "2" CUDA graph / optimization-level
timings, "3" q/k/v fusion, "int8" INT8 Q/DQ (chapter 5). Each test returns ``(passed, one line)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from course_lib.homework import hw1, hw2, hw3, int8
from course_lib.homework.evidence import (ARTIFACTS, FOLDERS, HOMEWORKS, MODELS, Artifact, Evidence, HomeworkTest, NotApplicable,
                       NotRecheckable, Verdict, derive_seed, homework_name, manifest_versions, seed_issued)
from course_lib.homework.hw3 import fused_weight_problem

__all__ = ["ARTIFACTS", "FOLDERS", "HOMEWORKS", "MODELS", "TESTS", "Artifact", "Evidence", "HomeworkTest",
           "NotApplicable", "NotRecheckable", "Outcome", "Verdict", "derive_seed", "fused_weight_problem",
           "homework_name", "run_tests"]


def _specs() -> dict[str, tuple[HomeworkTest, ...]]:
    T = HomeworkTest
    common = (T("manifest_versions", 1, "visible", "consistency", manifest_versions),
              T("seed_issued", 1, "visible", "re-checked", seed_issued))
    return {
        "1": common + (
            T("onnx_contract", 2, "visible", "re-checked", hw1.onnx_contract),
            T("onnx_sidecars", 1, "visible", "re-checked", hw1.onnx_sidecars),
            *(T(f"onnx_parity_{m}", 2, "hidden", "re-checked", hw1.parity_test(m)) for m in MODELS),
            T("images_agree", 1, "visible", "re-checked", hw1.images_agree),
            T("image_rerun", 2, "hidden", "re-checked", hw1.image_rerun),
            T("engines", 2, "visible", "consistency", hw1.engines, gpu=True)),
        "2": common + (
            T("hw2_records", 2, "visible", "consistency", hw2.hw2_records),
            T("hw2_raw_samples", 2, "visible", "consistency", hw2.hw2_raw_samples),
            T("hw2_summaries", 2, "visible", "consistency", hw2.hw2_summaries),
            T("hw2_graph_ordering", 2, "visible", "consistency", hw2.hw2_graph_ordering),
            T("hw2_plans", 2, "visible", "consistency", hw2.hw2_plans)),
        "3": common + (
            T("hw3_matmul_count_controlnet", 1, "visible", "re-checked", hw3.matmul_count_test("controlnet")),
            T("hw3_matmul_count_unet", 1, "visible", "re-checked", hw3.matmul_count_test("unet")),
            T("hw3_fused_layers", 1, "visible", "re-checked", hw3.hw3_fused_layers),
            T("hw3_loaded_weights", 1, "visible", "re-checked", hw3.hw3_loaded_weights),
            T("hw3_fused_weights", 3, "visible", "re-checked", hw3.hw3_fused_weights),
            T("hw3_onnx_outputs_controlnet", 2, "hidden", "re-checked", hw3.onnx_outputs_test("controlnet")),
            T("hw3_onnx_outputs_unet", 2, "hidden", "re-checked", hw3.onnx_outputs_test("unet")),
            T("hw3_timing", 1, "visible", "consistency", hw3.hw3_timing)),
        "int8": common + (
            T("int8_qdq_rules", 3, "visible", "re-checked", int8.int8_qdq_rules),
            T("int8_coverage", 1, "visible", "re-checked", int8.int8_coverage),
            T("int8_sidecar", 1, "visible", "consistency", int8.int8_sidecar),
            T("int8_outputs", 3, "hidden", "re-checked", int8.int8_outputs)),
    }


TESTS: dict[str, tuple[HomeworkTest, ...]] = _specs()
"""Each homework's graded tests, in order (points, visibility, kind): what results.json lists."""


@dataclass
class Outcome:
    """What one test gave: status "passed", "failed", "not re-checkable" or "not applicable", and why."""
    name: str
    status: str
    output: str

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "output": self.output}


def run_tests(ev: Evidence, progress: bool = False) -> list[Outcome]:
    """Homework grading: run every test of ``ev.homework``; a test that raises fails with the error's line."""
    from course_lib.progress import tqdm
    outcomes = []
    for spec in tqdm(TESTS[ev.homework], desc=f"homework {ev.homework}", leave=False, disable=not progress):
        try:
            passed, output = spec.run(ev)
            status = "passed" if passed else "failed"
        except NotRecheckable as e:
            status, output = "not re-checkable", f"not re-checkable on CPU: {e}"
        except NotApplicable as e:
            status, output = "not applicable", str(e)
        except MemoryError:                 # over the grader's memory limit: the whole zip's error, not a test's
            raise
        except Exception as e:  # a broken artifact fails its test, with the error's first line  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            status, output = "failed", f"{type(e).__name__}: {first}"
        outcomes.append(Outcome(spec.name, status, output))
    return outcomes
