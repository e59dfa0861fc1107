"""canny2image: a photo and a prompt in, generated images out -- the course's pipeline. Chapter 1.

:meth:`Canny2Image.process` keeps the signature and defaults of the course's ``hackathon.process``
(ControlNet 1.0's ``gradio_canny2image.py``). The backends (chapter 2) say what runs each sub-model;
the eps strategy (:mod:`.eps`, chapter 3) says how each DDIM step gets its noise prediction.

One deliberate difference from the original: x_T comes from a CPU ``torch.Generator`` seeded with
``seed`` (the original draws it on the GPU after ``seed_everything``), so a seed gives the same noise on
every machine but not the original's; pass ``x_T=`` to reproduce a run of the original exactly.
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
from course_lib.pipeline.eps import Conditioning, EpsStrategy, GuidedEps
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image
from course_lib.pipeline.sampler import ddim_sample, make_ddim_schedule

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
    """Chapter 1: milliseconds of each stage of the last ``process()``; ``with timings("clip"): ...`` times one.

    ``steps`` has one entry per DDIM step (ControlNet + UNet + guidance), or one for all of them when
    the eps strategy runs the whole loop (chapter 3's loop graph). Stages end with a CUDA
    synchronize on a GPU, so they are real GPU time. Disabled, only ``total`` is measured (it ends with
    the images' copy to the host, which waits for the GPU anyway).
    """
    clip: float = 0.0
    steps: list[float] = field(default_factory=list)
    decoder: float = 0.0
    total: float = 0.0
    enabled: bool = field(default=True, repr=False)
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if not self.enabled and stage != "total":
            yield
            return
        start = time.perf_counter()
        yield
        if stage != "total" and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - start) * 1e3
        if stage == "steps":
            self.steps.append(ms)
        else:
            setattr(self, stage, ms)

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
        tokenizer: ``tokenizer(list[str]) -> IntTensor (B, 77)``.
        config: the :class:`CNSDConfig` the models were built from (latent channels).
        device: where latents, hints and contexts live; ``stream``: a ``torch.cuda.Stream`` to run on.
        eps: how each DDIM step gets eps (:mod:`course_lib.pipeline.eps`); default ``GuidedEps("separate")``,
            the original's two calls per model per step.
        cache_text: keep CLIP encodings by prompt across calls (chapter 3).
        progress: a tqdm bar over the DDIM steps.
        record_latents: keep x_T and the latent after every step (CPU copies) in ``last_latents``.
        time_stages: per-stage times in ``last_timings`` (synchronizes after each stage on a GPU).

    After each process(): ``last_edge_map`` (uint8 HxWx3), ``last_seed``, ``last_timings``, ``last_latents``.
    Every argument after ``stream`` is a plain attribute, e.g. ``pipe.eps = GuidedEps("batched")``.
    """

    def __init__(self, backends: Mapping[str, Backend], tokenizer: Callable[[list[str]], torch.Tensor],
                 config: CNSDConfig, device: str | torch.device = "cpu", stream=None, *,
                 eps: EpsStrategy | None = None, cache_text: bool = False, progress: bool = True,
                 record_latents: bool = False, time_stages: bool = True):
        missing = [n for n in MODEL_NAMES if n not in backends]
        if missing:
            raise ValueError(f"backends: missing {missing}; expected one for each of {list(MODEL_NAMES)}")
        self.backends, self.tokenizer, self.config = dict(backends), tokenizer, config
        self.device, self.stream = torch.device(device), stream
        self.eps = eps if eps is not None else GuidedEps()
        self.cache_text, self.progress = cache_text, progress
        self.record_latents, self.time_stages = record_latents, time_stages
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.last_edge_map: np.ndarray | None = None
        self.last_seed: int | None = None
        self.last_latents: list[torch.Tensor] = []
        self.last_timings = StageTimings()

    @classmethod
    def from_torch(cls, cnsd: torch.nn.Module, tokenizer, device: str | torch.device = "cpu",
                   **kwargs) -> "Canny2Image":
        """Chapter 1: each sub-model of ``cnsd`` (moved to ``device``) in a :class:`TorchBackend`."""
        cnsd = cnsd.to(device).eval()
        table = contracts(cnsd.config)
        backends = {n: TorchBackend(cnsd.positional(n), table[n]) for n in MODEL_NAMES}
        return cls(backends, tokenizer, cnsd.config, device=device, **kwargs)

    @property
    def guidance(self) -> str:
        """"separate" or "batched": how the eps strategy runs cond and uncond."""
        return self.eps.guidance

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

    def process(self, input_image: np.ndarray, prompt: str, a_prompt: str = A_PROMPT, n_prompt: str = N_PROMPT,
                num_samples: int = 1, image_resolution: int = 256, ddim_steps: int = 20,
                guess_mode: bool = False, strength: float = 1.0, scale: float = 9.0, seed: int = 2946901,
                eta: float = 0.0, low_threshold: int = 100, high_threshold: int = 200, *,
                x_T: torch.Tensor | None = None) -> list[np.ndarray]:
        """Chapter 1: ``num_samples`` uint8 HxWx3 images that follow the edges of ``input_image``.

        Defaults are the course's scoring settings; ``seed=-1`` draws a seed (kept in ``last_seed``);
        ``x_T`` (num_samples, 4, H/8, W/8) replaces the seed's noise.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples {num_samples!r}: expected a positive integer")
        timings = StageTimings(enabled=self.time_stages, device=self.device)
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream, timings("total"):
            # 1. photo -> canny hint (B, 3, H, W) in [0, 1], shared by cond and uncond
            image = resize_image(hwc3(input_image), image_resolution)
            edge_map, hint = canny_hint(image, low_threshold, high_threshold)
            hint = hint.to(self.device).repeat(num_samples, 1, 1, 1)
            # 2. prompts -> CLIP contexts (B, 77, C)
            with timings("clip"):
                cond = self.encode_text([prompt + ", " + a_prompt] * num_samples)
                uncond = self.encode_text([n_prompt] * num_samples)
            # 3. seed -> x_T (B, 4, H/8, W/8), drawn on the CPU: the same noise on every device
            seed = random.randint(0, 65535) if seed == -1 else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
            shape = (num_samples, self.config.unet.in_channels, image.shape[0] // 8, image.shape[1] // 8)
            if x_T is None:
                x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
            elif tuple(x_T.shape) != shape:
                raise ValueError(f"x_T shape {tuple(x_T.shape)}: expected {shape} for this image and num_samples")
            # 4. DDIM: at every step the eps strategy runs ControlNet + UNet + guidance
            schedule = make_ddim_schedule(ddim_steps, eta)
            conditioning = Conditioning(cond, uncond, hint, tuple(control_scales(strength, guess_mode)), scale,
                                        guess_mode)
            x = x_T.to(self.device, torch.float32)
            self.last_latents = [x.cpu().clone()] if self.record_latents else []
            if self.eps.whole_loop:       # chapter 3's loop graph: all steps in one replay, one "steps" timing
                if self.record_latents:
                    raise ValueError(f"record_latents: {self.eps!r} runs the whole loop at once, no latent per step")
                with timings("steps"):
                    latent = self.eps.sample(self.backends, conditioning, schedule, x)
            else:
                eps_fn = self.eps.eps_fn(self.backends, conditioning, schedule)

                def timed_eps(x: torch.Tensor, timestep: int) -> torch.Tensor:
                    with timings("steps"):
                        return eps_fn(x, timestep)

                record = (lambda i, t, x_prev, x0: self.last_latents.append(x_prev.cpu().clone())) \
                    if self.record_latents else None
                latent = ddim_sample(timed_eps, x, schedule, generator=generator, progress=self.progress,
                                     callback=record)
            # 5. latent -> uint8 images (the copy to the host waits for the GPU)
            with timings("decoder"):
                images = self.decode(latent)
        self.last_edge_map, self.last_seed, self.last_timings = edge_map, seed, timings
        return images
