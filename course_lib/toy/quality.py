"""What FP16 and INT8 do to the toy's *picture*: the same held-out scenes through fp32 and lower precision.

Chapters 3 and 5 introduce this module, after their per-model numeric errors (max abs, rel L2, cosine):
those say how far each output moved, this says whether the image still follows the hint and the prompt.

* :func:`toy_ort_pipeline` -- a :class:`~course_lib.pipeline.canny2image.Canny2Image` on ONNX Runtime from
  ``{model name: .onnx}`` (mix folders: ``{**fp32, **int8}`` swaps the ControlNet and UNet only).
* :func:`record_toy_calibration` -- chapter 5's calibration recorded on toy scenes of the *training*
  stream (never the held-out evaluation scenes), through any toy pipeline.
* :func:`quantize_controlnet_unet` -- chapter 5's INT8 recipe on the ControlNet and the UNet at once.
* :func:`compare_toy_pipelines` -- :func:`~course_lib.toy.evaluate.evaluate_pipeline` on each pipeline with
  the same scenes and the same noise seeds, plus PSNR and the largest pixel difference of every image
  against the reference pipeline's image of the same scene. ``.table()`` is the Markdown table,
  ``.figure()`` a grid of hints and outputs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from course_lib.toy.data import IMAGE_SIZE, TRAIN_SEED, render, sample_scenes
from course_lib.toy.evaluate import TARGETS, ToyScore, evaluate_pipeline

CALIBRATION_NOISE_SEED = 1         # run i of the calibration starts from noise seed 1 + i


def toy_ort_pipeline(files: Mapping[str, str | os.PathLike], providers: Sequence[str] | None = None,
                     progress: bool = False):
    """Chapter 3 (and 5): the toy's canny2image on ONNX Runtime.

    Args:
        files: ``{model name: path}`` for clip, controlnet, unet and decoder (``export_cnsd``'s results,
            ``to_fp16_onnx``'s or ``quantize_int8``'s results, or plain paths).
        providers: ONNX Runtime providers; default CPU only, so that fp32, FP16 and INT8 rows of one
            table are computed by the same kernels on every machine.
        progress: the pipeline's own bar per image (off: the evaluation and the calibration show theirs).
    Returns a ``Canny2Image`` with the toy's tokenizer and config (64x64 images).
    """
    from course_lib.backends import OrtBackend
    from course_lib.cnsd.config import get_config
    from course_lib.cnsd.contract import MODEL_NAMES
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.toy.weights import toy_tokenizer

    missing = [n for n in MODEL_NAMES if n not in files]
    if missing:
        raise ValueError(f"files: missing {missing}; expected an .onnx for each of {list(MODEL_NAMES)}")
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    backends = {n: OrtBackend(os.fspath(files[n]), providers=providers, name=n) for n in MODEL_NAMES}
    return Canny2Image(backends, toy_tokenizer(), get_config("toy"), progress=progress)


def record_toy_calibration(pipe, out_dir: str | os.PathLike, n: int = 8, seed: int = TRAIN_SEED,
                           ddim_steps: int = 20, step_stride: int = 2, models: Sequence[str] = ("controlnet", "unet"),
                           progress: bool = True):
    """Chapter 5: record the inputs of ``models`` while ``pipe`` draws ``n`` toy scenes (one run each).

    The scenes come from ``seed``'s stream (default: the training stream; the evaluation draws from
    ``EVAL_SEED``), their prompts name them, run i starts from noise seed ``1 + i``. With 20 steps and
    ``step_stride`` 2 each run gives 20 ControlNet and 20 UNet samples. ``out_dir`` is replaced.
    ``progress``: a bar over the runs.
    Returns the :class:`~course_lib.precision.calibration.CalibrationSet`.
    """
    from course_lib.precision.calibration import capture_calibration

    scenes = sample_scenes(n, seed)
    images = list(render(scenes)[0].numpy())
    return capture_calibration(pipe, images, scenes.prompts(), out_dir,
                               seeds=[CALIBRATION_NOISE_SEED + i for i in range(n)], models=list(models),
                               step_stride=step_stride, overwrite=True, progress=progress,
                               image_resolution=IMAGE_SIZE, ddim_steps=ddim_steps)


def quantize_controlnet_unet(fp32_files: Mapping[str, str | os.PathLike], calib, out_dir: str | os.PathLike,
                             runs: Sequence[int] | None = None, keep_float: Sequence[str] = ("time_embed", "first_last_conv"),
                             method: str = "ort", models: Sequence[str] = ("controlnet", "unet"),
                             progress: bool = True) -> dict:
    """Chapter 5: chapter 5's recipe on each of ``models``: ``quantize_int8`` calibrated on ``calib``'s
    ``runs`` (default all), the ``keep_float`` groups of ``sensitive_nodes`` left float.

    Writes ``out_dir/<name>.int8.onnx`` (+ sidecar); returns ``{name: QuantizeResult}``, usable as paths.
    """
    from course_lib.precision.int8 import quantize_int8, sensitive_nodes

    results = {}
    for name in models:
        groups = sensitive_nodes(fp32_files[name])
        results[name] = quantize_int8(fp32_files[name], os.path.join(out_dir, f"{name}.int8.onnx"),
                                      calib.reader(name, runs=runs), method=method, progress=progress,
                                      exclude_nodes={g: groups[g] for g in keep_float})
    return results


@dataclass(frozen=True)
class PrecisionRow:
    """One pipeline of a :class:`PrecisionComparison`: its toy score and its images against the reference's."""
    name: str
    score: ToyScore
    psnr_db: float            # over all scenes' pixels together (inf: every image identical)
    worst_psnr_db: float      # the scene that moved most
    max_pixel_diff: int       # over all scenes, 0 .. 255
    identical: int            # scenes whose image is bit for bit the reference's


@dataclass
class PrecisionComparison:
    """Chapter 3 (and 5): toy scores of several pipelines on the same scenes, and their images' agreement."""
    reference: str
    rows: list[PrecisionRow]
    images: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(repr=False)

    def row(self, name: str) -> PrecisionRow:
        found = [r for r in self.rows if r.name == name]
        if not found:
            raise ValueError(f"pipeline {name!r}: expected one of {[r.name for r in self.rows]}")
        return found[0]

    def f1_change(self, name: str) -> float:
        """Edge F1 of ``name`` minus the reference's (negative: it follows the hint less well)."""
        return self.row(name).score.edge_f1 - self.row(self.reference).score.edge_f1

    def colour_change(self, name: str) -> float:
        """Colour accuracy of ``name`` minus the reference's."""
        return self.row(name).score.colour_accuracy - self.row(self.reference).score.colour_accuracy

    def table(self) -> str:
        """The Markdown table: edge F1 and colour accuracy with their change, then PSNR / pixel diffs."""
        ref = self.reference
        rows = [f"| pipeline | edge F1 (>= {TARGETS['edge_f1']}) | Δ F1 vs {ref} | colour accuracy "
                f"(>= {TARGETS['colour_accuracy']:.0%}) | Δ colour vs {ref} | PSNR vs {ref} | worst scene | "
                f"max pixel diff | identical images | scenes |", "|" + "---|" * 10]
        for r in self.rows:
            own = r.name == ref
            dash = "–"
            rows.append(f"| {r.name} | {r.score.edge_f1:.3f} | {dash if own else f'{self.f1_change(r.name):+.3f}'} | "
                        f"{r.score.colour_accuracy:.1%} | "
                        f"{dash if own else f'{self.colour_change(r.name) * 100:+.1f} pt'} | "
                        f"{dash if own else _db(r.psnr_db)} | {dash if own else _db(r.worst_psnr_db)} | "
                        f"{dash if own else r.max_pixel_diff} | {dash if own else f'{r.identical}/{r.score.n}'} | "
                        f"{r.score.n} |")
        return "\n".join(rows)

    def figure(self, k: int = 6, amplify: int = 10, figsize: tuple[float, float] | None = None):
        """A grid for the first ``k`` scenes: the hint, every pipeline's output, and for each other pipeline
        its absolute difference from the reference's image, ``amplify`` times brighter (clipped at 255).
        Returns the matplotlib Figure (``figsize`` default: 1.6 in per panel)."""
        import matplotlib.pyplot as plt

        ref_images = self.images[self.reference]
        k = min(k, len(ref_images))
        others = [r.name for r in self.rows if r.name != self.reference]
        panels = [("hint", [im[1] for im in ref_images])]
        panels += [(r.name, [im[2] for im in self.images[r.name]]) for r in self.rows]
        panels += [(f"{o}\n|diff| x{amplify}",
                    [np.clip(np.abs(a[2].astype(np.int16) - b[2].astype(np.int16)) * amplify, 0, 255).astype(np.uint8)
                     for a, b in zip(self.images[o], ref_images)]) for o in others]
        fig, axes = plt.subplots(len(panels), k, figsize=figsize or (1.6 * k, 1.6 * len(panels)), squeeze=False)
        for r, (title, images) in enumerate(panels):
            for c in range(k):
                ax = axes[r, c]
                ax.imshow(images[c])
                ax.set_xticks([]), ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(title, fontsize=8)
        fig.tight_layout()
        return fig


def _db(value: float) -> str:
    return "identical" if value == float("inf") else f"{value:.1f} dB"


def compare_toy_pipelines(pipes: Mapping[str, object], n: int = 12, ddim_steps: int = 20,
                          reference: str | None = None, **evaluate_kwargs) -> PrecisionComparison:
    """Chapter 3 (and 5): score each pipeline on the same ``n`` held-out scenes and noise seeds.

    Args:
        pipes: ``{row name: Canny2Image}``, e.g. ``{"fp32": ..., "fp16": ...}``; the first is the reference
            unless ``reference`` names another.
        n, ddim_steps: held-out scenes and DDIM steps (``evaluate_pipeline``'s; CFG 9).
        evaluate_kwargs: passed to :func:`~course_lib.toy.evaluate.evaluate_pipeline` (seed, scale, ...;
            ``progress`` defaults to True here: a bar over each pipeline's scenes).
    Returns a :class:`PrecisionComparison` (its rows in the order of ``pipes``).
    """
    from course_lib.score import max_pixel_diff, psnr

    if not pipes:
        raise ValueError("pipes: expected at least one pipeline, e.g. {'fp32': ..., 'fp16': ...}")
    reference = reference if reference is not None else next(iter(pipes))
    if reference not in pipes:
        raise ValueError(f"reference {reference!r}: expected one of {list(pipes)}")
    if "deadline" in evaluate_kwargs:
        raise ValueError("deadline: every pipeline must see the same scenes; pass a smaller n instead")
    evaluate_kwargs.setdefault("progress", True)
    scores, images = {}, {}
    for name, pipe in pipes.items():
        images[name] = []
        scores[name] = evaluate_pipeline(pipe, name, n=n, ddim_steps=ddim_steps, keep_images=images[name],
                                         **evaluate_kwargs)
    ref = np.stack([im[2] for im in images[reference]])
    rows = []
    for name in pipes:
        out = np.stack([im[2] for im in images[name]])
        per_scene = [psnr(a, b) for a, b in zip(ref, out)]
        rows.append(PrecisionRow(name, scores[name], psnr(ref, out), min(per_scene), max_pixel_diff(ref, out),
                                 sum(bool(np.array_equal(a, b)) for a, b in zip(ref, out))))
    return PrecisionComparison(reference, rows, images)


__all__ = ["PrecisionComparison", "PrecisionRow", "compare_toy_pipelines", "quantize_controlnet_unet",
           "record_toy_calibration", "toy_ort_pipeline"]
