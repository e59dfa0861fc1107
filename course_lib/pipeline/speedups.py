"""Chapter 3: canny2image made fast one switch at a time -- the ladder's variants as backends + eps strategy.

A variant's *name* spells its switches, so a benchmark row says exactly what ran
(``Switches.from_name("fp16-batched-graph-sdpa")``). Each switch is a choice of model form, of backends
or of eps strategy for the one :class:`~course_lib.pipeline.canny2image.Canny2Image`:

===============  ====================  ==========================================================
token            plugged in as         what it does
===============  ====================  ==========================================================
``fp32/fp16``    model form            weights and activations in fp16 (:func:`to_half`)
``separate``     ``GuidedEps``         cond and uncond as two calls of each model (the original)
``batched``      ``GuidedEps``         cond and uncond as one batch of 2: one call of each per step
``graph``        ``GraphedEps`` +      each DDIM step one CUDA graph; CLIP and the decoder graphed
                 ``GraphedBackend``    as backends
``sdpa``         torch backends        fused ``scaled_dot_product_attention``, ``cudnn.benchmark``
``hint-once``    ``HintOnce``          the ControlNet's hint block once per image (torch ControlNet)
``compile``      torch backends        ``torch.compile`` of ControlNet, UNet and decoder; inductor
                                       fuses GroupNorm + SiLU (and the fp32 casts) into one kernel
``compile-max``  torch backends        mode "max-autotune-no-cudagraphs": GEMM/conv autotuning, no
                                       inductor CUDA graphs (ours capture the compiled code)
``cl``           model form            convolutions channels-last, inputs too (:mod:`.hopper`)
``loop-graph``   ``LoopGraphEps``      the whole N-step DDIM loop one CUDA graph (:mod:`.loopgraph`)
``fp8``          model form            large transformer linears on FP8 tensor cores (cc >= 8.9)
``reuse-epsN``   ``ReuseEps``          the previous eps on every N-th step (default 4): another image
``stepsN``       ``process()``         ``ddim_steps=N``: fewer steps, another image
``cache-text``   ``cache_text=True``   CLIP encodings of prompts seen before are kept
===============  ====================  ==========================================================

:func:`make_pipeline` builds a variant on a torch model in its form (:func:`model_for` makes the form);
:func:`eps_strategy` gives the eps part alone, which also runs over ONNX Runtime or TensorRT backends
(batched, reuse; graph on TensorRT).
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, fields, replace

import torch

from course_lib.backends import GraphedBackend, TorchBackend, stores_channels_last
from course_lib.cnsd.attention import ATTENTION_BACKENDS, set_attention_backend
from course_lib.cnsd.contract import MODEL_NAMES, contracts
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.eps import HINT_ONCE_NEEDS, EpsStrategy, GraphedEps, GuidedEps, HintOnce, ReuseEps
from course_lib.pipeline.hopper import fp8_unsupported, has_fp8, to_channels_last, to_fp8
from course_lib.pipeline.loopgraph import LoopGraphEps
from course_lib.pipeline.sampler import GUIDANCE_MODES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# the ladder chapter 3 climbs, each rung one switch more than the last
LADDER = ("fp32-separate", "fp16-separate", "fp16-batched", "fp16-batched-graph", "fp16-batched-graph-sdpa",
          "fp16-batched-graph-sdpa-hint-once", "fp16-batched-graph-sdpa-hint-once-compile")
# the Hopper rungs above the ladder's top (issue 19), each one switch more
HOPPER_LADDER = ("fp16-batched-graph-sdpa-hint-once-compile-cl", "fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph",
                 "fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph-fp8")
COMPILE_MAX_MODE = "max-autotune-no-cudagraphs"


@dataclass(frozen=True)
class Switches:
    """Chapter 3: one variant of the pipeline. Defaults are the original (fp32, separate, eager)."""
    dtype: str = "fp32"            # "fp32" | "fp16"
    guidance: str = "separate"     # "separate" | "batched"
    cuda_graph: bool = False
    attention: str = "math"        # "math" | "sdpa" (sdpa also turns cudnn.benchmark on)
    hint_once: bool = False
    compile: bool = False
    reuse_every: int = 0           # 0: off; N: reuse the previous eps on every N-th step
    steps: int | None = None       # None: the ddim_steps given to process()
    cache_text: bool = False
    compile_max: bool = False      # with compile: mode "max-autotune-no-cudagraphs"
    channels_last: bool = False    # "cl"
    loop_graph: bool = False       # the whole DDIM loop one CUDA graph
    fp8: bool = False              # FP8 linears (fp16 only, compute capability >= 8.9)

    def __post_init__(self):
        checks = [("dtype", self.dtype, tuple(DTYPES)), ("guidance", self.guidance, GUIDANCE_MODES),
                  ("attention", self.attention, ATTENTION_BACKENDS)]
        for what, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"switch {what}={value!r}: expected one of {allowed}")
        if self.reuse_every < 0 or self.reuse_every == 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"reuse_every={self.reuse_every}, steps={self.steps}: expected reuse_every 0 or "
                             f">= 2 and steps >= 1")
        if (self.compile_max and not self.compile) or (self.fp8 and self.dtype != "fp16"):
            raise ValueError(f"compile_max={self.compile_max}, fp8={self.fp8}: compile_max needs compile=True, "
                             f"fp8 needs dtype='fp16' (got compile={self.compile}, dtype={self.dtype!r})")

    @property
    def name(self) -> str:
        """The variant's name, e.g. ``"fp16-batched-graph-sdpa"`` (:meth:`from_name` reads it back)."""
        parts = [self.dtype, self.guidance]
        parts += ["graph"] if self.cuda_graph else []
        parts += ["sdpa"] if self.attention == "sdpa" else []
        parts += ["hint-once"] if self.hint_once else []
        parts += ["compile-max" if self.compile_max else "compile"] if self.compile else []
        parts += ["cl"] if self.channels_last else []
        parts += ["loop-graph"] if self.loop_graph else []
        parts += ["fp8"] if self.fp8 else []
        parts += [f"reuse-eps{self.reuse_every}"] if self.reuse_every else []
        parts += [f"steps{self.steps}"] if self.steps is not None else []
        parts += ["cache-text"] if self.cache_text else []
        return "-".join(parts)

    @classmethod
    def from_name(cls, name: str) -> "Switches":
        """Chapter 3: the switches a variant name spells (tokens in the module docstring's table)."""
        tokens = name.strip().lower()
        for spelled in ("reuse-eps", "cache-text", "hint-once", "compile-max", "loop-graph"):
            tokens = tokens.replace(spelled, spelled.replace("-", "_"))
        tokens = tokens.split("-")
        values: dict = {}
        for token in tokens:
            if token in DTYPES:
                values["dtype"] = token
            elif token in GUIDANCE_MODES:
                values["guidance"] = token
            elif token == "graph":
                values["cuda_graph"] = True
            elif token == "sdpa":
                values["attention"] = "sdpa"
            elif token in ("compile", "compile_max"):
                values.update(compile=True, compile_max=token == "compile_max")
            elif token in ("cache_text", "hint_once", "loop_graph", "fp8"):
                values[token] = True
            elif token == "cl":
                values["channels_last"] = True
            elif m := re.fullmatch(r"reuse_eps(\d*)", token):
                values["reuse_every"] = int(m.group(1) or 4)
            elif m := re.fullmatch(r"steps(\d+)", token):
                values["steps"] = int(m.group(1))
            else:
                raise ValueError(f"variant {name!r}: unknown part {token!r}; expected e.g. fp16-batched-graph-sdpa "
                                 f"(parts: fp32|fp16, separate|batched, graph, sdpa, hint-once, compile|compile-max, cl, loop-graph, "
                                 f"fp8, reuse-epsN, stepsN, cache-text)")
        return cls(**values)

    @property
    def cuda_parts(self) -> tuple[str, ...]:
        """The parts of the name that need a CUDA GPU: "graph" and "loop-graph" (CUDA graphs), "compile"
        (compiled for CUDA), "fp8" (Hopper's FP8 matmuls)."""
        return tuple(part for part, on in (("graph", self.cuda_graph), ("compile", self.compile),
                                           ("loop-graph", self.loop_graph), ("fp8", self.fp8)) if on)

    @property
    def needs_cuda(self) -> bool:
        return bool(self.cuda_parts)

    @property
    def compile_mode(self) -> str | None:
        """``torch.compile``'s mode: None (no compile), "default", or :data:`COMPILE_MAX_MODE` for compile-max."""
        return (COMPILE_MAX_MODE if self.compile_max else "default") if self.compile else None

    @property
    def build_key(self) -> "Switches":
        """The switches that shape a built pipeline: steps and eps reuse only change a call or wrap the eps."""
        return replace(self, steps=None, reuse_every=0)


def check_device(switches: Switches, device: str | torch.device) -> None:
    """Chapter 3: ValueError in one line when ``switches`` need a CUDA GPU (:attr:`Switches.cuda_parts`) and ``device`` is
    not one, naming the parts and the variant that would run there."""
    if switches.needs_cuda and torch.device(device).type != "cuda":
        here = "" if torch.cuda.is_available() else " (torch sees no GPU here)"
        raise ValueError(f"variant {switches.name}: {' and '.join(switches.cuda_parts)} "
                         f"need{'s' if len(switches.cuda_parts) == 1 else ''} a CUDA GPU, got device "
                         f"{device}{here}; the variant without {'it' if len(switches.cuda_parts) == 1 else 'them'}: "
                         f"{replace(switches, cuda_graph=False, compile=False, compile_max=False, loop_graph=False, fp8=False).name}")


def to_half(cnsd: torch.nn.Module) -> torch.nn.Module:
    """Chapter 3: an fp16 copy of a CNSD model (GroupNorm32 still computes in fp32); the original is kept."""
    return copy.deepcopy(cnsd).half().eval()


@contextlib.contextmanager
def global_switches(switches: Switches, cnsd: torch.nn.Module | None = None):
    """Chapter 3: the process-wide parts of ``switches`` (cudnn.benchmark, the attention backend of ``cnsd``)
    for a ``with`` block, then put back."""
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


def eps_strategy(switches: Switches | str, model: torch.nn.Module | None = None) -> EpsStrategy:
    """Chapter 3: the eps strategy a variant spells: guidance, then hint once (needs the torch ``model``),
    the CUDA-graphed step or the loop graph, eps reuse. Backend switches (dtype, sdpa, compile, cl, fp8) are
    not part of it."""
    s = Switches.from_name(switches) if isinstance(switches, str) else switches
    eps: EpsStrategy = GuidedEps(s.guidance)
    if s.hint_once:
        if model is None:
            raise ValueError(f"variant {s.name}: pass the torch model; {HINT_ONCE_NEEDS}")
        eps = HintOnce(model, s.guidance, compile=s.compile_mode or False)
    if s.loop_graph:
        eps = LoopGraphEps(eps)
    elif s.cuda_graph:
        eps = GraphedEps(eps)
    return with_reuse(eps, s.reuse_every)


def with_reuse(eps: EpsStrategy, every: int) -> EpsStrategy:
    """Chapter 3: ``eps`` reusing the previous eps on every ``every``-th step (0: ``eps`` itself): wrapped in
    ``ReuseEps``, or, for a loop graph, baked into a new loop graph over the same inner strategy."""
    if not every:
        return eps
    return eps.with_reuse(every) if isinstance(eps, LoopGraphEps) else ReuseEps(eps, every)


def torch_backends(model: torch.nn.Module, switches: Switches) -> dict:
    """Chapter 3: the four torch backends of a variant: ``torch.compile`` (not CLIP; mode from
    :attr:`Switches.compile_mode`) if asked, and with "graph" CLIP and the decoder each replayed from CUDA
    graphs (the step, or the whole loop, is graphed by the eps strategy)."""
    table = contracts(model.config)
    backends = {}
    for name in MODEL_NAMES:
        module = model.positional(name)
        if switches.compile and name != "clip":
            module = torch.compile(module, dynamic=False, mode=switches.compile_mode)
        backends[name] = TorchBackend(module, table[name])
        if switches.cuda_graph and name in ("clip", "decoder"):
            backends[name] = GraphedBackend(backends[name])
    return backends


def make_pipeline(model: torch.nn.Module, tokenizer, switches: Switches | str = Switches(),
                  device: str | torch.device = "cuda", **kwargs) -> Canny2Image:
    """Chapter 3: ``Canny2Image`` for a variant on a torch ``model`` already on ``device`` in the variant's
    form (:func:`model_for`: fp16 :func:`to_half`, cl, fp8). Sets the attention backend on ``model`` (shared
    by its pipelines) and, for "sdpa", ``cudnn.benchmark`` (:func:`global_switches` scopes both). Pass
    ``ddim_steps=switches.steps`` to ``process()`` for "stepsN". ``kwargs`` go to ``Canny2Image``
    (default: no progress, no stage timing)."""
    s = Switches.from_name(switches) if isinstance(switches, str) else switches
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype != DTYPES[s.dtype]:
        raise ValueError(f"model is {dtype}, variant {s.name} asks for {s.dtype}: pass to_half(model) for fp16 variants")
    check_device(s, device)
    if s.fp8 and (reason := fp8_unsupported(device)):
        raise ValueError(f"variant {s.name}: {reason}")
    for switch, on, wanted, make in (("cl", stores_channels_last(model), s.channels_last, "to_channels_last"),
                                     ("fp8", has_fp8(model), s.fp8, "to_fp8")):
        if on != wanted:
            raise ValueError(f"variant {s.name} {'does not ask' if on else 'asks'} for {switch}, the model "
                             f"{'has' if on else 'lacks'} it: pass model_for(switches, models) ({make} makes it)")
    set_attention_backend(model, s.attention)
    if s.attention == "sdpa":
        torch.backends.cudnn.benchmark = True
    kwargs = {"progress": False, "time_stages": False, **kwargs}
    return Canny2Image(torch_backends(model, s), tokenizer, model.config, device=device,
                       eps=eps_strategy(s, model), cache_text=s.cache_text, **kwargs)


def form_name(switches: Switches) -> str:
    """Chapter 3: the model form a variant runs on: ``"fp32"``, ``"fp16"``, ``"fp16-cl"``, ``"fp16-cl-fp8"``, ..."""
    return switches.dtype + ("-cl" if switches.channels_last else "") + ("-fp8" if switches.fp8 else "")


def model_for(switches: Switches | str, models: dict) -> torch.nn.Module:
    """Chapter 3: the model a variant runs on, from ``models`` (``{"fp32": CNSD on its device}`` at least),
    making each missing form once from the one before (fp32 -> fp16 -> cl -> fp8) and keeping it there by
    :func:`form_name`. Forms are copies: drop them from ``models`` to free their memory."""
    s = Switches.from_name(switches) if isinstance(switches, str) else switches
    name = form_name(s)
    if name not in models:
        if s.fp8:
            models[name] = to_fp8(model_for(replace(s, fp8=False), models))
        elif s.channels_last:
            models[name] = to_channels_last(model_for(replace(s, channels_last=False), models))
        elif s.dtype == "fp16" and "fp32" in models:
            models[name] = to_half(models["fp32"])
        else:
            raise ValueError(f"models has {sorted(models)}: expected at least 'fp32' to make {name!r} from")
    return models[name]


def switch_table() -> str:
    """Chapter 3: the fields of :class:`Switches` with their defaults, one per line."""
    return "\n".join(f"{f.name:14s} {f.default!r}" for f in fields(Switches))
