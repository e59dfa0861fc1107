"""How well a canny2image pipeline follows its hint and its prompt, on held-out toy scenes.

Chapter 1 introduces :func:`evaluate_pipeline` on the trained toy (and on random weights, the floor);
chapters 3 and 5 call it on FP16 and INT8 pipelines: it takes any :class:`~course_lib.pipeline.
canny2image.Canny2Image`, whatever its backends. For each held-out scene the pipeline gets the scene's
image (it draws the hint itself, with the course's Canny) and its prompt; the output is scored with
:func:`~course_lib.toy.metrics.edge_f1` (its Canny edges against the hint) and
:func:`~course_lib.toy.metrics.read_colour` (shape and background colour against the prompt's).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from course_lib.pipeline.hint import canny_hint
from course_lib.toy.data import COLOUR_NAMES, EVAL_SEED, IMAGE_SIZE, render, sample_scenes
from course_lib.toy.metrics import DEFAULT_TOLERANCE, edge_f1, read_colour, regions

TARGETS = {"edge_f1": 0.6, "colour_accuracy": 0.8}   # issue #18, at 20 DDIM steps and CFG 9


@dataclass
class ToyScore:
    """The evaluation of one pipeline: means over ``n`` held-out scenes (accuracies in [0, 1])."""
    name: str
    n: int
    edge_f1: float
    edge_precision: float
    edge_recall: float
    colour_accuracy: float              # shape and background read-backs together
    shape_colour_accuracy: float
    background_colour_accuracy: float
    ddim_steps: int
    scale: float
    tolerance: int
    seconds: float
    per_scene_f1: list[float] = field(default_factory=list, repr=False)

    def meets_targets(self) -> bool:
        return self.edge_f1 >= TARGETS["edge_f1"] and self.colour_accuracy >= TARGETS["colour_accuracy"]

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_pipeline(pipe, name: str = "", n: int = 32, seed: int = EVAL_SEED, ddim_steps: int = 20,
                      scale: float = 9.0, tolerance: int = DEFAULT_TOLERANCE, noise_seed: int = 2946901,
                      keep_images: list | None = None, progress: bool = False, deadline: float | None = None,
                      **process_kwargs) -> ToyScore:
    """Chapter 1: score ``pipe`` (a Canny2Image on 64x64 toy images) on ``n`` held-out scenes.

    Args:
        pipe: a :class:`Canny2Image` over any backends (torch, ONNX Runtime, TensorRT; fp32, FP16, INT8).
        name: the row's name in the table ("trained", "random", "fp16", ...).
        n, seed: how many held-out scenes, and the seed they are drawn from (not the training seed).
        ddim_steps, scale: DDIM steps and guidance scale (the issue's targets are at 20 and 9).
        tolerance: edge match distance in pixels. noise_seed: scene i starts from ``noise_seed + i``.
        keep_images: a list to append ``(input image, edge map, output)`` per scene to (for figures).
        progress: a bar over the scenes. process_kwargs: passed to ``pipe.process`` (a_prompt, n_prompt, ...).
        deadline: a ``time.perf_counter()`` value after which no new scene is started (``n`` in the result
            then counts the scenes scored; at least one always is).

    Returns a :class:`ToyScore`. The pipeline's own progress bar is switched off while it runs.
    """
    from course_lib.progress import tqdm

    scenes = sample_scenes(n, seed)
    images, cover = render(scenes)
    images, cover = images.numpy(), cover.numpy()
    f1s, precisions, recalls, shape_ok, background_ok = [], [], [], [], []
    start, was = time.perf_counter(), pipe.progress
    pipe.progress = False
    try:
        for i in tqdm(range(n), desc=f"evaluate {name}".strip(), disable=not progress):
            if i and deadline is not None and time.perf_counter() >= deadline:
                break
            out = pipe.process(images[i], scenes.prompt(i), image_resolution=IMAGE_SIZE, ddim_steps=ddim_steps,
                               scale=scale, seed=noise_seed + i, **process_kwargs)[0]
            hint = pipe.last_edge_map[..., 0]
            edges = canny_hint(out)[0][..., 0]
            p, r, f = edge_f1(edges, hint, tolerance)
            precisions.append(p), recalls.append(r), f1s.append(f)
            inside, outside = regions(cover[i])
            shape_ok.append(read_colour(out, inside) == COLOUR_NAMES[int(scenes.colour[i])])
            background_ok.append(read_colour(out, outside) == COLOUR_NAMES[int(scenes.background[i])])
            if keep_images is not None:
                keep_images.append((images[i], pipe.last_edge_map, out))
    finally:
        pipe.progress = was
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return ToyScore(name=name, n=len(f1s), edge_f1=mean(f1s), edge_precision=mean(precisions), edge_recall=mean(recalls),
                    colour_accuracy=mean(shape_ok + background_ok), shape_colour_accuracy=mean(shape_ok),
                    background_colour_accuracy=mean(background_ok), ddim_steps=ddim_steps, scale=scale,
                    tolerance=tolerance, seconds=time.perf_counter() - start, per_scene_f1=f1s)


def evaluation_table(scores: list[ToyScore]) -> str:
    """Chapter 1: the scores as a Markdown table (one row per pipeline), targets in the header."""
    head = (f"| weights | edge F1 (>= {TARGETS['edge_f1']}) | precision | recall | colour accuracy "
            f"(>= {TARGETS['colour_accuracy']:.0%}) | shape | background | scenes | DDIM steps | CFG | tolerance |")
    rows = [head, "|" + "---|" * 11]
    for s in scores:
        rows.append(f"| {s.name} | {s.edge_f1:.3f} | {s.edge_precision:.3f} | {s.edge_recall:.3f} | "
                    f"{s.colour_accuracy:.1%} | {s.shape_colour_accuracy:.1%} | {s.background_colour_accuracy:.1%} | "
                    f"{s.n} | {s.ddim_steps} | {s.scale:g} | {s.tolerance} px |")
    return "\n".join(rows)
