"""canny2image: a photo and a prompt in, generated images out -- the course's pipeline.

Chapter 1 runs it on PyTorch (:meth:`Canny2Image.from_torch`); chapter 2 swaps the four sub-models for
ONNX Runtime or TensorRT backends (:mod:`course_lib.backends`) without touching anything else;
chapter 3 measures the switches (``cfg="batched"``, cached text encodings, CUDA graphs in the backends).

:meth:`Canny2Image.process` keeps the signature and defaults of the course's ``hackathon.process``
(ControlNet 1.0's ``gradio_canny2image.py``) and does, in order:

1. resize the photo (short side -> ``image_resolution``, multiples of 64) and draw its Canny edges:
   the ``hint`` (B, 3, H, W) in [0, 1], computed once per image and shared by cond and uncond;
2. encode ``prompt + ", " + a_prompt`` (cond) and ``n_prompt`` (uncond) with CLIP, once per image;
3. draw the starting noise x_T from ``seed``;
4. DDIM: at each of the 20 steps ControlNet gives 13 residuals (times the control scales), the UNet
   predicts the noise, classifier-free guidance mixes cond and uncond (:mod:`.sampler`);
5. decode ``latent / 0.18215`` with the VAE decoder and map [-1, 1] to uint8 HWC images.

One deliberate difference from the original: x_T comes from a CPU ``torch.Generator`` seeded with
``seed`` (the original calls ``seed_everything(seed)`` and draws x_T on the GPU). The same seed
therefore gives the same noise on every machine, CPU or GPU -- but not the original's noise; pass
``x_T=`` to :meth:`process` to reproduce a run of the original exactly.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from course_lib.backends import Backend, TorchBackend
from course_lib.cnsd.config import LATENT_SCALE, CNSDConfig
from course_lib.cnsd.contract import MODEL_NAMES, NUM_CONTROLS, contracts
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image
from course_lib.pipeline.sampler import CFG_MODES, ddim_sample, guided_eps, make_ddim_schedule

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = "longbody, lowres, bad anatomy, bad hands, missing fingers"
GUESS_MODE_BASE = 0.825   # guess mode: control i is scaled by strength * 0.825 ** (12 - i)


def control_scales(strength: float = 1.0, guess_mode: bool = False) -> list[float]:
    """Chapter 1: the 13 control scales: ``[strength] * 13``, or in guess mode growing from the shallowest
    residual (0.825 ** 12 ~ 0.1) to the middle block's (1.0), times ``strength``, as the original."""
    if guess_mode:
        return [strength * (GUESS_MODE_BASE ** float(NUM_CONTROLS - 1 - i)) for i in range(NUM_CONTROLS)]
    return [strength] * NUM_CONTROLS


@dataclass
class StageTimings:
    """Chapter 1: wall time of each stage of the last :meth:`Canny2Image.process` call, in milliseconds.

    ``steps`` holds one entry per DDIM step: the ControlNet + UNet calls and guidance (all CFG branches).
    On CUDA each stage ends with ``torch.cuda.synchronize()``, so the numbers are real GPU time. With
    ``time_stages=False`` only ``total`` is measured (it ends with the copy of the images to the host).
    """
    clip: float = 0.0
    steps: list[float] = field(default_factory=list)
    decoder: float = 0.0
    total: float = 0.0

    def summary(self) -> dict[str, float]:
        """The stages as one flat dict (ms): clip, controlnet+unet (all steps), per step (mean), decoder, total."""
        steps = sum(self.steps)
        return {"clip": self.clip, "controlnet+unet": steps,
                "per step": steps / len(self.steps) if self.steps else 0.0,
                "decoder": self.decoder, "total": self.total}


class Canny2Image:
    """Chapter 1: the canny2image pipeline over four backends (chapter 2: any :class:`Backend`).

    Args:
        backends: ``{"clip", "controlnet", "unet", "decoder"}`` -> a backend following the contract.
        tokenizer: ``tokenizer(list[str]) -> IntTensor (B, 77)`` (:mod:`course_lib.cnsd.tokenizer`).
        config: the :class:`CNSDConfig` the models were built from (latent channels).
        device: where latents, hints and contexts live ("cpu" or "cuda").
        stream: an optional ``torch.cuda.Stream``; the whole process() runs on it.
        cfg: ``"separate"`` (the original: two calls per model per step) or ``"batched"`` (chapter 3).
        cache_text: keep CLIP encodings by prompt across process() calls (chapter 3's "text once").
        progress: show a tqdm bar over the DDIM steps.
        record_latents: keep ``[x_T, x after step 1, ..., x after step S]`` (CPU copies) in
            ``self.last_latents`` -- what chapter 2 compares between backends step by step.
        time_stages: record per-stage times in ``self.last_timings``; on CUDA that synchronizes after
            every stage and step, so switch it off when only the total latency matters (chapter 3).

    After each process(): ``last_edge_map`` (uint8 HxWx3), ``last_seed``, ``last_timings``
    (:class:`StageTimings`) and, when asked, ``last_latents``. The switches are plain attributes:
    ``pipe.cfg = "batched"`` between calls is fine.
    """

    def __init__(self, backends: Mapping[str, Backend], tokenizer: Callable[[list[str]], torch.Tensor],
                 config: CNSDConfig, device: str | torch.device = "cpu", stream=None, *,
                 cfg: str = "separate", cache_text: bool = False, progress: bool = True,
                 record_latents: bool = False, time_stages: bool = True):
        missing = [n for n in MODEL_NAMES if n not in backends]
        if missing:
            raise ValueError(f"backends: missing {missing}; expected one for each of {list(MODEL_NAMES)}")
        if cfg not in CFG_MODES:
            raise ValueError(f"cfg {cfg!r}: expected one of {CFG_MODES}")
        self.backends = dict(backends)
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.stream = stream
        self.cfg = cfg
        self.cache_text = cache_text
        self.progress = progress
        self.record_latents = record_latents
        self.time_stages = time_stages
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.last_edge_map: np.ndarray | None = None
        self.last_seed: int | None = None
        self.last_latents: list[torch.Tensor] = []
        self.last_timings = StageTimings()

    @classmethod
    def from_torch(cls, cnsd: torch.nn.Module, tokenizer, device: str | torch.device = "cpu",
                   **kwargs) -> "Canny2Image":
        """Chapter 1: the pipeline on PyTorch: each sub-model of ``cnsd`` in a :class:`TorchBackend`.

        ``cnsd`` (from ``build_cnsd`` / ``load_checkpoint``) is moved to ``device``; ``kwargs`` go to
        the constructor (stream, cfg, cache_text, progress, record_latents, time_stages).
        """
        cnsd = cnsd.to(device).eval()
        table = contracts(cnsd.config)
        backends = {n: TorchBackend(cnsd.positional(n), table[n]) for n in MODEL_NAMES}
        return cls(backends, tokenizer, cnsd.config, device=device, **kwargs)

    # ------------------------------------------------------------------------------------- stages
    def _sync(self) -> None:
        if self.time_stages and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Chapter 1: CLIP's ``last_hidden_state`` (B, 77, C) for a list of prompts (cached if asked)."""
        key = tuple(texts)
        if self.cache_text and key in self._text_cache:
            return self._text_cache[key]
        ids = self.tokenizer(list(texts)).to(device=self.device, dtype=torch.int32)
        context = self.backends["clip"].infer({"input_ids": ids})["last_hidden_state"]
        if self.cache_text:
            self._text_cache[key] = context
        return context

    def clear_text_cache(self) -> None:
        """Chapter 3: forget cached text encodings (e.g. after swapping the CLIP backend)."""
        self._text_cache.clear()

    def decode(self, latent: torch.Tensor) -> list[np.ndarray]:
        """Chapter 1: VAE-decode latents (B, 4, h, w) into uint8 HxWx3 images (``x * 127.5 + 127.5``)."""
        images = self.backends["decoder"].infer({"latent": 1.0 / LATENT_SCALE * latent})["images"]
        images = (images.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
        return [images[i] for i in range(images.shape[0])]

    # ------------------------------------------------------------------------------------ process
    def process(self, input_image: np.ndarray, prompt: str, a_prompt: str = A_PROMPT, n_prompt: str = N_PROMPT,
                num_samples: int = 1, image_resolution: int = 256, ddim_steps: int = 20,
                guess_mode: bool = False, strength: float = 1.0, scale: float = 9.0, seed: int = 2946901,
                eta: float = 0.0, low_threshold: int = 100, high_threshold: int = 200, *,
                x_T: torch.Tensor | None = None) -> list[np.ndarray]:
        """Chapter 1: generate ``num_samples`` images that follow the edges of ``input_image``.

        Arguments and defaults are the course's scoring settings (``hackathon.process``): prompts,
        1 sample, resolution 256, 20 DDIM steps, no guess mode, strength 1, guidance scale 9,
        seed 2946901 (-1: a random seed, kept in ``last_seed``), eta 0, Canny thresholds 100/200.
        ``x_T`` (keyword only): start from this noise (num_samples, 4, H/8, W/8) instead of the seed's.

        Returns a list of ``num_samples`` uint8 HxWx3 images, like the course's ``hackathon.process``
        (gradio's version also puts the inverted edge map first; here it is ``self.last_edge_map``).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples {num_samples!r}: expected a positive integer")
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream:
            return self._process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                                 ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                                 high_threshold, x_T)

    def _process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                 guess_mode, strength, scale, seed, eta, low_threshold, high_threshold, x_T):
        timings = StageTimings()
        start = time.perf_counter()
        schedule = make_ddim_schedule(ddim_steps, eta)
        # 1. image -> hint (B, 3, H, W), shared by cond and uncond
        image = resize_image(hwc3(input_image), image_resolution)
        height, width = image.shape[:2]
        edge_map, hint = canny_hint(image, low_threshold, high_threshold)
        hint = hint.to(self.device).repeat(num_samples, 1, 1, 1)
        # 2. text -> contexts (B, 77, C)
        t0 = time.perf_counter()
        cond = self.encode_text([prompt + ", " + a_prompt] * num_samples)
        uncond = self.encode_text([n_prompt] * num_samples)
        if self.time_stages:
            self._sync()
            timings.clip = (time.perf_counter() - t0) * 1e3
        # 3. seed -> x_T (B, 4, H/8, W/8), drawn on the CPU so every device gets the same noise
        if seed == -1:
            seed = random.randint(0, 65535)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        shape = (num_samples, self.config.unet.in_channels, height // 8, width // 8)
        if x_T is None:
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T shape {tuple(x_T.shape)}: expected {shape} for this image and num_samples")
        x = x_T.to(self.device, torch.float32)
        latents = [x.cpu().clone()] if self.record_latents else []
        # 4. DDIM with classifier-free guidance
        scales = control_scales(strength, guess_mode)

        def eps_fn(x_t: torch.Tensor, timestep: int) -> torch.Tensor:
            t1 = time.perf_counter()
            eps = guided_eps(self.backends["controlnet"], self.backends["unet"], x_t, timestep, cond, uncond,
                             hint, scales, scale, cfg=self.cfg, guess_mode=guess_mode)
            if self.time_stages:
                self._sync()
                timings.steps.append((time.perf_counter() - t1) * 1e3)
            return eps

        def record(i: int, timestep: int, x_prev: torch.Tensor, pred_x0: torch.Tensor) -> None:
            latents.append(x_prev.cpu().clone())

        samples = ddim_sample(eps_fn, x, schedule, generator=generator, progress=self.progress,
                              callback=record if self.record_latents else None)
        # 5. latent -> uint8 images
        t2 = time.perf_counter()
        results = self.decode(samples)                                # ends with a copy to the host
        if self.time_stages:
            timings.decoder = (time.perf_counter() - t2) * 1e3
        timings.total = (time.perf_counter() - start) * 1e3
        self.last_edge_map, self.last_seed, self.last_timings = edge_map, int(seed), timings
        self.last_latents = latents
        return results
