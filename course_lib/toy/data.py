"""The toy data set: coloured shapes on coloured backgrounds, their prompts and their canny hints.

Nothing is downloaded: every image is drawn from a seed. A *scene* is one shape (circle, square,
triangle, star, hexagon) in one of eight named colours on a background of another, at a random place,
size and rotation; its prompt says what it is ("a red circle on a blue background") and its hint is the
course's own :func:`~course_lib.pipeline.hint.canny_hint` of the image, as canny2image computes it.

Drawing is vectorised torch on any device (every shape is star-shaped around its centre, so "inside"
is ``distance < radius(angle)`` with a one-pixel ramp for anti-aliasing); the same seed gives the same
scenes everywhere, and the same pixels up to float rounding on another device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from course_lib.pipeline.hint import canny_hint

IMAGE_SIZE = 64            # pixels; the latent is 8x8
TRAIN_SEED = 0             # the training pool
EVAL_SEED = 20_231_218     # held-out scenes for the evaluation (another stream of the same generator)

# name -> RGB; far apart in RGB (so the colour read back from an image is unambiguous) and every pair
# gives Canny edges at the course's thresholds (100, 200)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 150, 30), "yellow": (245, 230, 60), "green": (40, 170, 70),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
# name -> (vertices, inner radius / outer radius); 0 vertices is a circle, a star alternates two radii
SHAPES: dict[str, tuple[int, float]] = {
    "circle": (0, 1.0), "square": (4, 1.0), "triangle": (3, 1.0), "star": (10, 0.45), "hexagon": (6, 1.0),
}
SHAPE_NAMES = tuple(SHAPES)


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes as tensors of shape (N,): indices into SHAPE_NAMES / COLOUR_NAMES, then the
    centre and outer radius in pixels and the rotation in radians."""
    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def prompt(self, i: int) -> str:
        """What scene ``i`` shows, e.g. "a red circle on a blue background"."""
        return describe(int(self.shape[i]), int(self.colour[i]), int(self.background[i]))

    def prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(len(self))]

    def combo(self) -> torch.Tensor:
        """One integer per scene for (shape, colour, background): an index into :func:`all_prompts`."""
        n = len(COLOUR_NAMES)
        return (self.shape * n + self.colour) * n + self.background


def describe(shape: int, colour: int, background: int) -> str:
    """The prompt of one scene, e.g. "a red circle on an orange background"."""
    a = lambda word: f"an {word}" if word[0] in "aeiou" else f"a {word}"  # noqa: E731
    return f"{a(COLOUR_NAMES[colour])} {SHAPE_NAMES[shape]} on {a(COLOUR_NAMES[background])} background"


def all_prompts() -> list[str]:
    """Every (shape, colour, background) prompt, in :meth:`Scenes.combo` order (same-colour pairs included,
    though scenes never draw them)."""
    n = len(COLOUR_NAMES)
    return [describe(s, c, b) for s in range(len(SHAPE_NAMES)) for c in range(n) for b in range(n)]


def sample_scenes(n: int, seed: int = TRAIN_SEED, size: int = IMAGE_SIZE) -> Scenes:
    """``n`` random scenes from ``seed`` (a CPU generator: the same scenes on every machine)."""
    if n < 1:
        raise ValueError(f"number of scenes {n}: expected >= 1")
    g = torch.Generator().manual_seed(seed)
    colours = len(COLOUR_NAMES)
    shape = torch.randint(len(SHAPE_NAMES), (n,), generator=g)
    colour = torch.randint(colours, (n,), generator=g)
    background = (colour + 1 + torch.randint(colours - 1, (n,), generator=g)) % colours   # never the same
    radius = size * (0.22 + 0.18 * torch.rand(n, generator=g))                           # 14..25.6 px at 64
    margin = radius + 2.0
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    rotation = 2 * math.pi * torch.rand(n, generator=g)
    return Scenes(shape, colour, background, cx, cy, radius, rotation)


def coverage(scenes: Scenes, size: int = IMAGE_SIZE, device: str | torch.device = "cpu") -> torch.Tensor:
    """How much of each pixel the shape covers, (N, size, size) float32 in [0, 1] on ``device``."""
    f = lambda t: t.to(device=device, dtype=torch.float32)[:, None, None]  # noqa: E731  (N, 1, 1)
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5                # pixel centres
    dx, dy = centres[None, None, :] - f(scenes.cx), centres[None, :, None] - f(scenes.cy)
    dist = torch.sqrt(dx * dx + dy * dy)                                                  # (N, H, W)
    angle = torch.remainder(torch.atan2(dy, dx) - f(scenes.rotation), 2 * math.pi)
    table = torch.tensor([[v, r] for v, r in SHAPES.values()], device=device, dtype=torch.float32)
    vertices, inner = table[scenes.shape.to(device), 0], table[scenes.shape.to(device), 1]
    polygon = vertices > 0
    step = 2 * math.pi / torch.where(polygon, vertices, torch.ones_like(vertices))[:, None, None]
    sector = torch.floor(angle / step)
    psi = angle - sector * step                                                           # angle in the sector
    r_out = f(scenes.radius)
    r_in = r_out * inner[:, None, None]
    odd = torch.remainder(sector, 2) == 1                                                 # stars alternate radii
    ra, rb = torch.where(odd, r_in, r_out), torch.where(odd, r_out, r_in)
    # the boundary between two vertices (ra at angle 0, rb at angle step) in polar form
    edge = ra * rb * torch.sin(step) / (ra * torch.sin(psi) + rb * torch.sin(step - psi))
    boundary = torch.where(polygon[:, None, None], edge, r_out)
    return (boundary - dist + 0.5).clamp(0.0, 1.0)


def render(scenes: Scenes, size: int = IMAGE_SIZE, device: str | torch.device = "cpu"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, H, W, 3) uint8 and the shape's coverage (N, H, W) float32, on ``device``."""
    cover = coverage(scenes, size, device)
    palette = torch.tensor(list(COLOURS.values()), device=device, dtype=torch.float32)    # (8, 3)
    fg = palette[scenes.colour.to(device)][:, None, None, :]
    bg = palette[scenes.background.to(device)][:, None, None, :]
    images = cover[..., None] * fg + (1 - cover[..., None]) * bg
    return images.round().clamp(0, 255).to(torch.uint8), cover


def hints(images: torch.Tensor | np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """Canny edges (N, H, W) uint8 (0 or 255) of uint8 images (N, H, W, 3), with the pipeline's
    :func:`canny_hint` one image at a time (on the CPU, as the pipeline computes hints)."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
    return np.stack([canny_hint(np.ascontiguousarray(im), low_threshold, high_threshold)[0][..., 0]
                     for im in images])


class ShapesData:
    """A pool of ``n`` scenes from ``seed``, drawn once on ``device``: what training samples batches from.

    Attributes: ``scenes``, ``images`` (N, 3, H, W) uint8, ``cover`` (N, H, W), ``edges`` (N, H, W) uint8
    once :meth:`make_hints` ran (the ControlNet stage needs them; the VAE and UNet stages do not).
    """

    def __init__(self, n: int, seed: int = TRAIN_SEED, size: int = IMAGE_SIZE,
                 device: str | torch.device = "cpu", chunk: int = 4096):
        self.n, self.seed, self.size, self.device = n, seed, size, torch.device(device)
        self.scenes = sample_scenes(n, seed, size)
        images, cover = [], []
        for start in range(0, n, chunk):
            part = Scenes(*(getattr(self.scenes, f)[start:start + chunk] for f in Scenes.__dataclass_fields__))
            im, cv = render(part, size, self.device)
            images.append(im.permute(0, 3, 1, 2).contiguous())
            cover.append(cv.half())
        self.images, self.cover = torch.cat(images), torch.cat(cover)
        self.combo = self.scenes.combo().to(self.device)
        self.edges: torch.Tensor | None = None

    def make_hints(self) -> torch.Tensor:
        """Canny edges of every image of the pool (CPU, ~40 us an image), kept on the pool's device."""
        if self.edges is None:
            self.edges = torch.from_numpy(hints(self.images.permute(0, 2, 3, 1))).to(self.device)
        return self.edges

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Images of ``index`` as float (B, 3, H, W) in [-1, 1], what the VAE encodes."""
        return self.images[index].float() / 127.5 - 1.0

    def hint(self, index: torch.Tensor) -> torch.Tensor:
        """ControlNet's hint for ``index``: (B, 3, H, W) float in [0, 1], as ``canny_hint`` returns it."""
        if self.edges is None:
            raise ValueError("ShapesData.hint: call make_hints() first")
        return (self.edges[index].float() / 255.0)[:, None].expand(-1, 3, -1, -1)
