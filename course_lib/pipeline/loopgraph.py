"""Chapter 3: the whole DDIM loop of an image as ONE CUDA graph ("loop-graph").

:class:`~course_lib.pipeline.eps.GraphedEps` replays each step from a graph, but the loop around it
stays in Python: per image 20 replays, 20 rounds of input copies and the DDIM update's small kernels
launched one by one, each a chance for the GPU to wait on the host. :class:`LoopGraphEps` captures the
loop itself -- every step's ControlNet + UNet + guidance and DDIM update -- so that one replay runs all
steps. Two ideas make that possible:

* static buffers: x_T, the two contexts and the hint are copied into the graph's own tensors before
  each replay (:class:`~course_lib.cudagraph.CudaGraph`); the final latent comes back in its buffer;
* baked-in constants: the timesteps and the schedule's per-step coefficients are constants of the
  kernels. They are part of the graph's key (:func:`schedule_key`), so another step count is another
  capture, never a wrong replay.

The loop (:func:`ddim_loop`) calls the same kernels in the same order as ``ddim_sample`` with the same
strategy, so the image is the same as the per-step graphed path's.
"""
from __future__ import annotations

import functools
from dataclasses import fields
from typing import Callable, Sequence

import torch

from course_lib.cudagraph import CudaGraph
from course_lib.pipeline.eps import Conditioning, EpsStrategy, GraphedEps, eps_reuse_steps
from course_lib.pipeline.sampler import DDIMSchedule


def ddim_loop(step: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor, schedule: DDIMSchedule,
              reuse_steps: Sequence[int] = ()) -> torch.Tensor:
    """Chapter 3: deterministic DDIM (eta 0) from ``x_T`` with ``eps = step(x, timestep)``; returns the final
    latent. ``ddim_sample``'s loop without callbacks, noise or host work, so that it can be captured; step
    indices in ``reuse_steps`` (:func:`~course_lib.pipeline.eps.eps_reuse_steps`) take the previous eps."""
    if schedule.eta > 0:
        raise ValueError(f"eta={schedule.eta}: the loop graph runs deterministic DDIM (eta 0); eta > 0 draws "
                         f"noise on the host at every step")
    x, eps, n = x_T, None, len(schedule)
    for i in range(n):
        index = n - 1 - i                                   # timesteps 951, 901, ..., 1
        if eps is None or i not in reuse_steps:
            eps = step(x, schedule.timesteps[index])
        x, _ = schedule.step(x, eps, index)
    return x


def schedule_key(schedule: DDIMSchedule) -> tuple:
    """Chapter 3: every constant of ``schedule`` as a hashable tuple (exact float32 values), the part of the
    loop graph's key that says which timesteps and coefficients the graph baked in."""
    return tuple((f.name, tuple(v.tolist()) if isinstance(v, torch.Tensor) else v)
                 for f in fields(schedule) for v in [getattr(schedule, f.name)])


def schedule_from_key(key: tuple) -> DDIMSchedule:
    """The :class:`DDIMSchedule` a :func:`schedule_key` was made from (float32 tensors, bit for bit)."""
    return DDIMSchedule(**{name: torch.tensor(v, dtype=torch.float32) if isinstance(v, tuple) and name != "timesteps"
                           else v for name, v in key})


def _loop(inner: EpsStrategy, backends: dict, x_T, cond, uncond, hint, scales, scale, guess_mode, key, reuse):
    """What the loop graph captures: :func:`ddim_loop` over ``inner``'s step, all constants from the key."""
    c = Conditioning(cond, uncond, hint, scales, scale, guess_mode)
    return ddim_loop(lambda x, t: inner.step(backends, x, t, c), x_T, schedule_from_key(key), reuse)


class LoopGraphEps(GraphedEps):
    """Chapter 3: ``inner``'s steps and the DDIM updates of a whole image replayed from one CUDA graph.

    ``Canny2Image.process`` hands such a strategy the whole loop (``whole_loop``): it calls
    :meth:`sample` instead of ``ddim_sample``. The first image of a key runs eagerly (warm-up: compiling,
    algorithm choice), the second captures, later ones replay. Limits, each a one-line ValueError: eta 0
    only, no per-step callback (``record_latents``), no ONNX Runtime backends. ``reuse_every`` bakes
    eps reuse into the graph (the steps of :class:`~course_lib.pipeline.eps.ReuseEps`); ``reused`` counts
    them for the last image. :meth:`step` (one step at a time, e.g. to time a step) is GraphedEps's.
    """
    whole_loop = True

    def __init__(self, inner: EpsStrategy | None = None, reuse_every: int = 0, warmup: int = 1):
        super().__init__(inner, warmup)
        if reuse_every < 0 or reuse_every == 1:
            raise ValueError(f"reuse_every={reuse_every}: expected 0 (off) or >= 2")
        self.reuse_every, self.reused = reuse_every, 0
        self.loop: CudaGraph | None = None
        self._loop_backends: dict = {}

    def sample(self, backends, c: Conditioning, schedule: DDIMSchedule, x_T: torch.Tensor) -> torch.Tensor:
        """Chapter 3: the final latent of one image (the graph's own buffer: use it before the next call)."""
        if schedule.eta > 0:
            raise ValueError(f"loop-graph: eta={schedule.eta}; the loop graph runs deterministic DDIM (eta 0) only")
        c = self.prepare(backends, c)
        if self.loop is None or self._loop_backends != dict(backends):
            self._loop_backends = dict(backends)
            self.loop = CudaGraph(functools.partial(_loop, self.inner, self._loop_backends), "DDIM loop",
                                  warmup=self.warmup)
        reuse = tuple(eps_reuse_steps(len(schedule), self.reuse_every)) if self.reuse_every else ()
        self.reused = len(reuse)
        return self.loop(x_T, c.cond, c.uncond, c.hint, tuple(c.control_scales), float(c.scale), bool(c.guess_mode),
                         schedule_key(schedule), reuse)

    def with_reuse(self, every: int) -> "LoopGraphEps":
        """Chapter 3: a loop graph over the same ``inner`` with eps reuse every ``every``-th step (0: off)."""
        return LoopGraphEps(self.inner, every, self.warmup)

    def __repr__(self) -> str:
        return f"LoopGraphEps({self.inner!r}, reuse_every={self.reuse_every})"
