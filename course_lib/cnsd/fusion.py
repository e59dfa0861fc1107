"""Merging the q/k/v projections of every attention layer (homework 3).

Chapter 4 introduces this module. An attention layer projects its input three times, ``to_q(x)``,
``to_k(context)``, ``to_v(context)``: three matrix multiplications that read the same input. Stacking
the weights row-wise turns them into one larger multiplication, split afterwards:

* self-attention (``attn1``, context is x):    ``to_qkv`` = cat(Wq, Wk, Wv), then split in three;
* cross-attention (``attn2``, context is text): q = ``to_q(x)``, ``to_kv`` = cat(Wk, Wv) on the context,
  then split in two (q reads another tensor, so it can't join).

Self or cross is decided by the layer's ``is_self_attention`` (how it was built), never by comparing
sizes: in the tiny preset the level-1 cross-attention has ``context_dim == query_dim == 64``.

Design (checkpoint keys). ``to_q``/``to_k``/``to_v`` stay the parameters: they are what a checkpoint
loads and what ``state_dict()`` saves, under the original names. The fused weight is a *cache* derived
from them: a non-persistent buffer (never saved, never expected by a strict load) that is rebuilt

1. when the layer is fused (:func:`fuse_qkv`, which you call after loading a checkpoint),
2. after every ``load_state_dict`` into the model (a load-state-dict post-hook), and
3. when ``forward`` sees that a source weight was changed in place since (its version counter moved);
   a change made through ``.data`` is invisible to that check: call :meth:`FusedAttention.refresh`.

So loading a checkpoint before or after fusing gives the same model. In an ONNX export the fused weight
is traced as ``torch.cat(to_q, to_k, to_v)``, which the exporter's constant folding turns into one
ordinary initializer: the graph carries each weight once, and external data works as for any weight.
:func:`unfuse_qkv` puts the original layer objects back. The course's pitfall is the
other way round: :class:`NaiveFusedAttention` fuses in ``__init__``, copying the *random* weights of a
fresh layer; the checkpoint loaded afterwards fills to_q/to_k/to_v, which forward no longer uses.

Graph evidence: :func:`count_attention_matmuls` counts the MatMul nodes of each attention layer in an
exported ONNX graph; :func:`expected_matmul_counts` predicts them from the config.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd.attention import CrossAttention
from course_lib.cnsd.config import CNSDConfig
from course_lib.cnsd.contract import contracts, example_inputs


class FusedLinear(nn.Module):
    """One bias-free Linear whose weight stacks several projections row-wise; the weight is not saved.

    ``sources`` are the Linear layers it stacks (to_q, to_k, to_v): in an ONNX export the weight is traced
    as ``torch.cat`` of theirs, which constant folding turns into one ordinary initializer (a stored
    buffer would be embedded as a Constant node instead, out of reach of external data and of the
    quantizers of chapter 5). Without sources the stored weight is used everywhere.
    """

    def __init__(self, weight: torch.Tensor, parts: tuple[str, ...], sources: tuple[nn.Linear, ...] = ()):
        super().__init__()
        self.parts = parts                                       # e.g. ("to_q", "to_k", "to_v")
        self.sources = sources                                   # a tuple: not submodules, no extra keys
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sources and torch.onnx.is_in_onnx_export():
            return F.linear(x, torch.cat([s.weight for s in self.sources]))
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features={out}, bias=False, weight=cat({', '.join(self.parts)}) not saved"


def _parts(layer: CrossAttention) -> tuple[str, ...]:
    return ("to_q", "to_k", "to_v") if layer.is_self_attention else ("to_k", "to_v")


def _fused_name(layer: CrossAttention) -> str:
    return "to_qkv" if layer.is_self_attention else "to_kv"


def _fused_project(layer: CrossAttention, x: torch.Tensor, context: torch.Tensor | None):
    """q, k, v from one (self) or two (cross) matmuls instead of three."""
    if layer.is_self_attention:
        return layer.to_qkv(x).chunk(3, dim=-1)                            # (B, N, 3C) -> 3 x (B, N, C)
    k, v = layer.to_kv(x if context is None else context).chunk(2, dim=-1)  # (B, M, 2C) -> 2 x (B, M, C)
    return layer.to_q(x), k, v


def _attributes(module: nn.Module) -> dict:
    """The plain attributes a module set in __init__ (not its registries of parameters and children)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def _refresh_after_load(module: FusedAttention, incompatible_keys) -> None:
    module.refresh()


class FusedAttention(CrossAttention):
    """Chapter 4: a CrossAttention with ``to_qkv`` (self) or ``to_kv`` (cross) built from its loaded weights.

    Made by :func:`fuse_qkv` from an existing layer: it shares that layer's to_q/to_k/to_v/to_out modules
    (same parameters, same keys) and keeps the layer itself for :func:`unfuse_qkv`.
    """

    def __init__(self, layer: CrossAttention):
        nn.Module.__init__(self)                     # not CrossAttention.__init__: reuse the layer's modules
        vars(self).update(_attributes(layer))        # is_self_attention, heads, dim_head, scale, backend, training
        for name, child in layer.named_children():   # to_q, to_k, to_v, to_out: shared, so the same keys
            setattr(self, name, child)
        self._original = (layer,)                    # in a tuple: not a submodule, so no duplicate keys
        self._built_from: list[tuple[torch.Tensor, int]] = []
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.refresh()

    @property
    def fused(self) -> FusedLinear:
        """The fused projection: ``to_qkv`` or ``to_kv``."""
        return getattr(self, _fused_name(self))

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the fused weight from the current to_q/to_k/to_v weights."""
        sources = tuple(getattr(self, p) for p in _parts(self))
        weights = [s.weight for s in sources]
        fused = torch.cat([w.detach() for w in weights])                  # (3C or 2C, in)
        if _fused_name(self) in self._modules:
            self.fused.weight, self.fused.sources = fused, sources
        else:
            setattr(self, _fused_name(self), FusedLinear(fused, _parts(self), sources))
        self._built_from = [(w, w._version) for w in weights]

    def _stale(self) -> bool:
        now = [getattr(self, p).weight for p in _parts(self)]
        return any(w is not old or w._version != v for w, (old, v) in zip(now, self._built_from))

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        if self._stale():
            self.refresh()
        return _fused_project(self, x, context)


class NaiveFusedAttention(CrossAttention):
    """Chapter 4's pitfall, on purpose: the fused weight is made in ``__init__``, before any checkpoint.

    ``torch.cat`` copies the fresh (random) to_q/to_k/to_v; loading a checkpoint later fills to_q/to_k/to_v
    (the keys are unchanged, so even a strict load succeeds), but forward uses the stale copy.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__(query_dim, context_dim, heads, dim_head)
        weight = torch.cat([getattr(self, p).weight.detach() for p in _parts(self)])
        setattr(self, _fused_name(self), FusedLinear(weight, _parts(self)))

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        return _fused_project(self, x, context)


@dataclass(frozen=True)
class FusionReport:
    """How many self- and cross-attention layers :func:`fuse_qkv` / :func:`unfuse_qkv` changed."""
    self_attention: int
    cross_attention: int
    unchanged: int = 0              # layers already in the requested state

    @property
    def total(self) -> int:
        return self.self_attention + self.cross_attention

    def __str__(self) -> str:
        extra = f" ({self.unchanged} already so)" if self.unchanged else ""
        return f"{self.self_attention} self-attention + {self.cross_attention} cross-attention layers{extra}"


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError(f"{type(model).__name__}: fuse_qkv/unfuse_qkv replace layers inside a model; "
                         "expected a model that contains attention layers, not a layer")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def fuse_qkv(model: nn.Module) -> FusionReport:
    """Chapter 4: replace every CrossAttention in ``model`` by a :class:`FusedAttention` (in place).

    Call it after loading the checkpoint (loading afterwards works too: see the module docstring).
    Already fused layers are left as they are. Returns a :class:`FusionReport` (sd15: 23 + 23).
    """
    n_self = n_cross = unchanged = 0
    for path, layer in list(model.named_modules()):
        if isinstance(layer, FusedAttention):
            unchanged += 1
        elif type(layer) is CrossAttention:
            _swap(model, path, FusedAttention(layer))
            n_self, n_cross = n_self + layer.is_self_attention, n_cross + (not layer.is_self_attention)
        elif isinstance(layer, CrossAttention):
            raise ValueError(f"layer {path!r} is a {type(layer).__name__}: expected a CrossAttention to fuse")
    return FusionReport(n_self, n_cross, unchanged)


def unfuse_qkv(model: nn.Module) -> FusionReport:
    """Chapter 4: put the original CrossAttention objects back (same parameters, same keys, in place)."""
    n_self = n_cross = unchanged = 0
    for path, layer in list(model.named_modules()):
        if isinstance(layer, FusedAttention):
            original = layer._original[0]
            vars(original).update({k: v for k, v in _attributes(layer).items() if k in vars(original)})  # backend, ...
            _swap(model, path, original)
            n_self, n_cross = n_self + layer.is_self_attention, n_cross + (not layer.is_self_attention)
        elif isinstance(layer, CrossAttention):
            unchanged += 1
    return FusionReport(n_self, n_cross, unchanged)


def build_fused_in_init(config: CNSDConfig, seed: int = 0) -> nn.Module:
    """Chapter 4: a CNSD whose attention layers fuse in ``__init__`` (:class:`NaiveFusedAttention`).

    The rest of the model is ``build_cnsd(config, seed)``; each attention layer is built fresh, as a
    BasicTransformerBlock creating fused layers would do. Load a checkpoint into it to see the pitfall.
    """
    from course_lib.cnsd.model import build_cnsd

    model = build_cnsd(config, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path, layer in list(model.named_modules()):
            if isinstance(layer, CrossAttention):
                naive = NaiveFusedAttention(layer.to_q.in_features, None if layer.is_self_attention
                                            else layer.to_k.in_features, layer.heads, layer.dim_head)
                _swap(model, path, naive.eval())
    return model


def attention_layer_counts(config: CNSDConfig, model_name: str) -> tuple[int, int]:
    """Chapter 4: (self-attention, cross-attention) layers of "controlnet" or "unet" (sd15: 7+7, 16+16)."""
    from course_lib.cnsd.controlnet import ControlNet
    from course_lib.cnsd.unet import ControlledUnet

    builders = {"controlnet": lambda: ControlNet(config.controlnet), "unet": lambda: ControlledUnet(config.unet)}
    if model_name not in builders:
        raise ValueError(f"model {model_name!r}: expected 'controlnet' or 'unet' (the models with attention layers)")
    with torch.device("meta"):                                   # no memory, no init: only the structure
        layers = [m for m in builders[model_name]().modules() if isinstance(m, CrossAttention)]
    n_self = sum(m.is_self_attention for m in layers)
    return n_self, len(layers) - n_self


# --- timing ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusionTiming:
    """Median forward latency of one sub-model with unfused and fused attention, and the raw samples."""
    model_name: str
    shape: str
    unfused_ms: float
    fused_ms: float
    unfused_samples: tuple[float, ...] = ()
    fused_samples: tuple[float, ...] = ()

    def __str__(self) -> str:
        return (f"{self.model_name} {self.shape}: unfused {self.unfused_ms:.1f} ms, fused {self.fused_ms:.1f} ms "
                f"(x{self.unfused_ms / self.fused_ms:.2f})")


@torch.no_grad()
def time_attention(cnsd: nn.Module, model_name: str = "controlnet", height: int = 256, width: int = 384,
                   repeats: int = 5, warmup: int = 1, seed: int = 0) -> FusionTiming:
    """Chapter 4: median latency of ``cnsd``'s "controlnet" or "unet" forward, unfused and fused.

    The two versions take turns (unfused, fused, unfused, ...) so that a machine getting busier or
    cooler affects both alike. Runs on the model's device (torch timings; synchronised on CUDA).
    ``cnsd`` is left fused or unfused as it came. Returns a :class:`FusionTiming`.
    """
    attention_layer_counts(cnsd.config, model_name)               # validates the name
    was_fused = any(isinstance(m, FusedAttention) for m in cnsd.modules())
    device = next(cnsd.submodule(model_name).parameters()).device
    feed = [t.to(device) for t in example_inputs(contracts(cnsd.config, 1, height, width)[model_name], seed).values()]
    run = cnsd.positional(model_name)
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for i in range(warmup + repeats):
            for fused in (False, True):
                (fuse_qkv if fused else unfuse_qkv)(cnsd)
                start = time.perf_counter()
                run(*feed)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[fused].append((time.perf_counter() - start) * 1e3)
    finally:
        (fuse_qkv if was_fused else unfuse_qkv)(cnsd)
    return FusionTiming(model_name, f"{height}x{width}", statistics.median(times[False]),
                        statistics.median(times[True]), tuple(times[False]), tuple(times[True]))
