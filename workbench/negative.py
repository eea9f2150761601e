"""Negative prompts for guidance-free students: Negative-Away Steer Attention (NASA, after
SNOOPI, Nguyen et al. 2024).

A w-conditioned (LCD) student, or any UNet sampled without classifier-free guidance, makes
one call per step: there is no unconditional pass to put a negative prompt into. NASA puts
it into the cross-attention instead: every cross-attention layer attends to the prompt as
usual and, separately, to the negative prompt, and subtracts ``scale`` times the latter
before the output projection:

    out = W (softmax(Q K+^T / sqrt(d)) V+  -  scale * softmax(Q K-^T / sqrt(d)) V-) + b

so features are steered away from what the negative prompt names. ``negative_away`` swaps
the processors in for a block of code and always puts the UNet's own back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from workbench.errors import WorkbenchError

NASA_SCALE = 0.5  # default strength; 0 leaves the output unchanged
MAX_NASA_SCALE = 2.0


def check_scale(scale: float, what: str = "NASA scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_NASA_SCALE:
        raise WorkbenchError(f"{what} must be a number from 0 to {MAX_NASA_SCALE:g} (0: off), got {scale!r}")
    return float(scale)


class NegativeAwayProcessor:
    """A cross-attention processor: ``base``'s output minus ``scale`` x its attention to
    ``negative`` (the negative prompt's text embeddings, (1 or B, L, D))."""

    def __init__(self, base, negative: torch.Tensor, scale: float) -> None:
        self.base, self.negative, self.scale = base, negative, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        if encoder_hidden_states is None or self.scale == 0:
            return out
        negative = self.negative.to(hidden_states.device, hidden_states.dtype)
        negative = negative.expand(hidden_states.shape[0], *negative.shape[1:])
        away = self.base(attn, hidden_states, negative, None, temb, **kw)
        bias = attn.to_out[0].bias  # W a + b for both: subtract W a- alone
        if bias is not None:
            b = bias / attn.rescale_output_factor
            away = away - (b.view(-1, 1, 1) if away.ndim == 4 else b)  # (B, C, H, W) or (B, N, C)
        return out - self.scale * away


@contextmanager
def negative_away(unet, negative: torch.Tensor, scale: float) -> Iterator[None]:
    """NASA on every cross-attention of ``unet`` (processors named ``...attn2.processor``)
    while the block runs; the UNet's own processors are put back afterwards, even on error."""
    original = unet.attn_processors
    for name in original:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if attn.residual_connection:
                raise WorkbenchError(f"{name}: NASA needs cross-attention without a residual connection")
    unet.set_attn_processor({
        name: NegativeAwayProcessor(p, negative, scale) if name.endswith("attn2.processor") else p
        for name, p in original.items()
    })  # fmt: skip
    try:
        yield
    finally:
        unet.set_attn_processor(original)
