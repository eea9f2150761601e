"""Plain formatting helpers: numbers, Markdown snippets and unit labels (no gradio, no models)."""

from __future__ import annotations

import html
from collections.abc import Iterable


def params(n: float) -> str:
    """2567463684 -> '2.57B', 31100000 -> '31.1M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if abs(n) < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(int(n))


def flops(n: float) -> str:
    """6.761e12 -> '6.76 TFLOPs'; one UNet forward."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}FLOPs"
    return f"{int(n)} FLOPs"


def flops_short(n: float) -> str:
    """Compact FLOPs for crowded labels: '97 GF'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}F"
    return f"{int(n)} F"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def factor(teacher: float, student: float, word: str) -> str:
    """'1.61x fewer' / '1.54x faster'; 'same' when equal, '-' when undefined."""
    if not teacher or not student:
        return "-"
    if teacher == student:
        return "same"
    return f"{teacher / student:.2f}x {word}"


def escape(text: str) -> str:
    """Text that Markdown shows literally (unit ids contain underscores and dots)."""
    return html.escape(text).replace("_", "\\_").replace("*", "\\*")


def code(text: str) -> str:
    return f"`{text}`"


def error_md(message: str, title: str = "Not possible") -> str:
    return f"<div class='wb-error'><b>{html.escape(title)}:</b> {html.escape(message)}</div>"


def notice_md(message: str) -> str:
    return f"<div class='wb-notice'>{html.escape(message)}</div>"


def ok_md(message: str) -> str:
    return f"<div class='wb-ok'>{html.escape(message)}</div>"


def bullets(lines: Iterable[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    align = ["---"] + ["--:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# ------------------------------------------------------------------ images


def enlargement(size: tuple[int, int], at_least: int) -> int:
    """The whole factor that brings an image's longer side to at least ``at_least`` px (1 if it is)."""
    return max(1, at_least // max(size))


def enlarged(image, at_least: int = 256):
    """A small image scaled up by a whole factor with nearest-neighbour pixels (a 64 px toy image
    becomes 256 px of sharp 4x4 blocks, not a blur); an image already that large is unchanged."""
    from PIL import Image

    k = enlargement(image.size, at_least)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


# ------------------------------------------------------------------ unit labels


def choice_label(what: str, n_params: int, n_flops: int) -> str:
    """A toggle's label: what it removes, its parameters and FLOPs ('block 3 · 31.1M · 97 GF')."""
    return f"{what} · {params(n_params)} · {flops_short(n_flops)}"


def stage_title(path: str, block_type: str | None) -> str:
    """'down_blocks.2' -> 'Down stage 2 · CrossAttnDownBlock2D'."""
    if path == "mid_block":
        return f"Mid block · {block_type}"
    direction, index = path.split("_blocks.")
    return f"{direction.capitalize()} stage {index} · {block_type}"
