"""How ``Canny2Image`` gets eps at each DDIM step: the strategy it is given. Chapter 1 (speed-ups: chapter 3).

A strategy turns the backends and one image's :class:`Conditioning` into ``eps_fn(x, timestep)`` for
:func:`~course_lib.pipeline.sampler.ddim_sample`, in two parts: ``prepare`` once per image, ``step``
at every step. They work over any backends (torch, ONNX Runtime, TensorRT) except where noted:

* ``GuidedEps(guidance)``   ControlNet + UNet + classifier-free guidance (the default: "separate")
* ``HintOnce(model)``       the ControlNet's hint block once per image; steps start from its output
                            (torch ControlNet only)
* ``GraphedEps(inner)``     each step (ControlNet + UNet + guidance) replayed from one CUDA graph
                            (torch or TensorRT backends)
* ``ReuseEps(inner, N)``    the previous step's eps on every N-th step: fewer model calls, another image
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from course_lib.backends import Backend, OrtBackend, TorchBackend
from course_lib.cnsd.contract import ModelContract, contracts
from course_lib.cudagraph import CudaGraph
from course_lib.pipeline.sampler import GUIDANCE_MODES, DDIMSchedule, EpsFn, guided_eps, timestep_tensor

HINT_ONCE_NEEDS = ("hint once needs a ControlNet that takes the hint block's output, which only the torch "
                   "ControlNet does (the course's ONNX and TensorRT ControlNets take the canny hint)")


@dataclass(frozen=True)
class Conditioning:
    """What every DDIM step of one image is conditioned on (made by step 4 of ``process()``)."""
    cond: torch.Tensor                    # (B, 77, C) CLIP(prompt + ", " + a_prompt)
    uncond: torch.Tensor                  # (B, 77, C) CLIP(n_prompt)
    hint: torch.Tensor                    # (B, 3, H, W) canny hint in [0, 1] (after HintOnce: (B, mc, h, w))
    control_scales: tuple[float, ...]     # 13 scales
    scale: float                          # guidance scale (9 in the course)
    guess_mode: bool = False


def innermost(backend: Backend) -> Backend:
    """The backend that really runs, under wrappers that keep theirs in ``.backend`` (counting, recording, graphs)."""
    while hasattr(backend, "backend"):
        backend = backend.backend
    return backend


class EpsStrategy:
    """Chapter 1: the protocol: ``guidance``, ``prepare`` (per image), ``step`` (per step), ``eps_fn``.

    ``whole_loop`` strategies (chapter 3's :class:`~course_lib.pipeline.loopgraph.LoopGraphEps`) run the
    DDIM loop themselves: ``Canny2Image`` calls their ``sample(backends, c, schedule, x_T)`` instead."""
    guidance: str = "separate"
    whole_loop: bool = False

    def prepare(self, backends: Mapping[str, Backend], c: Conditioning) -> Conditioning:
        return c

    def step(self, backends: Mapping[str, Backend], x: torch.Tensor, t: int | torch.Tensor,
             c: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def step_backends(self, backends: Mapping[str, Backend]) -> tuple[Backend, Backend]:
        """The ControlNet and UNet a step calls."""
        return backends["controlnet"], backends["unet"]

    def eps_fn(self, backends: Mapping[str, Backend], c: Conditioning, schedule: DDIMSchedule) -> EpsFn:
        """``eps_fn(x, timestep)`` for one image: ``prepare`` once, then ``step`` at every call."""
        c = self.prepare(backends, c)
        return lambda x, timestep: self.step(backends, x, timestep, c)


class GuidedEps(EpsStrategy):
    """Chapter 1: :func:`~course_lib.pipeline.sampler.guided_eps` over the backends; "batched" (chapter 3)
    runs cond and uncond as one batch of 2: half the calls, the same eps to float rounding."""

    def __init__(self, guidance: str = "separate"):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance {guidance!r}: expected one of {GUIDANCE_MODES}")
        self.guidance = guidance

    def step(self, backends, x, t, c):
        controlnet, unet = self.step_backends(backends)
        return guided_eps(controlnet, unet, x, t, c.cond, c.uncond, c.hint, c.control_scales, c.scale,
                          self.guidance, c.guess_mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.guidance!r})"


class _HintBlock(torch.nn.Module):
    """The ControlNet's input_hint_block alone: canny hint (B, 3, H, W) -> guided hint (B, mc, H/8, W/8)."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        for layer in self.controlnet.input_hint_block:           # convs and SiLUs: they read the hint only
            hint = layer(hint)
        return hint


class _FromGuidedHint(torch.nn.Module):
    """The ControlNet with the guided hint in place of the canny hint (the contract's other inputs)."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x_noisy, guided_hint, timestep, context):
        return self.controlnet.controls(x_noisy, guided_hint, timestep, context)


class HintOnce(GuidedEps):
    """Chapter 3: the hint block once per image (its input, the hint, is the same at every step).

    ``model`` is the torch CNSD (its ControlNet is used directly; ``compile`` wraps it in
    ``torch.compile``, a string names the mode, e.g. "max-autotune-no-cudagraphs"). The pipeline's own ControlNet backend must be torch too: :data:`HINT_ONCE_NEEDS`.
    """

    def __init__(self, model: torch.nn.Module, guidance: str = "separate", compile: bool | str = False):
        super().__init__(guidance)
        contract = contracts(model.config)["controlnet"]
        guided = replace(contract.outputs[0], name="guided_hint")           # control0's shape: (B, mc, h, w)
        self.hint_block = TorchBackend(_HintBlock(model.controlnet),
                                       ModelContract("hint_block", (contract.inputs[1],), (guided,)))
        controlnet = _FromGuidedHint(model.controlnet)
        if compile:
            mode = compile if isinstance(compile, str) else None
            controlnet = torch.compile(controlnet, dynamic=False, mode=mode)
        self.controlnet = TorchBackend(controlnet, contract)

    def prepare(self, backends, c):
        if not isinstance(innermost(backends["controlnet"]), TorchBackend):
            raise ValueError(f"{HINT_ONCE_NEEDS}; got {backends['controlnet']!r}")
        return replace(c, hint=self.hint_block.infer({"hint": c.hint})["guided_hint"])

    def step_backends(self, backends):
        return self.controlnet, backends["unet"]


class GraphedEps(EpsStrategy):
    """Chapter 3: every step of ``inner`` (default ``GuidedEps()``) replayed from one CUDA graph.

    The step's inputs (x, timestep, contexts, hint) are copied into the graph's buffers, so one capture
    serves every step and image of the same shapes and settings (:class:`course_lib.cudagraph.CudaGraph`).
    ONNX Runtime can't be captured (its feeds go through host memory); TensorRT backends must not graph
    their engines themselves (``use_cuda_graph=False``): one graph holds the whole step.
    """

    def __init__(self, inner: EpsStrategy | None = None, warmup: int = 1):
        self.inner = inner or GuidedEps()
        self.guidance = self.inner.guidance
        self.warmup = warmup
        self.graph: CudaGraph | None = None
        self._backends: dict = {}

    def prepare(self, backends, c):
        for backend in self.inner.step_backends(backends):
            if isinstance(innermost(backend), OrtBackend):
                raise ValueError(f"a CUDA graph can't capture ONNX Runtime ({backend.name}: its feeds go through "
                                 f"host memory); graph torch or TensorRT backends")
            if getattr(innermost(backend), "use_cuda_graph", False):
                raise ValueError(f"{backend.name} replays its own CUDA graph: graph the step or each engine, "
                                 f"not both (make the backends with use_cuda_graph=False)")
        return self.inner.prepare(backends, c)

    def step_backends(self, backends):
        return self.inner.step_backends(backends)

    def step(self, backends, x, t, c):
        if self.graph is None or self._backends != dict(backends):
            self.graph = CudaGraph(self._step, "DDIM step", warmup=self.warmup)
            self._backends = dict(backends)
        t = t if isinstance(t, torch.Tensor) else timestep_tensor(t, x.shape[0], x.device)
        return self.graph(x, t, c.cond, c.uncond, c.hint, tuple(c.control_scales), float(c.scale), bool(c.guess_mode))

    def _step(self, x, t, cond, uncond, hint, scales, scale, guess_mode):
        return self.inner.step(self._backends, x, t, Conditioning(cond, uncond, hint, scales, scale, guess_mode))

    def __repr__(self) -> str:
        return f"GraphedEps({self.inner!r})"


class ReuseEps(EpsStrategy):
    """Chapter 3: ``inner``'s eps, but every ``every``-th step returns the previous step's eps without calling
    the models (:func:`eps_reuse_steps`). ``reused`` counts the skipped steps of the last image."""

    def __init__(self, inner: EpsStrategy | None = None, every: int = 4):
        if every < 2:
            raise ValueError(f"every={every}: expected >= 2 (1 would reuse every step)")
        if getattr(inner, "whole_loop", False):
            raise ValueError(f"{inner!r} runs the whole loop: bake the reuse in with its with_reuse({every})")
        self.inner, self.every, self.reused = inner or GuidedEps(), every, 0
        self.guidance = self.inner.guidance

    def prepare(self, backends, c):
        return self.inner.prepare(backends, c)

    def step(self, backends, x, t, c):
        return self.inner.step(backends, x, t, c)

    def step_backends(self, backends):
        return self.inner.step_backends(backends)

    def eps_fn(self, backends, c, schedule):
        eps_fn = self.inner.eps_fn(backends, c, schedule)
        reuse = set(reuse_timesteps(schedule, eps_reuse_steps(len(schedule), self.every)))
        last: list[torch.Tensor] = []
        self.reused = 0

        def eps(x: torch.Tensor, timestep: int) -> torch.Tensor:
            if timestep in reuse and last:
                self.reused += 1
                return last[0]
            last[:] = [eps_fn(x, timestep)]
            return last[0]
        return eps

    def __repr__(self) -> str:
        return f"ReuseEps({self.inner!r}, every={self.every})"


def eps_reuse_steps(num_steps: int, every: int = 4) -> list[int]:
    """Chapter 3: the step indices (0 = the first, noisiest) that reuse the previous eps: every ``every``-th,
    sparing the first two and last two steps. 20 steps, every 4 -> [3, 7, 11, 15]: 16 of 20 model calls."""
    if every < 2:
        raise ValueError(f"every={every}: expected >= 2 (1 would reuse every step)")
    return [i for i in range(2, num_steps - 2) if i % every == every - 1]


def reuse_timesteps(schedule: DDIMSchedule, steps: Sequence[int]) -> list[int]:
    """The DDPM timesteps of step indices ``steps`` (step i runs ``timesteps[S - 1 - i]``)."""
    n = len(schedule)
    bad = [i for i in steps if not 0 < i < n]
    if bad:
        raise ValueError(f"reuse steps {bad}: expected indices 1..{n - 1} (step 0 has no previous eps)")
    return [schedule.timesteps[n - 1 - i] for i in steps]
