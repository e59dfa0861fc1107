"""``python -m course_lib train-toy``: train the toy CNSD from nothing, save it, evaluate it, describe it.

One call does everything into ``out``: draws the data pool, runs the three stages of
:mod:`course_lib.toy.train` within a wall-clock budget, writes the weights in the real checkpoint's layout
(``cnsd_toy.safetensors``), reloads them with ``load_checkpoint`` and scores them through the course's
own Canny2Image next to random weights (``evaluation.json``), and writes ``loss_curve.png``,
``samples.png`` and the card ``cnsd_toy.json`` (data seed, steps, losses, evaluation, versions, command).
Copy the .safetensors and the card into ``course_lib/data/`` to ship them.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from course_lib.cnsd.config import get_config
from course_lib.cnsd.model import build_cnsd
from course_lib.files import save_png, sha256_file, write_json
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.toy.data import COLOURS, EVAL_SEED, IMAGE_SIZE, SHAPES, TRAIN_SEED, ShapesData
from course_lib.toy.evaluate import TARGETS, ToyScore, evaluate_pipeline, evaluation_table
from course_lib.toy.train import (RECIPES, SUFFIXES, UNCOND, Recipe, StageLog, TextTable, calibrate_latents,
                                  train_controlnet, train_unet, train_vae)
from course_lib.toy.vae_encoder import VAEEncoder
from course_lib.toy.weights import CARD_NAME, WEIGHTS_NAME, load_toy, save_safetensors, toy_checkpoint_state, toy_tokenizer


SAVE_RESERVE_S = 10.0     # seconds kept between training and evaluation for saving and reloading


def _say(msg: str) -> None:
    print(msg, flush=True)


def _versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import cv2
        out["opencv"] = cv2.__version__
    except ImportError:
        out["opencv"] = None
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(device)
    try:
        root = Path(__file__).resolve().parents[2]
        out["course_lib_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                                  text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["course_lib_commit"] = None
    return out


def plot_losses(logs: list[StageLog], path: Path) -> Path | None:
    """Loss per step of each stage (light) and its 100-step moving average, one panel a stage, log scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say(f"matplotlib is not installed: no {path.name} (the losses are in the card)")
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3.2))
    for ax, log in zip(np.atleast_1d(axes), logs):
        y = np.asarray(log.losses)
        ax.plot(y, lw=0.5, alpha=0.35)
        if len(y) >= 100:
            ax.plot(np.arange(99, len(y)), np.convolve(y, np.ones(100) / 100, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(f"{log.name}: {log.steps} steps, batch {log.batch}")
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("loss")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_samples(rows: dict[str, list], path: Path, count: int = 8) -> Path | None:
    """One row of hints, then one row of outputs per pipeline, for the first ``count`` held-out scenes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    first = next(iter(rows.values()))
    count = min(count, len(first))
    grid = [("input", [x[0] for x in first]), ("hint", [x[1] for x in first])]
    grid += [(name, [x[2] for x in kept]) for name, kept in rows.items()]
    fig, axes = plt.subplots(len(grid), count, figsize=(1.5 * count, 1.5 * len(grid)), squeeze=False)
    for r, (name, images) in enumerate(grid):
        for c in range(count):
            axes[r, c].imshow(images[c])
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def train_toy(out: str | Path, device: str = "cuda", recipe: str | Recipe = "gpu", budget_s: float | None = None,
              eval_n: int = 64, eval_steps: int = 20, eval_share: float = 0.2, seed: int = 0,
              progress: bool = True, command: str | None = None, **overrides) -> dict:
    """Train, save, evaluate and describe the toy CNSD into folder ``out``; returns the card (a dict).

    Args:
        device: "cuda" or "cpu". recipe: a name in ``RECIPES`` or a :class:`Recipe`; ``overrides``
            replace its fields (e.g. ``batch=128``).
        budget_s: wall-clock seconds for the whole call (None: every planned step, no limit). The
            evaluation gets ``eval_share`` of it at the end; the three stages share what is left after
            drawing the data by ``recipe.budget_shares`` (a stage that ends early leaves its time to the next).
        eval_n, eval_steps: held-out scenes (at most; the budget may score fewer, the same number for
            trained and random weights) and DDIM steps of the evaluation (CFG 9).
        seed: torch's seed for initialisation and sampling. command: for the card.
    """
    start = time.perf_counter()
    out, dev = Path(out), torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here (use --device cpu)")
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    recipe = dataclasses.replace(recipe, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    config = get_config("toy")
    _say(f"train-toy: {recipe}, device {dev}, budget {budget_s} s")

    t0 = time.perf_counter()
    data = ShapesData(recipe.pool, seed=TRAIN_SEED, device=dev)
    data.make_hints()
    _say(f"data: {data.n} scenes of {IMAGE_SIZE}x{IMAGE_SIZE} with canny hints in {time.perf_counter() - t0:.1f} s")

    model = build_cnsd(config, seed=None)                   # PyTorch's init + ldm's zero_module layers
    with torch.no_grad():                                   # CLIP's own init of its embeddings
        model.clip.text_model.embeddings.token_embedding.weight.normal_(0.0, 0.02)
        model.clip.text_model.embeddings.position_embedding.weight.normal_(0.0, 0.01)
    model, encoder = model.to(dev).train(), VAEEncoder(config.vae).to(dev).train()
    text = TextTable(toy_tokenizer(), dev)

    t_train = time.perf_counter()
    end_all = start + budget_s if budget_s else math.inf
    window = end_all - eval_share * budget_s - SAVE_RESERVE_S - t_train if budget_s else math.inf
    if window <= 0:
        raise ValueError(f"--budget-s {budget_s}: no time left for training after drawing the data")
    ends = np.cumsum(recipe.budget_shares) / sum(recipe.budget_shares)
    deadline = lambda i: t_train + window * ends[i]  # noqa: E731
    logs = [train_vae(encoder, model.vae_decoder, data, recipe, deadline(0), progress)]
    posterior0 = calibrate_latents(encoder, model.vae_decoder, data)
    posterior, latent_std = posterior0[:2], posterior0[2]
    _say(f"vae: {logs[-1].steps} steps, loss {logs[-1].final_loss():.4f}; latent std {latent_std:.3f} "
         f"-> scaled so that latent * 0.18215 has std 1")
    logs.append(train_unet(model, data, posterior, text, recipe, deadline(1), progress))
    _say(f"unet+clip: {logs[-1].steps} steps, loss {logs[-1].final_loss():.4f}")
    logs.append(train_controlnet(model, data, posterior, text, recipe, deadline(2), progress))
    _say(f"controlnet: {logs[-1].steps} steps, loss {logs[-1].final_loss():.4f}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_seconds = time.perf_counter() - t_train
    del data, posterior

    weights = save_safetensors(toy_checkpoint_state(model.cpu().eval(), encoder.cpu().eval()), out / WEIGHTS_NAME,
                               metadata={"format": "pt", "model": "cnsd-toy", "config": "toy"})
    plot_losses(logs, out / "loss_curve.png")

    # the evaluation: the saved file through load_checkpoint, then random weights, same scenes and noise
    scores: list[ToyScore] = []
    kept: dict[str, list] = {}
    tokenizer = toy_tokenizer()
    t_eval = time.perf_counter()
    for name, make in (("trained", lambda: load_toy(weights, dev)), ("random", lambda: build_cnsd(config, seed=0))):
        pipe = Canny2Image.from_torch(make(), tokenizer, device=dev, progress=False)
        kept[name] = []
        n = scores[0].n if scores else eval_n                 # random weights: the scenes the trained model got
        halfway = t_eval + (end_all - t_eval) / 2 if budget_s else None
        scores.append(evaluate_pipeline(pipe, name, n=n, ddim_steps=eval_steps, keep_images=kept[name],
                                        progress=progress, deadline=None if scores else halfway))
        _say(f"evaluate {name}: edge F1 {scores[-1].edge_f1:.3f}, colour accuracy {scores[-1].colour_accuracy:.1%} "
             f"({scores[-1].seconds:.0f} s)")
    table = evaluation_table(scores)
    plot_samples(kept, out / "samples.png")
    write_json(out / "evaluation.json", {"targets": TARGETS, "eval_seed": EVAL_SEED,
                                         "scores": {s.name: s.as_dict() for s in scores}, "table": table})

    card = {
        "name": "cnsd_toy", "file": WEIGHTS_NAME, "bytes": weights.stat().st_size, "sha256": sha256_file(weights),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv), "config": dataclasses.asdict(config),
        "parameters": {**model.parameter_counts(), "vae_encoder": sum(p.numel() for p in encoder.parameters())},
        "tokenizer": "byte_level_tokenizer(compact=True): one id per byte, BOS 512, EOS 513",
        "data": {"generator": "course_lib.toy.data", "seed": TRAIN_SEED, "pool": recipe.pool, "image_size": IMAGE_SIZE,
                 "shapes": list(SHAPES), "colours": COLOURS, "prompt_suffixes": list(SUFFIXES),
                 "uncond_prompts": list(UNCOND), "eval_seed": EVAL_SEED},
        "training": {"device": str(dev), "seed": seed, "recipe": dataclasses.asdict(recipe), "budget_s": budget_s,
                     "seconds": round(train_seconds, 1), "latent_std_before_scaling": latent_std,
                     "stages": {log.name: log.summary() for log in logs},
                     "losses_every_10_steps": {log.name: log.losses[::10] for log in logs}},
        "evaluation": {s.name: {k: v for k, v in s.as_dict().items() if k != "per_scene_f1"} for s in scores},
        "evaluation_targets": TARGETS, "meets_targets": scores[0].meets_targets(),
        "versions": _versions(dev), "total_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / CARD_NAME, card)
    _say(table)
    _say(f"train-toy done in {card['total_seconds']:.0f} s (training {train_seconds:.0f} s): {out / WEIGHTS_NAME} "
         f"({card['bytes'] / 1e6:.1f} MB), targets met: {card['meets_targets']}")
    return card
