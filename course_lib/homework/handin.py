"""Hand it in: the files each homework hands in, written by the chapter's last cell.

Each homework chapter ends with a "Hand it in" cell that calls one of these for the student's seed, then
runs :func:`course_lib.homework.submit.submit` as a dry run (the grader's own tests, on the student's machine).
Every writer fills ``work/<hw1|hw2|hw3|int8>/`` (the files listed in :data:`course_lib.homework.ARTIFACTS`)
and writes each file under a temporary name first, so an interrupted cell leaves no half-written file:

* :func:`write_hw1_evidence` (chapters 1-2): the four ONNX files, canny2image on torch, ONNX Runtime and
  (on a GPU) TensorRT, the plans' sidecars;
* :func:`write_hw2_evidence` (chapter 2): the records of ``hw2_sweep`` and its plans' sidecars, a plot;
* :func:`write_hw3_evidence` (chapter 4): the fused ControlNet and UNet, the fused weights;
* :func:`write_int8_evidence` (chapter 5): INT8 Q/DQ ControlNet and UNet calibrated on the pipeline.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from course_lib.files import atomic_copy, atomic_path, sha256_file, write_json
from course_lib.homework import FOLDERS, MODELS


def _export_on_cpu(model, out_dir: Path, **kwargs) -> dict:
    """export_cnsd feeds CPU example inputs: export from the CPU, then put the model back where it was."""
    from course_lib.onnx.export_cnsd import export_cnsd

    device = next(model.parameters()).device
    try:
        return export_cnsd(model.cpu(), out_dir, **kwargs)
    finally:
        model.to(device)


def _tokenizer_for(model):
    from course_lib.cnsd.tokenizer import byte_level_tokenizer, get_tokenizer
    return byte_level_tokenizer() if model.config.name == "tiny" else get_tokenizer()


# ----------------------------------------------------------------------------------------- homework 1

def write_hw1_evidence(model, work: str | Path = "homework", *, height: int = 64, width: int = 64, steps: int = 20,
                       prompt: str = "a bird", seed: int = 2946901, photo=None, tokenizer=None,
                       plan_dir: str | Path | None = None, export: bool = True, progress: bool = True) -> Path:
    """Homework 1 (chapters 1-2): export ``model``'s four sub-models to ``work/hw1/onnx`` and run canny2image on
    torch, ONNX Runtime and (with ``plan_dir``, on a GPU) TensorRT; writes the images, ``run.json`` and the
    plans' sidecars (not the plans). ``photo`` defaults to the sample photo at ``height`` x ``width``.
    ``export=False`` keeps the ONNX files already there (the ones the plans in ``plan_dir`` were built from).
    Without ``plan_dir``, an earlier run's TensorRT evidence (plan sidecars, TensorRT image) is removed unless it
    still belongs: built from these very ONNX files on this machine, with the same settings and photo.
    Returns the folder.
    """
    from course_lib.backends import make_backends
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.samples import sample_photo, write_image

    folder = Path(work) / FOLDERS["1"]
    if export:
        _export_on_cpu(model, folder / "onnx", height=height, width=width, progress=progress)
    elif not all((folder / "onnx" / f"{m}.onnx").is_file() for m in MODELS):
        raise FileNotFoundError(f"{folder / 'onnx'} lacks the four ONNX files: run chapter 1's 'Hand it in' cell "
                                "(write_hw1_evidence with export=True) first")
    photo = sample_photo(size=(height, width)) if photo is None else photo
    tokenizer = _tokenizer_for(model) if tokenizer is None else tokenizer
    settings = {"image_resolution": min(photo.shape[:2]), "ddim_steps": steps, "seed": seed, "scale": 9.0,
                "strength": 1.0, "eta": 0.0, "low_threshold": 100, "high_threshold": 200}
    if plan_dir is not None:
        missing = [m for m in MODELS if not (Path(plan_dir) / f"{m}.plan.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{Path(plan_dir) / (missing[0] + '.plan.json')} is missing: build the plans "
                                    f"from {folder / 'onnx'} with build_plans (chapter 2) first")
    run = {"prompt": prompt, **settings, "guidance": "separate", "height": int(photo.shape[0]), "width": int(photo.shape[1]),
           "tokenizer": "byte-level" if getattr(tokenizer, "byte_level", False) else "clip"}
    keep_trt = plan_dir is None and _trt_evidence_still_belongs(folder, run, photo)     # before images are replaced
    torch_device = next(model.parameters()).device
    for kind in ("torch", "ort") + (("trt",) if plan_dir is not None else ()):
        device = torch_device if kind == "torch" else ("cuda" if kind == "trt" else "cpu")
        backends = make_backends(kind, model, onnx_dir=folder / "onnx", plan_dir=plan_dir)
        pipe = Canny2Image(backends, tokenizer, model.config, device=device, progress=progress)
        write_image(folder / "images" / f"canny2image_{kind}.png", pipe.process(photo, prompt, **settings)[0])
    write_image(folder / "images" / "input.png", photo)
    if plan_dir is not None:
        for name in MODELS:
            atomic_copy(Path(plan_dir) / f"{name}.plan.json", folder / "plans" / f"{name}.plan.json")
    elif not keep_trt:                             # an earlier run's engines: other ONNX files, settings or machine
        for stale in [*folder.glob("plans/*.plan.json"), folder / "images" / "canny2image_trt.png"]:
            stale.unlink(missing_ok=True)
    write_json(folder / "run.json", run)
    return folder


def _this_machine() -> tuple[str | None, str | None]:
    """(TensorRT version, GPU name) here, as ``submit`` records them in the manifest (None where absent)."""
    from course_lib.homework.submit import machine_info
    machine = machine_info()
    return machine["versions"]["tensorrt"], (machine["gpu"] or {}).get("name")


def _trt_evidence_still_belongs(folder: Path, run: dict, photo) -> bool:
    """Whether an earlier run's TensorRT evidence would still pass the ``engines`` test after a CPU re-run (chapter
    1's cell after chapter 2's): the TensorRT image is there, and the four plan sidecars were built from these
    very ONNX files (export is deterministic for a seed) by this machine's TensorRT and GPU, with the same
    ``run.json`` settings and input photo. All of it is kept, or none."""
    import numpy as np

    from course_lib.samples import read_image

    def read_json(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):                  # missing, not UTF-8, not JSON
            return None

    tensorrt, gpu = _this_machine()
    for name in MODELS:
        side, onnx = read_json(folder / "plans" / f"{name}.plan.json"), folder / "onnx" / f"{name}.onnx"
        if not (isinstance(side, dict) and onnx.is_file() and side.get("onnx_sha256") == sha256_file(onnx)
                and side.get("tensorrt") == tensorrt and side.get("gpu") == gpu):
            return False
    old_run = read_json(folder / "run.json")
    if isinstance(old_run, dict) and "cfg" in old_run and "guidance" not in old_run:    # written before the rename
        old_run["guidance"] = old_run.pop("cfg")
    if old_run != run or not (folder / "images" / "canny2image_trt.png").is_file():
        return False
    try:
        return np.array_equal(read_image(folder / "images" / "input.png"), np.asarray(photo))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------- homework 2

def write_hw2_evidence(sweep_dir: str | Path, work: str | Path = "homework") -> Path:
    """Homework 2 (chapter 2): hand in what ``hw2_sweep(onnx_dir, sweep_dir)`` wrote: ``hw2.json`` (every timing
    with its raw samples) and the sidecar of each plan it timed (``O<level>/<model>.plan.json``; never the
    plans), copied to ``work/hw2``, plus ``hw2.png`` drawn from the records. When ``sweep_dir`` is another
    folder, sidecars in ``work/hw2`` that the records don't use are removed. Returns the homework folder.
    """
    from course_lib.trt.sweep import plot_hw2

    sweep_dir, folder = Path(sweep_dir), Path(work) / FOLDERS["2"]
    source = sweep_dir / "hw2.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run hw2_sweep(onnx_dir, {str(sweep_dir)!r}) first "
                                "(chapter 2, cell 'Homework 2 harness')")
    records = json.loads(source.read_text())
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{source}: expected hw2_sweep's list of records")
    sidecars = sorted({f"O{r.get('opt_level')}/{r.get('model')}.plan.json" for r in records})
    missing = [s for s in sidecars if not (sweep_dir / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{sweep_dir / missing[0]} is missing: hw2_sweep writes a sidecar beside each plan")
    if sweep_dir.resolve() != folder.resolve():
        for rel in sidecars:
            atomic_copy(sweep_dir / rel, folder / rel)
        for stale in folder.glob("O*/*.plan.json"):
            if stale.relative_to(folder).as_posix() not in sidecars:
                stale.unlink()
        atomic_copy(source, folder / "hw2.json")
    plot_hw2(records, folder / "hw2.png")
    return folder


# ----------------------------------------------------------------------------------------- homework 3

def save_fused_weights(model, path: str | Path) -> Path:
    """Homework 3 (chapter 4): to_q/to_k/to_v and the fused to_qkv / to_kv weight of every fused attention
    layer, as safetensors (course names, e.g. ``unet.middle_block.1.transformer_blocks.0.attn1.to_qkv.weight``)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in model.named_modules():
        fused = next((f for f in ("to_qkv", "to_kv") if hasattr(layer, f)), None)
        if fused is None:
            continue
        for part in ("to_q", "to_k", "to_v", fused):
            tensors[f"{name}.{part}.weight"] = getattr(layer, part).weight.detach().float().cpu().contiguous().clone()
    if not tensors:
        raise ValueError("the model has no fused attention layers (to_qkv / to_kv): fuse it first (fuse_qkv)")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


def write_hw3_evidence(fused_model, work: str | Path = "homework", *, height: int = 64, width: int = 64,
                       timing=None, progress: bool = True) -> Path:
    """Homework 3 (chapter 4): export the fused ControlNet and UNet to ``work/hw3/onnx`` and save their
    attention weights (:func:`save_fused_weights`); with ``timing`` (a
    :class:`~course_lib.cnsd.fusion.FusionTiming` from ``time_attention``) also ``timing.json``, raw samples
    included (without it an older ``timing.json`` is removed). Returns the homework folder."""
    import dataclasses

    folder = Path(work) / FOLDERS["3"]
    save_fused_weights(fused_model, folder / "fused_qkv.safetensors")
    if timing is not None:
        write_json(folder / "timing.json", dataclasses.asdict(timing))
    else:
        (folder / "timing.json").unlink(missing_ok=True)
    _export_on_cpu(fused_model, folder / "onnx", height=height, width=width, models=["controlnet", "unet"],
                   progress=progress)
    return folder


# --------------------------------------------------------------------------------------- homework INT8

def write_int8_evidence(model, work: str | Path = "homework", *, height: int = 64, width: int = 64, steps: int = 2,
                        models: Sequence[str] = ("controlnet", "unet"), photos: Sequence | None = None,
                        prompts: Sequence[str] = ("a bird", "a bird on a branch"), seeds: Sequence[int] = (1, 2),
                        keep_float: Sequence[str] = ("time_embed", "first_last_conv"), method: str = "ort",
                        tokenizer=None, progress: bool = True) -> Path:
    """Homework INT8 (chapter 5): chapter 5's recipe on ``model`` (your seed's): export ``models`` in fp32,
    record calibration data from one canny2image run per photo (``steps`` DDIM steps), and write
    ``work/int8/<name>.int8.onnx`` with its sidecar (:func:`~course_lib.precision.int8.quantize_int8`), keeping the
    ``keep_float`` groups of :func:`~course_lib.precision.int8.sensitive_nodes` in float.

    ``photos`` default to the sample photo and its mirror image at ``height`` x ``width``; ``tokenizer`` to the
    byte-level one for tiny, CLIP's for sd15. The fp32 files and the calibration data are scratch, removed
    at the end, and so is an older INT8 file of a model not in ``models``. Returns the homework folder.
    """
    from course_lib.precision.calibration import capture_calibration
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.precision.int8 import SENSITIVE_GROUPS, quantize_int8, sensitive_nodes
    from course_lib.samples import sample_photo

    unknown = [m for m in models if m not in ("controlnet", "unet")]
    if unknown or "controlnet" not in models:
        raise ValueError(f"models {list(models)}: the INT8 homework quantizes 'controlnet' and optionally 'unet'")
    bad = [g for g in keep_float if g not in SENSITIVE_GROUPS]
    if bad:
        raise ValueError(f"keep_float {bad}: expected groups of sensitive_nodes, some of {SENSITIVE_GROUPS}")
    if photos is None:
        photo = sample_photo(size=(height, width))
        photos = [photo, photo[:, ::-1].copy()]
    folder = Path(work) / FOLDERS["int8"]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-scratch-", dir=Path(work)) as scratch:
        exports = _export_on_cpu(model, Path(scratch) / "fp32", height=height, width=width, models=list(models),
                                 progress=progress)
        device = next(model.parameters()).device
        tokenizer = _tokenizer_for(model) if tokenizer is None else tokenizer
        pipe = Canny2Image.from_torch(model, tokenizer, device=device, progress=False)
        calib = capture_calibration(pipe, photos, prompts, Path(scratch) / "calib", seeds=seeds, models=list(models),
                                    image_resolution=min(height, width), ddim_steps=steps, progress=progress)
        for name in models:
            fp32 = exports[name].path
            groups = sensitive_nodes(fp32)
            quantize_int8(fp32, folder / f"{name}.int8.onnx", calib.reader(name), method=method,
                          exclude_nodes={g: groups[g] for g in keep_float}, progress=progress)
    for name in sorted({"controlnet", "unet"} - set(models)):   # an earlier run's model, maybe of another seed
        for stale in folder.glob(f"{name}.int8.onnx*"):
            stale.unlink()
    return folder
