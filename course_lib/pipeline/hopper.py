"""Chapter 3: the model's *forms* for the Hopper switches -- channels-last convolutions and FP8 linears.

A form is a copy of the CNSD model made once, before any pipeline is built, as :func:`~.speedups.to_half`
makes the fp16 one (the original model is never changed):

* :func:`to_channels_last` ("cl") stores every convolution weight NHWC. cuDNN's tensor-core convolutions
  work in NHWC: on NCHW tensors each convolution pays a transpose in and out (kernels named
  ``nchwToNhwcKernel`` in a profile), and inductor's layout optimisation copies NCHW weights to NHWC on
  every call. :class:`~course_lib.backends.TorchBackend` sees the stored layout and converts the
  model's 4-D inputs too, so the whole network runs NHWC.
* :func:`to_fp8` ("fp8") swaps the large ``nn.Linear`` layers of the UNet's and the ControlNet's
  transformer blocks for :class:`FP8Linear`: e4m3 weights quantised once, activations quantised at
  every call with a per-tensor scale computed on the GPU, the product on FP8 tensor cores through
  ``torch._scaled_mm`` (compute capability >= 8.9: Ada, Hopper). Half the bytes and twice the peak
  rate of fp16, at a quality cost the benchmark measures (PSNR against the fp32 image).

:func:`~.speedups.model_for` gives the form a variant needs, made once and cached in a dict.
GroupNorm + SiLU fusion is not a form: ``torch.compile`` (inductor) generates one kernel for GroupNorm
(its statistics and normalisation in fp32), the SiLU after it and the casts around it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


E4M3_MAX = 448.0                  # the largest finite torch.float8_e4m3fn value
FP8_MIN_SIZE = 640 * 640          # in_features * out_features from which a linear layer is made FP8
FP8_MIN_CAPABILITY = (8, 9)       # Ada (8.9) and Hopper (9.0) have FP8 tensor cores


def to_channels_last(cnsd: nn.Module) -> nn.Module:
    """Chapter 3: a copy of ``cnsd`` with its convolution weights stored channels-last (NHWC); the
    original is kept. Values are unchanged, only the memory order."""
    return copy.deepcopy(cnsd).to(memory_format=torch.channels_last).eval()


def fp8_unsupported(device: str | torch.device) -> str | None:
    """Chapter 3: why FP8 matmuls can't run on ``device`` (one sentence), or None where they can."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (f"fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper) for torch._scaled_mm; "
                f"the model is on {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return (f"fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None


class FP8Linear(nn.Module):
    """Chapter 3: ``nn.Linear`` on FP8 tensor cores: ``y = (x/sx)_e4m3 @ ((W/sw)_e4m3)^T * sx * sw + b``.

    The weight is quantised once (per tensor: ``sw = amax|W| / 448``) into the buffer ``weight_fp8``
    (N, K) with its fp32 ``weight_scale``; the bias stays in the model's dtype. At every call the
    activations get their own per-tensor scale ``sx = amax|x| / 448``, computed on the GPU (no host
    sync, so a CUDA graph can capture it). ``torch._scaled_mm`` wants x row-major (M, K), the weight
    column-major (K, N) -- ``weight_fp8.t()`` is that view --, K and N multiples of 16, fp32 scales;
    it returns x's dtype (fp16). Build it from the fp16 model: ``.half()`` afterwards would cast the
    FP8 buffer too.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        n, k = linear.weight.shape
        if k % 16 or n % 16:
            raise ValueError(f"FP8Linear: weight {n}x{k}; torch._scaled_mm needs both sizes multiples of 16")
        self.in_features, self.out_features = k, n
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = (w.abs().amax() / E4M3_MAX).clamp(min=1e-12)
            self.register_buffer("weight_fp8", (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", scale.reshape(()))                  # fp32, 0-dim
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)                                          # (M, K)
        x_scale = (x2.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)              # fp32, 0-dim, on x's device
        x8 = (x2.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=x.dtype)                                        # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fp8_layer_names(cnsd: nn.Module, min_size: int = FP8_MIN_SIZE) -> list[str]:
    """Chapter 3: the linear layers :func:`to_fp8` swaps: those of the UNet's and the ControlNet's transformer
    blocks (thousands of tokens per call) with ``in_features * out_features >= min_size`` and both sizes
    multiples of 16. The time-embedding layers run on 2 rows per step: not worth quantising."""
    names = []
    for name, m in cnsd.named_modules():
        if (isinstance(m, nn.Linear) and name.split(".")[0] in ("unet", "controlnet") and ".transformer_blocks." in name
                and m.in_features * m.out_features >= min_size and m.in_features % 16 == 0 and m.out_features % 16 == 0):
            names.append(name)
    return names


def swap_fp8_linears(cnsd: nn.Module, min_size: int = FP8_MIN_SIZE) -> list[str]:
    """Chapter 3: replace :func:`fp8_layer_names` by :class:`FP8Linear` in place (no device check:
    :func:`to_fp8` is the checked entry point); returns the names."""
    names = fp8_layer_names(cnsd, min_size)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = cnsd.get_submodule(parent)
        setattr(owner, child, FP8Linear(getattr(owner, child)))
    return names


def to_fp8(cnsd: nn.Module, min_size: int = FP8_MIN_SIZE) -> nn.Module:
    """Chapter 3: a copy of the fp16 ``cnsd`` (on a GPU of compute capability >= 8.9) with the large linear
    layers of its transformer blocks in FP8 (:func:`swap_fp8_linears`); the original is kept."""
    param = next(cnsd.parameters())
    reason = fp8_unsupported(param.device)
    if reason:
        raise ValueError(reason)
    if param.dtype != torch.float16:
        raise ValueError(f"fp8: the model is {param.dtype}; FP8Linear takes fp16 activations: pass to_half(model)")
    model = copy.deepcopy(cnsd)
    swap_fp8_linears(model, min_size)
    return model.eval()


def has_fp8(model: nn.Module) -> bool:
    """Chapter 3: whether ``model`` has :class:`FP8Linear` layers (made by :func:`to_fp8`)."""
    return any(isinstance(m, FP8Linear) for m in model.modules())
