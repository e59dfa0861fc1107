"""Homework 1's tests (chapters 1-2): the four ONNX files, their parity with the reference, the canny2image
images, and (from a GPU machine) the engines' sidecars.

Used by the homework submission and grading; see :mod:`course_lib.homework`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from course_lib.homework.evidence import (MODELS, Evidence, NotApplicable, NotRecheckable, Verdict, contract_of, graph_io, model_size,
                       onnx_graph, run_reference)

IMAGE_MIN_PSNR = 30.0                  # dB: same model, other backend or machine (GPU vs CPU torch: ~60)
TRT_IMAGE_MIN_PSNR = 25.0              # dB: TensorRT fp32 (TF32 tactics) against torch


def onnx_contract(ev: Evidence) -> Verdict:
    """HW1: the four ONNX files pass onnx.checker and have the contract's names, dtypes and static shapes."""
    from course_lib.onnx.export import load_onnx_checked
    for name in MODELS:
        rel = f"onnx/{name}.onnx"
        if rel not in ev.stripped:
            load_onnx_checked(ev.path(rel), load_external_data=False)
        graph = onnx_graph(ev.path(rel))
        contract = contract_of(ev, name, graph)
        inputs, outputs = graph_io(graph)
        for kind, got, specs in (("inputs", inputs, contract.inputs), ("outputs", outputs, contract.outputs)):
            if list(got) != [s.name for s in specs]:
                return False, f"{rel}: {kind} {list(got)}, expected {[s.name for s in specs]}"
            for s in specs:
                elem, dims = got[s.name]
                want = 6 if s.dtype.is_floating_point is False else 1            # int32 / float32
                if elem != want or len(dims) != len(s.shape) or any(d not in (None, w) for d, w in zip(dims, s.shape)):
                    return False, f"{rel}: {s.name} has type {elem} shape {dims}, the contract says {s}"
    return True, "clip, controlnet, unet, decoder: names, dtypes and shapes follow the course's contract"


def onnx_sidecars(ev: Evidence) -> Verdict:
    """HW1: each ONNX file's sidecar names its SHA-256, inputs and outputs, opset 18."""
    from course_lib.homework.safezip import sha256_file
    for name in MODELS:
        rel = f"onnx/{name}.onnx"
        side = ev.json(rel + ".json")
        digest = ev.originals.get(rel) or sha256_file(ev.path(rel))
        if side.get("sha256") != digest:
            return False, f"{rel}.json: sha256 {str(side.get('sha256'))[:12]}... is not the file's {digest[:12]}..."
        inputs, outputs = graph_io(onnx_graph(ev.path(rel)))
        if [t.get("name") for t in side.get("inputs", [])] != list(inputs) or side.get("opset") != 18:
            return False, f"{rel}.json: inputs or opset differ from the file (opset {side.get('opset')})"
        if [t.get("name") for t in side.get("outputs", [])] != list(outputs):
            return False, f"{rel}.json: outputs differ from the file"
    return True, "4 sidecars: sha256, inputs, outputs and opset 18 match their ONNX files"


def parity_test(name: str) -> Callable[[Evidence], Verdict]:
    def onnx_parity(ev: Evidence) -> Verdict:
        from course_lib.cnsd import example_inputs
        from course_lib.onnx.compare import compare_outputs
        from course_lib.onnx.session import ort_session, run_ort
        path = ev.with_weights(f"onnx/{name}.onnx")
        reference, graph = ev.reference(), onnx_graph(path)
        contract = contract_of(ev, name, graph)
        feed = example_inputs(contract, ev.input_seed, reference.config.clip.vocab_size)
        want = dict(zip(contract.output_names, run_reference(reference, name, feed)))
        table = compare_outputs(want, run_ort(ort_session(path, ev.providers), feed), rtol=1e-3, atol=1e-4)
        worst = max(r.max_abs for r in table.rows)
        close = len(table.rows) - len(table.failed)
        size = "x".join(map(str, model_size(graph, name)))
        return table.passed, (f"{close}/{len(table.rows)} outputs match the {ev.reference_label} reference on fresh "
                              f"inputs (max abs err {worst:.1e}, {size})")
    onnx_parity.__doc__ = f"HW1: ONNX Runtime runs onnx/{name}.onnx like the reference model in torch."
    return onnx_parity


def _image(ev: Evidence, name: str) -> np.ndarray:
    from course_lib.samples import read_image
    return read_image(ev.path(name))


def _agree(a: np.ndarray, b: np.ndarray, min_psnr: float, what: str) -> Verdict:
    from course_lib.score import max_pixel_diff, psnr
    if a.shape != b.shape:
        return False, f"{what}: shapes {a.shape} and {b.shape} differ"
    value = psnr(a, b)
    if math.isinf(value):
        return True, f"{what}: identical"
    return value >= min_psnr, (f"{what}: PSNR {value:.1f} dB (at least {min_psnr:g}), "
                               f"max pixel diff {max_pixel_diff(a, b)}")


def images_agree(ev: Evidence) -> Verdict:
    """HW1: the canny2image images from torch and from ONNX Runtime agree."""
    return _agree(_image(ev, "images/canny2image_torch.png"), _image(ev, "images/canny2image_ort.png"),
                  IMAGE_MIN_PSNR, "torch vs ONNX Runtime image")


def image_rerun(ev: Evidence) -> Verdict:
    """HW1: canny2image on the reference model, with run.json's settings and input, gives the torch image."""
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.pipeline.eps import GuidedEps
    from course_lib.cnsd.tokenizer import byte_level_tokenizer, get_tokenizer
    run = ev.json("run.json")
    settings = {k: run[k] for k in ("image_resolution", "ddim_steps", "seed", "scale", "strength", "eta",
                                    "low_threshold", "high_threshold") if k in run}
    reference = ev.reference()
    try:
        tokenizer = byte_level_tokenizer() if run.get("tokenizer") == "byte-level" else get_tokenizer()
    except FileNotFoundError as e:
        raise NotRecheckable(f"no CLIP vocabulary on this machine ({e})") from None
    guidance = run.get("guidance", run.get("cfg", "separate"))           # older hand-ins wrote "cfg"
    pipe = Canny2Image.from_torch(reference, tokenizer, device=next(reference.parameters()).device, progress=False,
                                  time_stages=False, eps=GuidedEps(guidance))
    image = pipe.process(_image(ev, "images/input.png"), run.get("prompt", "a bird"), **settings)[0]
    return _agree(image, _image(ev, "images/canny2image_torch.png"), IMAGE_MIN_PSNR,
                  f"re-run ({settings.get('ddim_steps', 20)} steps) vs the handed-in torch image")


def engines(ev: Evidence) -> Verdict:
    """HW1 (GPU): a plan sidecar per model, built from the handed-in ONNX by the manifest's TensorRT and GPU,
    and the TensorRT image agrees with the torch image."""
    from course_lib.homework.safezip import sha256_file
    from course_lib.trt.plan import PlanSidecar
    if not list(ev.root.glob("plans/*.plan.json")):
        raise NotApplicable("no plan sidecars (plans/*.plan.json): the engines were not built")
    tensorrt = (ev.machine.get("versions") or {}).get("tensorrt")
    for name in MODELS:
        side = PlanSidecar.from_dict(ev.json(f"plans/{name}.plan.json"), source=f"plans/{name}.plan.json")
        rel = f"onnx/{name}.onnx"
        digest = ev.originals.get(rel) or sha256_file(ev.path(rel))
        if side.onnx_sha256 != digest:
            return False, f"plans/{name}.plan.json was built from another ONNX file than {rel}"
        if side.tensorrt != tensorrt or side.gpu != ev.gpu:
            return False, (f"plans/{name}.plan.json: {side.describe()}, "
                           f"the manifest says TensorRT {tensorrt} on {ev.gpu}")
    ok, msg = _agree(_image(ev, "images/canny2image_trt.png"), _image(ev, "images/canny2image_torch.png"),
                     TRT_IMAGE_MIN_PSNR, "TensorRT vs torch image")
    return ok, f"4 plans built from these ONNX files with TensorRT {tensorrt} on {ev.gpu}; {msg}"
