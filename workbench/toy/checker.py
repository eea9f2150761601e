"""Does an image show what its prompt asks for? (toy world only)

The toy world's stand-in for CLIP score: no learned weights, only pixel statistics
that follow from how ``world.render`` draws. It judges every attribute a caption
names:

* background: the named background nearest the median border pixel;
* the shape is every pixel far from the background (its largest blob);
* colour: the named colour nearest the blob's median pixel;
* shape: two numbers describe the silhouette inside its bounding box:
  fill, area / box area (square 1.0, circle 0.79, cross 0.56, triangle 0.5), and
  top, the share of the area in the upper half of the box (triangle 0.25, others 0.5);
* position: the named position nearest the centre of the blob's bounding box;
* size: the named size nearest the longer side of that box.

*Fidelity* (colour and shape right) is the project's original score, kept for
continuity; *full-prompt accuracy* asks for all five attributes at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from workbench.toy.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

ATTRIBUTES = ("colour", "shape", "background", "position", "size")
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


def _alternatives(names) -> str:
    # Longest first, so "top left" wins over a shorter overlapping name.
    return "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))


_PATTERNS = {
    "colour": re.compile(rf"\b({_alternatives(COLOURS)})\b"),
    "shape": re.compile(rf"\b({_alternatives(SHAPES)})\b"),
    "background": re.compile(rf"\b({_alternatives(BACKGROUNDS)})\s+background\b"),
    "position": re.compile(rf"\b({_alternatives(POSITIONS)})\b"),
    "size": re.compile(rf"\b({_alternatives(SIZES)})\b"),
}


@dataclass(frozen=True)
class Judgement:
    """What one image shows against what its prompt asks for.

    ``wanted`` holds only the attributes the prompt names; ``seen`` every attribute the
    checker read from the image (``None`` where the image shows no shape).
    """

    wanted: dict[str, str]
    seen: dict[str, str | None]

    @property
    def colour(self) -> str | None:
        return self.seen["colour"]

    @property
    def shape(self) -> str | None:
        return self.seen["shape"]

    def right(self, attribute: str) -> bool:
        return self.seen[attribute] == self.wanted[attribute]

    @property
    def ok(self) -> bool:
        """Colour and shape right: the project's original fidelity."""
        return self.right("colour") and self.right("shape")

    @property
    def full_ok(self) -> bool:
        """Every attribute the prompt names is right."""
        return all(self.right(a) for a in self.wanted)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a toy prompt names; colour and shape are required.

    ``"a large red circle on a white background, center"`` ->
    ``{"colour": "red", "shape": "circle", "background": "white", "position": "center",
    "size": "large"}``. The background colour is read before the shape colour, so that
    "a red circle on a white background" does not take "white" for the circle.
    """
    text = prompt.lower()
    wanted: dict[str, str] = {}
    background = _PATTERNS["background"].search(text)
    if background:
        wanted["background"] = background.group(1)
        text = text[: background.start()] + text[background.end() :]
    for name in ("colour", "shape", "position", "size"):
        match = _PATTERNS[name].search(text)
        if match:
            wanted[name] = match.group(1)
    if "colour" not in wanted or "shape" not in wanted:
        raise ValueError(
            f"not a toy-world prompt (it needs a colour and a shape, e.g. 'a red circle'): {prompt!r}"
        )
    return wanted


def _nearest(value: np.ndarray | float, table: dict[str, object]) -> str:
    names = list(table)
    dists = [np.linalg.norm(np.asarray(value, dtype=np.float64) - np.asarray(table[n])) for n in names]
    return names[int(np.argmin(dists))]


def _background(rgb: np.ndarray) -> str:
    """The named background colour closest to the median border pixel."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


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


def describe(image: Image.Image) -> dict[str, str | None]:
    """Every attribute the image seems to show; all but the background are ``None``
    where it shows no shape."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = _background(rgb)
    seen: dict[str, str | None] = {a: None for a in ATTRIBUTES} | {"background": background}
    distance = np.linalg.norm(rgb - np.array(BACKGROUNDS[background], dtype=np.float32), axis=-1)
    mask = distance > _FOREGROUND_DISTANCE
    if mask.sum() < _MIN_AREA:
        return seen
    mask = _largest_component(mask)
    if mask.sum() < _MIN_AREA:
        return seen
    seen["colour"] = _nearest(np.median(rgb[mask], axis=0), COLOURS)
    seen["shape"] = _name_shape(mask)
    seen["position"], seen["size"] = _place(mask)
    return seen


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def _name_shape(mask: np.ndarray) -> str:
    y0, y1, x0, x1 = _box(mask)
    box = mask[y0:y1, x0:x1].astype(np.float32)
    fill = box.mean()
    top = box[: box.shape[0] // 2].sum() / box.sum()
    # Top share varies twice as much as fill between shapes, so weight it up.
    scores = {name: (fill - f) ** 2 + (2 * (top - t)) ** 2 for name, (f, t) in _SHAPE_FEATURES.items()}
    return min(scores, key=scores.__getitem__)


def _place(mask: np.ndarray) -> tuple[str, str]:
    """(position, size) from the blob's bounding box, as fractions of the image side.

    ``world.render`` centres every shape's box on its position and sizes the box, so
    the box centre and its longer side are exactly what the caption controls.
    """
    h, w = mask.shape
    y0, y1, x0, x1 = _box(mask)
    centre = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h)
    side = max((x1 - x0) / w, (y1 - y0) / h)
    return _nearest(centre, POSITIONS), _nearest(side, SIZES)


def judge(image: Image.Image, prompt: str) -> Judgement:
    """What ``image`` shows against every attribute ``prompt`` names."""
    return Judgement(parse_prompt(prompt), describe(image))


def judge_all(images: list[Image.Image], prompts: list[str]) -> list[Judgement]:
    if len(images) != len(prompts) or not images:
        raise ValueError("need one prompt per image, and at least one image")
    return [judge(i, p) for i, p in zip(images, prompts, strict=True)]


def fidelity(images: list[Image.Image], prompts: list[str]) -> float:
    """Fraction of images judged to show the colour and shape their prompt asks for."""
    judgements = judge_all(images, prompts)
    return sum(j.ok for j in judgements) / len(judgements)


def accuracy(judgements: list[Judgement]) -> dict[str, float]:
    """Per-attribute accuracy (over the prompts that name it), full-prompt accuracy and
    fidelity (colour and shape), each a fraction of the images."""
    result: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        named = [j for j in judgements if attribute in j.wanted]
        if named:
            result[attribute] = sum(j.right(attribute) for j in named) / len(named)
    result["full"] = sum(j.full_ok for j in judgements) / len(judgements)
    result["fidelity"] = sum(j.ok for j in judgements) / len(judgements)
    return result
