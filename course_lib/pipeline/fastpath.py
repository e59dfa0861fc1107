"""Chapter 3: canny2image made fast on the PyTorch side, one switch at a time.

Each speed-up is a field of :class:`Switches`, and a variant's *name* spells its switches, so a
benchmark row says exactly what it ran (``Switches.from_name("fp16-batched-graph-sdpa")``):

==============  ================================================================================
token           what it does
==============  ================================================================================
``fp32/fp16``   weights and activations in fp16 (:func:`to_half`; GroupNorm32 computes in fp32)
``separate``    cond and uncond as two calls of each model per step (the original)
``batched``     cond and uncond stacked into batch 2: one ControlNet + one UNet call per step,
                and one CLIP call per image for both prompts
``graph``       CLIP, each DDIM step's ControlNet + UNet + guidance, and the VAE decoder each
                captured once in a CUDA graph with static buffers, then replayed
``sdpa``        torch's fused ``scaled_dot_product_attention`` and ``cudnn.benchmark``
``hint-once``   ControlNet's input_hint_block (convs on the full-size hint, the same at every
                step) run once per image; the steps start from its output
``compile``     ``torch.compile`` of ControlNet, UNet and the decoder (inside the graphs)
``reuse-epsN``  reuse the previous step's eps on every N-th step (default 4): fewer model calls,
                a different image (the 2023 hackathon winner's trick)
``stepsN``      N DDIM steps instead of the ``ddim_steps`` asked for (the latency/quality curve)
``cache-text``  keep CLIP encodings of prompts seen before (the scoring uses fixed prompts)
==============  ================================================================================

This module holds the switches and the pieces a fast step is made of: :func:`to_half`, :class:`Graphed`
(CUDA graphs per input shape, :class:`course_lib.cudagraph.CudaGraph`), :class:`GuidedEps` (ControlNet + UNet + guidance as one function of
tensors), :func:`controls_from_guided_hint` and :class:`ReuseEps`. :mod:`course_lib.pipeline.fastpipeline`
puts them together as :class:`~course_lib.pipeline.fastpipeline.FastCanny2Image`.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch

from course_lib.cnsd.attention import ATTENTION_BACKENDS, set_attention_backend
from course_lib.cudagraph import CudaGraph
from course_lib.pipeline.sampler import CFG_MODES, DDIMSchedule, classifier_free_guidance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# the ladder chapter 3 climbs, each rung one switch more than the last
LADDER = ("fp32-separate", "fp16-separate", "fp16-batched", "fp16-batched-graph", "fp16-batched-graph-sdpa",
          "fp16-batched-graph-sdpa-hint-once", "fp16-batched-graph-sdpa-hint-once-compile")


@dataclass(frozen=True)
class Switches:
    """Chapter 3: one variant of the pipeline. Defaults are the original (fp32, separate, eager)."""
    dtype: str = "fp32"            # "fp32" | "fp16"
    cfg: str = "separate"          # "separate" | "batched"
    cuda_graph: bool = False
    attention: str = "math"        # "math" | "sdpa" (sdpa also turns cudnn.benchmark on)
    hint_once: bool = False
    compile: bool = False
    reuse_every: int = 0           # 0: off; N: reuse the previous eps on every N-th step
    steps: int | None = None       # None: the ddim_steps given to process()
    cache_text: bool = False

    def __post_init__(self):
        checks = [("dtype", self.dtype, tuple(DTYPES)), ("cfg", self.cfg, CFG_MODES),
                  ("attention", self.attention, ATTENTION_BACKENDS)]
        for what, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"switch {what}={value!r}: expected one of {allowed}")
        if self.reuse_every < 0 or self.reuse_every == 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"reuse_every={self.reuse_every}, steps={self.steps}: expected reuse_every 0 or "
                             f">= 2 and steps >= 1")

    @property
    def name(self) -> str:
        """The variant's name, e.g. ``"fp16-batched-graph-sdpa"`` (:meth:`from_name` reads it back)."""
        parts = [self.dtype, self.cfg]
        parts += ["graph"] if self.cuda_graph else []
        parts += ["sdpa"] if self.attention == "sdpa" else []
        parts += ["hint-once"] if self.hint_once else []
        parts += ["compile"] if self.compile else []
        parts += [f"reuse-eps{self.reuse_every}"] if self.reuse_every else []
        parts += [f"steps{self.steps}"] if self.steps is not None else []
        parts += ["cache-text"] if self.cache_text else []
        return "-".join(parts)

    @classmethod
    def from_name(cls, name: str) -> "Switches":
        """Chapter 3: the switches a variant name spells (tokens in the module docstring's table)."""
        tokens = name.strip().lower().replace("reuse-eps", "reuse_eps").replace("cache-text", "cache_text") \
            .replace("hint-once", "hint_once").split("-")
        values: dict = {}
        for token in tokens:
            if token in DTYPES:
                values["dtype"] = token
            elif token in CFG_MODES:
                values["cfg"] = token
            elif token == "graph":
                values["cuda_graph"] = True
            elif token == "sdpa":
                values["attention"] = "sdpa"
            elif token == "compile":
                values["compile"] = True
            elif token in ("cache_text", "hint_once"):
                values[token] = True
            elif m := re.fullmatch(r"reuse_eps(\d*)", token):
                values["reuse_every"] = int(m.group(1) or 4)
            elif m := re.fullmatch(r"steps(\d+)", token):
                values["steps"] = int(m.group(1))
            else:
                raise ValueError(f"variant {name!r}: unknown part {token!r}; expected e.g. fp16-batched-graph-sdpa "
                                 f"(parts: fp32|fp16, separate|batched, graph, sdpa, hint-once, compile, reuse-epsN, stepsN, cache-text)")
        return cls(**values)

    @property
    def needs_cuda(self) -> bool:
        return self.cuda_graph or self.compile

    @property
    def build_key(self) -> "Switches":
        """The switches a :class:`FastCanny2Image` is built with: steps and eps reuse only change
        ``process()``, so a pipeline can take another ``steps``/``reuse_every`` by ``pipe.switches = ...``."""
        return replace(self, steps=None, reuse_every=0)


def to_half(cnsd: torch.nn.Module) -> torch.nn.Module:
    """Chapter 3: an fp16 copy of a CNSD model (GroupNorm32 still computes in fp32); the original is kept."""
    return copy.deepcopy(cnsd).half().eval()


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (what its inputs are cast to)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


@contextlib.contextmanager
def global_switches(switches: Switches, cnsd: torch.nn.Module | None = None):
    """Chapter 3: set the process-wide parts of ``switches`` (cudnn.benchmark, the attention backend of
    ``cnsd``) for the duration of a ``with`` block, then put them back."""
    old_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = switches.attention == "sdpa"
    if cnsd is not None:
        set_attention_backend(cnsd, switches.attention)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old_benchmark
        if cnsd is not None:
            set_attention_backend(cnsd, "math")


Graphed = CudaGraph   # chapter 3: ``fn`` replayed from one CUDA graph per input shapes (course_lib.cudagraph)


def controls_from_guided_hint(controlnet, x: torch.Tensor, guided_hint: torch.Tensor, timestep: torch.Tensor,
                              context: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Chapter 3 ("hint-once"): ``controlnet.forward`` given the output of its ``input_hint_block``.

    The hint block reads only the hint, so its output (B, model_channels, h, w) is the same at every
    DDIM step: compute it once per image with ``controlnet.input_hint_block(hint, None, None)``.
    Returns the 13 controls, equal to ``controlnet(x, hint, timestep, context)`` (tests check it).
    """
    return controlnet.controls(x, guided_hint, timestep, context)


class GuidedEps:
    """Chapter 3: one DDIM step's guided eps -- ControlNet, scaled controls, UNet, guidance -- on the
    torch modules directly, as a pure function of tensors (what a CUDA graph captures).

    ``compute(x, t, context, hint) -> eps``: x (B, 4, h, w) float32; t (B,) int32; context (2B, 77, C)
    = [cond; uncond]; hint (B or 2B, ...) as ``FastCanny2Image.prepare_hint`` made it.
    Returns eps float32 (B, 4, h, w), computed like :func:`course_lib.pipeline.sampler.guided_eps`.
    """

    def __init__(self, controlnet, unet, dtype: torch.dtype, cfg: str, scale: float, scales: Sequence[float]):
        self.controlnet, self.unet, self.dtype, self.cfg = controlnet, unet, dtype, cfg
        self.scale, self.scales = float(scale), [float(s) for s in scales]

    def _eps(self, x, t, context, hint) -> torch.Tensor:
        controls = [c * s for c, s in zip(self.controlnet(x, hint, t, context), self.scales)]
        return self.unet(x, t, context, controls).float()

    def compute(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xh = x.to(self.dtype)
        if self.scale == 1.0:                                   # guidance off: the cond branch only
            return self._eps(xh, t, context[:b], hint[:b])
        if self.cfg == "separate":
            eps_c = self._eps(xh, t, context[:b], hint)
            eps_u = self._eps(xh, t, context[b:], hint)
        else:
            eps_c, eps_u = self._eps(torch.cat([xh, xh]), torch.cat([t, t]), context, hint).chunk(2)   # (2B, ...)
        return classifier_free_guidance(eps_c, eps_u, self.scale)


class ReuseEps:
    """Chapter 3: ``eps_fn`` that returns the previous step's eps at the given timesteps, skipping the models.

    ``reused`` counts the skipped steps. Call :meth:`reset` before a new image.
    """

    def __init__(self, eps_fn: Callable, reuse_timesteps: Sequence[int]):
        self.eps_fn, self.reuse_timesteps = eps_fn, frozenset(int(t) for t in reuse_timesteps)
        self.last: torch.Tensor | None = None
        self.reused = 0

    def reset(self) -> None:
        self.last, self.reused = None, 0

    def __call__(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        if timestep in self.reuse_timesteps and self.last is not None:
            self.reused += 1
            return self.last
        self.last = self.eps_fn(x, timestep)
        return self.last


def eps_reuse_steps(num_steps: int, every: int = 4) -> list[int]:
    """Chapter 3: the step indices (0 = the first, noisiest step) that reuse the previous eps.

    Every ``every``-th step, sparing the first two and the last two steps (the coarse layout and the
    final details): 20 steps, every 4 -> [3, 7, 11, 15], i.e. 16 of 20 model calls.
    """
    if every < 2:
        raise ValueError(f"every={every}: expected >= 2 (1 would reuse every step)")
    return [i for i in range(2, num_steps - 2) if i % every == every - 1]


def reuse_timesteps(schedule: DDIMSchedule, steps: Sequence[int]) -> list[int]:
    """The DDPM timesteps of the given step indices (step i runs timestep ``timesteps[S - 1 - i]``)."""
    n = len(schedule)
    bad = [i for i in steps if not 0 < i < n]
    if bad:
        raise ValueError(f"reuse steps {bad}: expected indices 1..{n - 1} (step 0 has no previous eps)")
    return [schedule.timesteps[n - 1 - i] for i in steps]


def switch_table() -> str:
    """Chapter 3: the fields of :class:`Switches` with their defaults, one per line."""
    return "\n".join(f"{f.name:12s} {f.default!r}" for f in fields(Switches))
