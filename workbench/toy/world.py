"""The toy world: coloured shapes on plain backgrounds, with captions.

Every image is rendered procedurally from a ``Scene`` (shape, colour, background,
position, size), so the dataset is infinite, costs nothing to ship and is exactly
reproducible from a seed. Some full captions are held out from training; the
evaluation prompts come only from those.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64

# Shape colours are far apart in RGB so that a pixel-statistics checker can name them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Centre of the shape as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.29, 0.29),
    "top right": (0.71, 0.29),
    "bottom left": (0.29, 0.71),
    "bottom right": (0.71, 0.71),
    "center": (0.5, 0.5),
}
# Side of the shape's bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.27, "large": 0.42}

# About one caption in seven is never shown in training.
HELD_OUT_FRACTION = 1 / 7
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image (besides small seeded jitter)."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"


def all_scenes() -> list[Scene]:
    """Every distinct scene of the world, in a fixed order."""
    return [
        Scene(shape, colour, bg, pos, size)
        for shape, colour, bg, pos, size in itertools.product(SHAPES, COLOURS, BACKGROUNDS, POSITIONS, SIZES)
    ]


def is_held_out(scene: Scene) -> bool:
    """Whether the scene's caption belongs to the evaluation split.

    A hash of the caption (not Python's salted ``hash``) keeps the split identical
    across processes and machines.
    """
    digest = hashlib.sha256(scene.caption.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELD_OUT_FRACTION


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def sample_scene(rng: random.Random, scenes: list[Scene]) -> Scene:
    return scenes[rng.randrange(len(scenes))]


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape centred on (cx, cy) in a ``side`` square box."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # points up, base at the bottom of the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":  # a plus sign with arms one third of the box wide
        t = side / 6
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, seed: int = 0, resolution: int = RESOLUTION) -> Image.Image:
    """Draw ``scene``; ``seed`` picks a small jitter of position and size.

    Drawing at 4x and downsampling gives anti-aliased edges, closer to what a
    generative model produces than hard pixel steps.
    """
    rng = random.Random(seed)
    big = resolution * _SUPERSAMPLE
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * big
    cy = (fy + rng.uniform(-0.04, 0.04)) * big
    side = SIZES[scene.size] * rng.uniform(0.9, 1.1) * big
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        h = side / 2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(_shape_polygon(scene.shape, cx, cy, side), fill=fill)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def render_batch(rng: random.Random, scenes: list[Scene], n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` random scenes as a float array in [-1, 1] (N, 3, H, W) plus their captions."""
    picked = [sample_scene(rng, scenes) for _ in range(n)]
    arrays = [np.asarray(render(s, seed=rng.randrange(2**31)), dtype=np.float32) for s in picked]
    batch = np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return batch, [s.caption for s in picked]


def vocabulary() -> list[str]:
    """Every word the captions use, for building the tokenizer."""
    words: set[str] = {"a", "on", "background", ","}
    words.update(SHAPES, COLOURS, BACKGROUNDS, SIZES)
    for pos in POSITIONS:
        words.update(pos.split())
    return sorted(words)
