"""Does an image show the colour and shape its prompt asks for? (toy world only)

The toy world's stand-in for CLIP score: no learned weights, only pixel statistics
that follow from how ``world.render`` draws. The background is the dominant colour
of the image border; the shape is every pixel far from it. Its mean colour names
the colour; two numbers describe its silhouette inside its bounding box:

* fill: area / box area (square 1.0, circle 0.79, cross 0.56, triangle 0.5)
* top: share of the area in the upper half of the box (triangle 0.25, others 0.5)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from workbench.toy.world import BACKGROUNDS, COLOURS, SHAPES

# (fill, top) of each shape as rendered, anti-aliasing included.
_SHAPE_FEATURES: dict[str, tuple[float, float]] = {
    "square": (0.97, 0.5),
    "circle": (0.78, 0.5),
    "cross": (0.56, 0.5),
    "triangle": (0.5, 0.26),
}
# A pixel belongs to the shape if it is this far (RGB, 0-255) from the background.
_FOREGROUND_DISTANCE = 70.0
# Fewer shape pixels than this and there is no shape to judge.
_MIN_AREA = 12
_PROMPT = re.compile(
    rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b",
)


@dataclass(frozen=True)
class Judgement:
    colour: str | None
    shape: str | None
    ok: bool


def parse_prompt(prompt: str) -> tuple[str, str]:
    """The (colour, shape) a toy prompt asks for."""
    match = _PROMPT.search(prompt.lower())
    if match is None:
        raise ValueError(f"not a toy-world prompt (no '<colour> <shape>'): {prompt!r}")
    return match.group(1), match.group(2)


def _background(rgb: np.ndarray) -> np.ndarray:
    """The named background colour closest to the median border pixel."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    dists = [np.linalg.norm(median - np.array(BACKGROUNDS[n])) for n in names]
    return np.array(BACKGROUNDS[names[int(np.argmin(dists))]], dtype=np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected blob, so stray speckles do not skew the box."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        stack, size = [(y, x)], 0
        labels[y, x] = current
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def describe(image: Image.Image) -> tuple[str | None, str | None]:
    """The (colour, shape) the image seems to show; ``None`` where it shows none."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = np.linalg.norm(rgb - _background(rgb), axis=-1)
    mask = distance > _FOREGROUND_DISTANCE
    if mask.sum() < _MIN_AREA:
        return None, None
    mask = _largest_component(mask)
    if mask.sum() < _MIN_AREA:
        return None, None
    return _name_colour(rgb[mask]), _name_shape(mask)


def _name_colour(pixels: np.ndarray) -> str:
    mean = np.median(pixels, axis=0)
    names = list(COLOURS)
    dists = [np.linalg.norm(mean - np.array(COLOURS[n])) for n in names]
    return names[int(np.argmin(dists))]


def _name_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1].astype(np.float32)
    fill = box.mean()
    top = box[: box.shape[0] // 2].sum() / box.sum()
    # Top share varies twice as much as fill between shapes, so weight it up.
    scores = {name: (fill - f) ** 2 + (2 * (top - t)) ** 2 for name, (f, t) in _SHAPE_FEATURES.items()}
    return min(scores, key=scores.__getitem__)


def judge(image: Image.Image, prompt: str) -> Judgement:
    """Whether ``image`` shows the colour and shape ``prompt`` asks for."""
    want_colour, want_shape = parse_prompt(prompt)
    colour, shape = describe(image)
    return Judgement(colour, shape, colour == want_colour and shape == want_shape)


def fidelity(images: list[Image.Image], prompts: list[str]) -> float:
    """Fraction of images judged to show what their prompt asks for."""
    if len(images) != len(prompts) or not images:
        raise ValueError("need one prompt per image, and at least one image")
    return sum(judge(i, p).ok for i, p in zip(images, prompts, strict=True)) / len(images)
