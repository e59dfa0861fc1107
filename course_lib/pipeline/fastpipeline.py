"""Chapter 3: ``FastCanny2Image`` -- canny2image with the switches of :mod:`course_lib.pipeline.fastpath`.

It is :class:`~course_lib.pipeline.canny2image.Canny2Image` with a :class:`~course_lib.pipeline.fastpath.Switches`:
the same ``process()`` arguments, the same noise from the same seed, and with the default switches
the same image (tests check it). It calls the torch modules directly instead of going through
backends, which is what lets a whole DDIM step (ControlNet + UNet + guidance) be one CUDA graph.
Every variant draws the canny map once per image, shares it between cond and uncond, and computes
the DDIM schedule once per step count.

    pipe = FastCanny2Image(to_half(cnsd).cuda(), tokenizer, "fp16-batched-graph-sdpa", "cuda")
    image = pipe.process(photo, "a bird")[0]
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from course_lib.cnsd.attention import set_attention_backend
from course_lib.cnsd.config import LATENT_SCALE
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT, StageTimings, control_scales
from course_lib.pipeline.sampler import DDIMSchedule, ddim_sample, make_ddim_schedule
from course_lib.pipeline.fastpath import (
    DTYPES, Graphed, GuidedEps, ReuseEps, Switches, controls_from_guided_hint, eps_reuse_steps, model_dtype,
    reuse_timesteps,
)


class FastCanny2Image:
    """Chapter 3: canny2image with :class:`Switches` -- the same ``process()`` as ``Canny2Image``.

    Args:
        cnsd: a CNSD model on ``device`` in the switches' dtype (fp16: :func:`course_lib.pipeline.fastpath.to_half`).
        tokenizer: as for ``Canny2Image``.
        switches: a :class:`Switches` or a variant name.
        device: "cuda" or "cpu" ("graph" and "compile" need CUDA).
        time_stages: record ``last_timings`` (synchronizes after each stage: leave it off to time totals).

    The attention backend is set on ``cnsd`` itself (pipelines sharing one model share that setting),
    and "sdpa" turns ``torch.backends.cudnn.benchmark`` on for the process
    (:func:`course_lib.pipeline.fastpath.global_switches` scopes both to a ``with`` block).
    After process(): ``last_edge_map``, ``last_seed``, ``last_timings``, ``last_reused`` (eps reused).
    """

    def __init__(self, cnsd: torch.nn.Module, tokenizer, switches: Switches | str = Switches(),
                 device: str | torch.device = "cuda", *, progress: bool = False, time_stages: bool = False):
        self.switches = Switches.from_name(switches) if isinstance(switches, str) else switches
        self.device = torch.device(device)
        self.dtype = DTYPES[self.switches.dtype]
        if model_dtype(cnsd.unet) != self.dtype:
            raise ValueError(f"model is {model_dtype(cnsd.unet)}, switches ask for {self.switches.dtype}: "
                             f"pass to_half(model) for fp16 variants")
        if self.switches.needs_cuda and self.device.type != "cuda":
            raise ValueError(f"variant {self.switches.name}: graph and compile need device cuda, got {self.device}")
        self.cnsd, self.tokenizer, self.config = cnsd, tokenizer, cnsd.config
        self.progress, self.time_stages = progress, time_stages
        set_attention_backend(cnsd, self.switches.attention)
        if self.switches.attention == "sdpa":
            torch.backends.cudnn.benchmark = True
        wrap = (lambda m: torch.compile(m, dynamic=False)) if self.switches.compile else (lambda m: m)
        if self.switches.hint_once:                      # the "hint" it gets is the hint block's output
            def controlnet(x, guided_hint, t, context):
                return controls_from_guided_hint(cnsd.controlnet, x, guided_hint, t, context)
        else:
            controlnet = cnsd.controlnet
        self.controlnet, self.unet, self.decoder = wrap(controlnet), wrap(cnsd.unet), wrap(cnsd.vae_decoder)
        graph = Graphed if self.switches.cuda_graph else (lambda fn: fn)
        self._clip, self._decoder = graph(cnsd.clip), graph(self.decoder)
        self._guided: GuidedEps | None = None
        self._step: Callable | None = None
        self._schedules: dict[tuple[int, float], DDIMSchedule] = {}
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.last_edge_map, self.last_seed, self.last_reused = None, None, 0
        self.last_timings = StageTimings()

    # ------------------------------------------------------------------------------------- stages
    def _sync(self) -> None:
        if self.time_stages and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_text(self, cond: Sequence[str], uncond: Sequence[str]) -> torch.Tensor:
        """Chapter 3: CLIP contexts [cond; uncond] (2B, 77, C): one call (batched) or two (separate)."""
        key = tuple(cond) + ("|",) + tuple(uncond)
        if key in self._text_cache:
            return self._text_cache[key]
        context = self._encode(cond, uncond)
        if self.switches.cache_text:
            self._text_cache[key] = context
        return context

    def _encode(self, cond: Sequence[str], uncond: Sequence[str]) -> torch.Tensor:
        groups = [list(cond) + list(uncond)] if self.switches.cfg == "batched" else [list(cond), list(uncond)]
        ids = [self.tokenizer(g).to(device=self.device, dtype=torch.int32) for g in groups]
        return torch.cat([self._clip(i).clone() for i in ids])              # clone: graph outputs are reused

    def prepare_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint (B, 3, H, W) on the device in the model's dtype, doubled to 2B for batched CFG;
        with "hint-once", ControlNet's hint block output (B, model_channels, H/8, W/8) instead."""
        hint = hint.to(self.device, self.dtype)
        if self.switches.hint_once:
            with torch.inference_mode():
                hint = self.cnsd.controlnet.input_hint_block(hint)
        return torch.cat([hint, hint]) if self.switches.cfg == "batched" else hint

    def eps_fn(self, context: torch.Tensor, hint: torch.Tensor, scale: float, scales: Sequence[float]) -> Callable:
        """Chapter 3: ``eps_fn(x, timestep)`` for ``ddim_sample``, graphed when the switches say so."""
        key = (float(scale), tuple(scales))
        if self._guided is None or (self._guided.scale, tuple(self._guided.scales)) != key:
            self._guided = GuidedEps(self.controlnet, self.unet, self.dtype, self.switches.cfg, scale, scales)
            self._step = Graphed(self._guided.compute) if self.switches.cuda_graph else self._guided.compute
        step, t_buffers = self._step, {}

        def eps(x: torch.Tensor, timestep: int) -> torch.Tensor:
            if x.shape[0] not in t_buffers:
                t_buffers[x.shape[0]] = torch.empty(x.shape[0], dtype=torch.int32, device=self.device)
            t = t_buffers[x.shape[0]].fill_(int(timestep))
            return step(x, t, context, hint)
        return eps

    def decode_tensor(self, latent: torch.Tensor) -> torch.Tensor:
        """Chapter 3: latents (B, 4, h, w) -> uint8 images (B, H, W, 3) on the device."""
        images = self._decoder((1.0 / LATENT_SCALE * latent).to(self.dtype)).float()
        return (images.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)

    def schedule(self, steps: int, eta: float = 0.0) -> DDIMSchedule:
        """The DDIM schedule for ``steps`` and ``eta``, computed once."""
        if (steps, eta) not in self._schedules:
            self._schedules[(steps, eta)] = make_ddim_schedule(steps, eta)
        return self._schedules[(steps, eta)]

    # ------------------------------------------------------------------------------------ process
    def process(self, input_image: np.ndarray, prompt: str, a_prompt: str = A_PROMPT, n_prompt: str = N_PROMPT,
                num_samples: int = 1, image_resolution: int = 256, ddim_steps: int = 20,
                guess_mode: bool = False, strength: float = 1.0, scale: float = 9.0, seed: int = 2946901,
                eta: float = 0.0, low_threshold: int = 100, high_threshold: int = 200, *,
                x_T: torch.Tensor | None = None) -> list[np.ndarray]:
        """Chapter 3: ``Canny2Image.process`` with the switches; returns ``num_samples`` uint8 HxWx3 images.

        ``guess_mode`` is not part of the fast path (ValueError); ``seed=-1`` is not either (pass a seed).
        """
        if guess_mode:
            raise ValueError("guess_mode=True: not supported by the chapter 3 fast path; use Canny2Image")
        if not isinstance(num_samples, int) or num_samples < 1 or seed < 0:
            raise ValueError(f"num_samples={num_samples!r}, seed={seed}: expected a positive integer and a seed >= 0")
        with torch.inference_mode():
            timings, start = StageTimings(), time.perf_counter()
            schedule = self.schedule(self.switches.steps or ddim_steps, eta)
            image = resize_image(hwc3(input_image), image_resolution)           # 1. hint, once per image
            height, width = image.shape[:2]
            edge_map, hint = canny_hint(image, low_threshold, high_threshold)
            hint = self.prepare_hint(hint.repeat(num_samples, 1, 1, 1))
            t0 = time.perf_counter()                                           # 2. text, once per image
            context = self.encode_text([prompt + ", " + a_prompt] * num_samples, [n_prompt] * num_samples)
            self._sync()
            timings.clip = (time.perf_counter() - t0) * 1e3
            generator = torch.Generator("cpu").manual_seed(int(seed))           # 3. noise, as Canny2Image
            shape = (num_samples, self.config.unet.in_channels, height // 8, width // 8)
            if x_T is None:
                x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
            elif tuple(x_T.shape) != shape:
                raise ValueError(f"x_T shape {tuple(x_T.shape)}: expected {shape} for this image and num_samples")
            eps = self.eps_fn(context, hint, scale, control_scales(strength))   # 4. DDIM
            if self.switches.reuse_every:
                eps = ReuseEps(eps, reuse_timesteps(schedule, eps_reuse_steps(len(schedule), self.switches.reuse_every)))
            if self.time_stages:
                def step_fn(x, timestep):
                    t1 = time.perf_counter()
                    out = eps(x, timestep)
                    self._sync()
                    timings.steps.append((time.perf_counter() - t1) * 1e3)
                    return out
            else:
                step_fn = eps
            latent = ddim_sample(step_fn, x_T.to(self.device), schedule, generator=generator, progress=self.progress)
            t2 = time.perf_counter()                                           # 5. decode
            images = self.decode_tensor(latent).cpu().numpy()
            timings.decoder = (time.perf_counter() - t2) * 1e3
            timings.total = (time.perf_counter() - start) * 1e3
        self.last_edge_map, self.last_seed, self.last_timings = edge_map, int(seed), timings
        self.last_reused = eps.reused if isinstance(eps, ReuseEps) else 0
        return [images[i] for i in range(num_samples)]

    # ------------------------------------------------------------------------------- for timing
    def stage_fns(self, height: int = 256, width: int = 384, num_samples: int = 1, scale: float = 9.0,
                  seed: int = 0) -> dict[str, Callable[[], object]]:
        """Chapter 3: zero-argument callables running one stage as this variant does, on random inputs:
        "clip" (both prompts), "controlnet" and "unet" (one step's calls), "step" (ControlNet + UNet +
        guidance), "decoder". Graph variants graph each one. For :func:`course_lib.bench.time_cuda`."""
        g = torch.Generator().manual_seed(seed)
        b, h, w, c = num_samples, height // 8, width // 8, self.config.unet.context_dim
        x = torch.randn(b, self.config.unet.in_channels, h, w, generator=g).to(self.device)
        hint = self.prepare_hint(torch.rand(b, 3, height, width, generator=g))
        context = torch.randn(2 * b, 77, c, generator=g).to(self.device, self.dtype)
        texts = (["a bird, " + A_PROMPT] * b, [N_PROMPT] * b)
        batched = self.switches.cfg == "batched"
        xs = [x.to(self.dtype).repeat(2, 1, 1, 1)] if batched else [x.to(self.dtype)] * 2
        ctxs = [context] if batched else [context[:b], context[b:]]
        hints = [hint] if batched else [hint, hint]
        ts = [torch.full((x_.shape[0],), 951, dtype=torch.int32, device=self.device) for x_ in xs]
        graph = Graphed if self.switches.cuda_graph else (lambda fn: fn)
        controlnet = graph(self.controlnet)
        unet = graph(lambda x_, t_, c_, *controls: self.unet(x_, t_, c_, controls))
        with torch.inference_mode():
            controls = [[o.clone() for o in controlnet(x_, hi, t_, c_)] for x_, hi, t_, c_ in zip(xs, hints, ts, ctxs)]
        step = self.eps_fn(context, hint, scale, control_scales(1.0))
        latent = torch.randn(b, self.config.unet.in_channels, h, w, generator=g).to(self.device) * LATENT_SCALE

        def run(fn):
            def timed():
                with torch.inference_mode():
                    return fn()
            return timed
        return {
            "clip": run(lambda: self._encode(*texts)),                      # never from the text cache
            "controlnet": run(lambda: [controlnet(x_, hi, t_, c_) for x_, hi, t_, c_ in zip(xs, hints, ts, ctxs)]),
            "unet": run(lambda: [unet(x_, t_, c_, *cs) for x_, t_, c_, cs in zip(xs, ts, ctxs, controls)]),
            "step": run(lambda: step(x, 951)),
            "decoder": run(lambda: self.decode_tensor(latent)),
        }
