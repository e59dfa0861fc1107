"""YOLOv5 (v6.0/v7.0 detection architecture) in plain PyTorch -- Chapter 6.

The course's detector: 9 classes at 1120x1120, ``images`` (1, 3, 1120, 1120) -> ``output0`` (1, 77175, 14).
Every row of ``output0`` is one anchor at one grid cell: ``x, y, w, h`` (box centre and size in pixels of
the model input), ``obj`` and ``nc`` class probabilities, all already through a sigmoid.
77175 = 3 anchors x (140^2 + 70^2 + 35^2) for the three strides 8, 16, 32.

The module names follow ultralytics/yolov5 exactly (``model.<i>.conv.weight``, ``model.<i>.cv1.bn.*``,
``model.24.m.<i>.weight``, ``model.24.anchors``...), so the ``state_dict`` of a model a student trained
with the yolov5 repo loads here strictly (:func:`load_yolov5_weights`).

Building blocks (the model is 25 of them in a row, ``model.0`` .. ``model.24``):

* ``Conv``       conv (no bias) + BatchNorm (eps 1e-3) + SiLU
* ``Bottleneck`` 1x1 Conv -> 3x3 Conv, plus the input when ``shortcut``
* ``C3``         two 1x1 branches, one through n Bottlenecks, concatenated and mixed by a 1x1 Conv
* ``SPPF``       1x1 Conv, three chained 5x5 max-pools, all four concatenated, 1x1 Conv
* ``Concat``, ``nn.Upsample(nearest)`` for the neck, and ``Detect`` (one 1x1 conv per stride + box decoding)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from course_lib.yolov5.init import randomize_

INPUT_NAME = "images"    # the ONNX / TensorRT input name used in chapter 6
OUTPUT_NAME = "output0"  # the ONNX / TensorRT output name used in chapter 6

# size -> (depth_multiple, width_multiple), as in yolov5{n,s,m,l,x}.yaml
SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}

# anchor (w, h) pairs in pixels for strides 8, 16, 32 (the default COCO anchors of yolov5)
DEFAULT_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


@dataclass(frozen=True)
class YOLOv5Config:
    """Hyperparameters of one YOLOv5 detector (Chapter 6).

    ``depth_multiple`` scales how many Bottlenecks each C3 repeats, ``width_multiple`` the channels of
    every layer (rounded up to a multiple of 8). ``img_size`` is the square input the course exports at.
    """
    nc: int = 9
    depth_multiple: float = 0.33
    width_multiple: float = 0.50
    anchors: tuple[tuple[int, ...], ...] = DEFAULT_ANCHORS
    strides: tuple[int, ...] = (8, 16, 32)
    img_size: int = 1120
    size: str = "s"

    @property
    def no(self) -> int:
        """Numbers per anchor row: 4 box + 1 objectness + nc classes."""
        return 5 + self.nc

    def output_shape(self, batch: int = 1, height: int | None = None, width: int | None = None) -> tuple:
        """Shape of ``output0`` for an input of (batch, 3, height, width); e.g. (1, 77175, 14) at 1120, nc=9."""
        h, w = height or self.img_size, width or self.img_size
        rows = sum(len(a) // 2 * (h // s) * (w // s) for a, s in zip(self.anchors, self.strides))
        return (batch, rows, self.no)


def yolov5_preset(size: str = "s", nc: int = 9, img_size: int = 1120) -> YOLOv5Config:
    """Chapter 6: the config of yolov5n/s/m/l/x with ``nc`` classes (the course uses ``"s"``, 9 classes, 1120).

    Returns a :class:`YOLOv5Config`. Raises ValueError for an unknown size, nc < 1 or img_size not a multiple of 32.
    """
    if size not in SIZES:
        raise ValueError(f"unknown YOLOv5 size {size!r}: expected one of {', '.join(SIZES)}")
    if nc < 1:
        raise ValueError(f"nc (number of classes) must be >= 1, got {nc}")
    if img_size % 32:
        raise ValueError(f"img_size must be a multiple of 32 (the largest stride), got {img_size}")
    gd, gw = SIZES[size]
    return YOLOv5Config(nc=nc, depth_multiple=gd, width_multiple=gw, img_size=img_size, size=size)


# ---------------------------------------------------------------------------------------------- blocks
class Conv(nn.Module):
    """conv (k x k, stride s, 'same' padding unless p is given, no bias) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)  # yolov5's BN settings
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 Conv then 3x3 Conv; adds the input back when ``shortcut`` (backbone C3s) and shapes allow."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c_in, c_out, 1)
        self.cv2 = Conv(c_out, c_out, 3)
        self.add = shortcut and c_in == c_out

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: cv1 -> n Bottlenecks, cv2 alone; concatenate both halves; cv3 mixes them."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = c_out // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(c_in, hidden, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools see 5, 9 and 13 pixel windows."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(4 * hidden, c_out, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        return self.cv2(torch.cat((x, p1, p2, self.m(p2)), dim=1))


class Concat(nn.Module):
    """Concatenate a list of feature maps along channels."""

    def forward(self, xs):
        return torch.cat(xs, dim=1)


class Detect(nn.Module):
    """One 1x1 conv per stride -> 3 anchors x (5 + nc) numbers per cell, decoded to pixel boxes.

    ``anchors`` is a buffer (saved in the state_dict, so AutoAnchor results of training come along) holding
    anchor sizes in units of its level's stride, shape (levels, 3, 2) -- the same convention as yolov5.
    """

    def __init__(self, nc: int, anchors, strides, channels):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.na = len(anchors[0]) // 2
        a = torch.tensor(anchors, dtype=torch.float32).view(len(anchors), -1, 2)
        s = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("anchors", a / s.view(-1, 1, 1))      # grid units, as yolov5 stores them
        self.register_buffer("stride", s, persistent=False)         # not in yolov5's state_dict
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in channels)

    def forward(self, features):
        rows = []
        for i, x in enumerate(features):
            x = self.m[i](x)                                        # (B, na*no, ny, nx)
            b, _, ny, nx = x.shape
            x = x.view(b, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2)   # (B, na, ny, nx, no)
            if self.training:       # training losses want the raw logits per level
                rows.append(x.contiguous())
                continue
            ys = torch.arange(ny, device=x.device, dtype=x.dtype)
            xs = torch.arange(nx, device=x.device, dtype=x.dtype)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            offset = torch.stack((gx, gy), dim=-1) - 0.5            # (ny, nx, 2): cell corner - 0.5
            anchor_px = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2)
            xy, wh, conf = x.sigmoid().split((2, 2, self.nc + 1), dim=-1)
            xy = (xy * 2 + offset) * self.stride[i]                 # centre in pixels
            wh = (wh * 2) ** 2 * anchor_px                          # size in pixels, at most 4x the anchor
            rows.append(torch.cat((xy, wh, conf), dim=-1).view(b, -1, self.no))
        return rows if self.training else torch.cat(rows, dim=1)    # (B, 3*sum(ny*nx), 5+nc)


# ----------------------------------------------------------------------------------------------- model
class YOLOv5(nn.Module):
    """Chapter 6: the YOLOv5 detector. ``forward(images)`` -> ``output0`` (B, rows, 5+nc) in eval mode.

    ``images``: float (B, 3, H, W), RGB in [0, 1], H and W multiples of 32 (see ``PreProcessor``).
    ``seed``: an int fills every weight and BatchNorm statistic with random values of a sensible scale (for
    lessons without a trained checkpoint); ``None`` keeps PyTorch's default init, like a fresh yolov5 model.
    """

    def __init__(self, config: YOLOv5Config | None = None, seed: int | None = 0):
        super().__init__()
        self.config = cfg = config or yolov5_preset()
        ch = lambda c: math.ceil(c * cfg.width_multiple / 8) * 8          # noqa: E731  channels, /8
        n = lambda k: max(round(k * cfg.depth_multiple), 1)               # noqa: E731  C3 repeats
        self.model = nn.ModuleList([
            # backbone
            Conv(3, ch(64), 6, 2, 2),                 # 0  stride 2
            Conv(ch(64), ch(128), 3, 2),              # 1  stride 4
            C3(ch(128), ch(128), n(3)),               # 2
            Conv(ch(128), ch(256), 3, 2),             # 3  stride 8
            C3(ch(256), ch(256), n(6)),               # 4  -> P3
            Conv(ch(256), ch(512), 3, 2),             # 5  stride 16
            C3(ch(512), ch(512), n(9)),               # 6  -> P4
            Conv(ch(512), ch(1024), 3, 2),            # 7  stride 32
            C3(ch(1024), ch(1024), n(3)),             # 8
            SPPF(ch(1024), ch(1024), 5),              # 9
            # head (PANet): top-down ...
            Conv(ch(1024), ch(512), 1, 1),            # 10
            nn.Upsample(scale_factor=2, mode="nearest"),  # 11
            Concat(),                                 # 12 cat with 6
            C3(ch(1024), ch(512), n(3), False),       # 13
            Conv(ch(512), ch(256), 1, 1),             # 14
            nn.Upsample(scale_factor=2, mode="nearest"),  # 15
            Concat(),                                 # 16 cat with 4
            C3(ch(512), ch(256), n(3), False),        # 17 -> out P3 (stride 8)
            # ... and bottom-up
            Conv(ch(256), ch(256), 3, 2),             # 18
            Concat(),                                 # 19 cat with 14
            C3(ch(512), ch(512), n(3), False),        # 20 -> out P4 (stride 16)
            Conv(ch(512), ch(512), 3, 2),             # 21
            Concat(),                                 # 22 cat with 10
            C3(ch(1024), ch(1024), n(3), False),      # 23 -> out P5 (stride 32)
            Detect(cfg.nc, cfg.anchors, cfg.strides, (ch(256), ch(512), ch(1024))),  # 24
        ])
        self._init_detect_biases()
        if seed is not None:
            randomize_(self, seed)
        self.eval()

    def forward(self, images):
        m = self.model
        x = m[2](m[1](m[0](images)))
        p3 = m[4](m[3](x))                            # (B, ch256, H/8, W/8)
        p4 = m[6](m[5](p3))                           # (B, ch512, H/16, W/16)
        x = m[9](m[8](m[7](p4)))                      # (B, ch1024, H/32, W/32)
        h10 = m[10](x)
        x = m[13](m[12]([m[11](h10), p4]))
        h14 = m[14](x)
        out3 = m[17](m[16]([m[15](h14), p3]))         # stride 8
        out4 = m[20](m[19]([m[18](out3), h14]))       # stride 16
        out5 = m[23](m[22]([m[21](out4), h10]))       # stride 32
        return m[24]([out3, out4, out5])

    def _init_detect_biases(self):
        """yolov5's prior: ~8 objects per 640x640 image, classes equally likely."""
        det = self.model[24]
        with torch.no_grad():
            for conv, s in zip(det.m, det.stride.tolist()):
                b = conv.bias.view(det.na, det.no)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (det.nc - 0.99999))

    def fuse_conv_bn(self) -> "YOLOv5":
        """Chapter 6: fold every BatchNorm into its conv (for export); returns self. See :func:`fuse_conv_bn`."""
        return fuse_conv_bn(self)




@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Chapter 6: replace conv -> BN by one conv with a bias in every ``Conv`` block (in place; returns model).

    BN computes gamma * (y - mean) / sqrt(var + eps) + beta on y = W x, which is the conv W' = W * k,
    b' = beta - mean * k with k = gamma / sqrt(var + eps) per output channel. Use it in eval mode, after
    loading weights: the state_dict then has ``conv.bias`` and no ``bn.*`` keys.
    """
    for block in model.modules():
        if isinstance(block, Conv) and isinstance(block.bn, nn.BatchNorm2d):
            conv, bn = block.conv, block.bn
            k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, bias=True).to(conv.weight)
            fused.weight.copy_(conv.weight * k.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_(bn.bias + (bias - bn.running_mean) * k)
            block.conv, block.bn = fused, nn.Identity()
    return model
