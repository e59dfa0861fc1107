"""The homeworks' common ground: what each hands in, the evidence the tests read, and how a test is described.

Homework submission and grading (:mod:`course_lib.homework.submit`, :mod:`course_lib.homework.grade`): :data:`ARTIFACTS` lists
each homework's files with the chapter cell that makes them; :class:`Evidence` is one homework's folder plus
what the tests need (seed, versions, the reference model); :class:`HomeworkTest` is one graded test. The
two tests every homework has are here too: :func:`manifest_versions` and :func:`seed_issued`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.cnsd.contract import MODEL_NAMES

HOMEWORKS = ("1", "2", "3", "int8")
FOLDERS = {"1": "hw1", "2": "hw2", "3": "hw3", "int8": "int8"}
MODELS = MODEL_NAMES


class NotRecheckable(Exception):
    """A test the grader cannot re-run on CPU (the reason is the message): its points are trusted."""


class NotApplicable(Exception):
    """A test that does not apply to this submission (e.g. GPU evidence from a CPU machine): 0 of 0 points."""


def homework_name(hw) -> str:
    """Homework submission: the canonical name ("1", "2", "3", "int8") of ``hw`` (e.g. 1, "hw1", "INT8")."""
    name = str(hw).lower().removeprefix("hw")
    if name not in HOMEWORKS:
        raise ValueError(f"homework {hw!r}: expected one of {', '.join(HOMEWORKS)}")
    return name


def derive_seed(seed: int, purpose: str, salt: str = "") -> int:
    """Homework grading: a seed for fresh inputs, derived from the issued ``seed`` (and an optional secret)."""
    return int.from_bytes(hashlib.sha256(f"{salt}|{seed}|{purpose}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------ artifacts

@dataclass(frozen=True)
class Artifact:
    """A file (glob under the homework folder) a homework hands in, and the chapter cell that makes it."""
    pattern: str
    required: bool
    made_by: str


_RUN = "chapter 1, 'Hand it in' cell: write_hw1_evidence(build_cnsd(tiny, seed=SEED), 'homework')"
_FUSED = "chapter 4, 'Hand it in' cell: write_hw3_evidence(fused_cnsd, 'homework', ...)"
_SWEEP = ("chapter 2, 'Hand it in' cell: hw2_sweep(onnx_dir, sweep_dir), then write_hw2_evidence(sweep_dir, "
          "'homework') on a GPU machine with TensorRT")
_INT8 = "chapter 5, 'Hand it in' cell: write_int8_evidence(build_cnsd(tiny, seed=SEED), 'homework')"
ARTIFACTS: dict[str, tuple[Artifact, ...]] = {
    "1": tuple(Artifact(f"onnx/{m}.onnx{x}", True, _RUN) for m in MODELS for x in ("", ".json")) + (
        Artifact("images/input.png", True, _RUN), Artifact("images/canny2image_torch.png", True, _RUN),
        Artifact("images/canny2image_ort.png", True, _RUN), Artifact("run.json", True, _RUN),
        Artifact("images/canny2image_trt.png", False, "chapter 2, 'Hand it in' cell: write_hw1_evidence(..., "
                                                       "plan_dir=...) on a GPU machine"),
        Artifact("plans/*.plan.json", False, "chapter 2, 'Hand it in' cell: build_plans('homework/hw1/onnx', "
                                             "plan_dir), then write_hw1_evidence(..., plan_dir=plan_dir)")),
    "2": (Artifact("hw2.json", True, _SWEEP), Artifact("O*/*.plan.json", True, _SWEEP),
          Artifact("*.png", False, _SWEEP)),
    "3": (Artifact("onnx/controlnet.onnx", True, _FUSED), Artifact("onnx/controlnet.onnx.json", True, _FUSED),
          Artifact("onnx/unet.onnx", True, _FUSED), Artifact("onnx/unet.onnx.json", True, _FUSED),
          Artifact("fused_qkv.safetensors", True, _FUSED),
          Artifact("timing.json", False, "chapter 4, 'Hand it in' cell: write_hw3_evidence(..., "
                                         "timing=time_attention(fused_cnsd))")),
    "int8": (Artifact("controlnet.int8.onnx", True, _INT8), Artifact("controlnet.int8.onnx.json", True, _INT8),
             Artifact("unet.int8.onnx", False, _INT8 + " (the UNet is optional)"),
             Artifact("unet.int8.onnx.json", False, _INT8 + " (the UNet is optional)")),
}


# ------------------------------------------------------------------------------------------- evidence

@dataclass
class Evidence:
    """Homework grading: one homework's files and what the tests need to judge them.

    ``root`` is the homework folder (``homework/hw1`` on the student's machine, the zip's ``artifacts/`` at
    grading); ``seed`` the issued seed (the reference weights), ``input_seed`` the seed of fresh inputs;
    ``machine`` the manifest's versions and GPU; ``stripped`` the files whose weights were left out (sd15).
    """
    homework: str
    root: Path
    seed: int
    config: str = "tiny"
    machine: dict = field(default_factory=dict)
    input_seed: int = 1
    claimed_seed: int | None = None          # the manifest's seed (grading with a roster)
    stripped: frozenset = frozenset()
    originals: dict = field(default_factory=dict)   # stripped file: its sha256 before stripping
    reference_model: object = None           # an unfused CNSD given by the caller (sd15 on the student side)
    providers: tuple | None = None           # ONNX Runtime providers (None: CUDA if present, else CPU)
    _cache: dict = field(default_factory=dict, repr=False)

    def path(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            made = next((a.made_by for a in ARTIFACTS[self.homework] if Path(name).match(a.pattern)), "the chapter")
            raise FileNotFoundError(f"{name} is missing (made by {made})")
        return path

    def json(self, name: str):
        return json.loads(self.path(name).read_text())

    @property
    def gpu(self) -> str | None:
        return (self.machine.get("gpu") or {}).get("name")

    @property
    def reference_label(self) -> str:
        """How messages name the reference: "seed-7301" (tiny, rebuilt from the seed) or "checkpoint" (sd15)."""
        return f"seed-{self.seed}" if self.config == "tiny" else "checkpoint"

    def reference(self):
        """The unfused CNSD the student's files must match: rebuilt from the seed for the tiny preset."""
        if self.reference_model is not None:
            return self.reference_model
        if self.config != "tiny":
            raise NotRecheckable(f"config {self.config!r}: the reference is the real checkpoint, not rebuilt "
                                 "from the seed on this machine")
        return _tiny_reference(self.seed)

    def with_weights(self, name: str) -> Path:
        """The path of a file whose weights the test needs: NotRecheckable where they were left out (sd15)."""
        if name in self.stripped:
            raise NotRecheckable(f"{name} was handed in without its weights (config {self.config})")
        return self.path(name)


@functools.lru_cache(maxsize=1)
def _tiny_reference(seed: int):
    """The tiny preset's reference model for ``seed`` (kept for the next submission with the same seed)."""
    from course_lib.cnsd import build_cnsd, get_config
    return build_cnsd(get_config("tiny"), seed=seed)


# ------------------------------------------------------------------------------------------ the tests

Verdict = tuple[bool, str]


@dataclass(frozen=True)
class HomeworkTest:
    """One graded test: points, visibility ("visible" / "hidden"), kind, and the function that runs it."""
    name: str
    points: float
    visibility: str
    kind: str
    run: Callable[[Evidence], Verdict]
    gpu: bool = False                        # GPU evidence: not applicable to a CPU submission unless required


def manifest_versions(ev: Evidence) -> Verdict:
    """The manifest names course_lib, Python, torch, onnx, onnxruntime (+ TensorRT, GPU, driver for GPU work)."""
    versions = ev.machine.get("versions") or {}
    wanted = ["course_lib", "python", "torch", "onnx", "onnxruntime"]
    gpu_work = ev.homework == "2" or bool(list(ev.root.glob("plans/*.plan.json")))
    if gpu_work:
        wanted.append("tensorrt")
    missing = [k for k in wanted if not versions.get(k)]
    if gpu_work:
        missing += [f"gpu {k}" for k in ("name", "driver") if not (ev.machine.get("gpu") or {}).get(k)]
    if missing:
        return False, f"the manifest lacks {', '.join(missing)}"
    return True, ", ".join(f"{k} {versions[k]}" for k in wanted) + (f"; GPU {ev.gpu}" if ev.gpu else "; no GPU")


def seed_issued(ev: Evidence) -> Verdict:
    """The submission was made with the seed the instructor issued (a roster at grading)."""
    if ev.claimed_seed is None or ev.claimed_seed == ev.seed:
        return True, f"seed {ev.seed}" + ("" if ev.claimed_seed is None else " as issued")
    return False, f"the manifest says seed {ev.claimed_seed}, the roster issued {ev.seed}: the reference uses {ev.seed}"


def onnx_graph(path: Path):
    """The graph of an ONNX file, without loading external data."""
    import onnx
    return onnx.load(str(path), load_external_data=False).graph


def graph_io(graph) -> tuple[dict, dict]:
    """({input: (elem type, dims)}, {output: ...}); dims are ints, or None where dynamic."""
    inits = {t.name for t in graph.initializer}
    def info(v):
        t = v.type.tensor_type
        return t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return ({v.name: info(v) for v in graph.input if v.name not in inits}, {v.name: info(v) for v in graph.output})


def model_size(graph, name: str) -> tuple[int, int, int]:
    """(batch, height, width) of an exported sub-model, from its static input shapes (64x64 where dynamic)."""
    inputs, _ = graph_io(graph)
    key = {"clip": "input_ids", "controlnet": "hint", "unet": "x_noisy", "decoder": "latent"}[name]
    dims = inputs[key][1] if key in inputs else ()
    batch = dims[0] if dims and dims[0] else 1
    if name == "clip" or len(dims) != 4 or None in dims[2:]:
        return batch, 64, 64
    scale = 1 if name == "controlnet" else 8
    return batch, dims[2] * scale, dims[3] * scale


@contextlib.contextmanager
def strict_fp32():
    """TF32 off while the reference runs on a GPU (cuDNN's default TF32 convs differ from ONNX Runtime by ~1e-3)."""
    import torch
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def run_reference(reference, name: str, feed: dict) -> tuple:
    """The reference sub-model's outputs (on the CPU) for a CPU ``feed``, wherever the model lives (TF32 off)."""
    import torch
    device = next(reference.parameters()).device
    with strict_fp32(), torch.no_grad():
        return tuple(t.cpu() for t in reference.positional(name)(*(t.to(device) for t in feed.values())))


def contract_of(ev: Evidence, name: str, graph):
    """The course's contract of sub-model ``name`` at the size ``graph`` was exported at."""
    from course_lib.cnsd import contracts, get_config
    return contracts(get_config(ev.config), *model_size(graph, name))[name]
