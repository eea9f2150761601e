"""Negative prompts for guidance-free students: Negative-Away Steer Attention (NASA, after
SNOOPI, Nguyen et al. 2024).

A w-conditioned (LCD) student, or any UNet sampled without classifier-free guidance, makes
one call per step: there is no unconditional pass to put a negative prompt into. NASA puts
it into the cross-attention instead: every cross-attention layer attends to the prompt as
usual and, separately, to the negative prompt, and subtracts ``scale`` times the latter
before the output projection:

    out = W (softmax(Q K+^T / sqrt(d)) V+  -  scale * softmax(Q K-^T / sqrt(d)) V-) + b

so features are steered away from what the negative prompt names.

SDXL-family UNets also take the prompt through a *pooled* text embedding (the added
conditioning ``text_embeds``, summed into the time embedding), which cross-attention never
sees: on the toy teacher it carries the colour. NASA steers it the same way, by the scale
times the negative prompt's own direction, its pooled embedding less the empty prompt's:

    pooled' = pooled - scale * (pooled(negative) - pooled(""))

which is what a negative prompt does under classifier-free guidance, where it replaces the
empty prompt's prediction, taken to first order in the pooled embedding. SD 1.x/2.x have no
pooled conditioning; there NASA is the cross-attention alone. ``negative_away`` swaps the
processors (and the pooled hook) in for a block of code and always puts the UNet's own back.
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


def takes_pooled(unet) -> bool:
    """Whether ``unet`` takes a pooled text embedding (SDXL's added conditioning ``text_embeds``)."""
    return unet.config.get("addition_embed_type") == "text_time"


def _pooled_hook(away: torch.Tensor, scale: float):
    """A forward pre-hook that moves ``added_cond_kwargs["text_embeds"]`` by ``-scale * away``."""

    def hook(_unet, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        if not added or "text_embeds" not in added:
            raise WorkbenchError(
                "NASA steers the pooled text embedding: call the UNet with added_cond_kwargs={'text_embeds': ...}"
            )
        pooled = added["text_embeds"]
        shift = scale * away.to(pooled.device, pooled.dtype)
        return args, kwargs | {"added_cond_kwargs": added | {"text_embeds": pooled - shift}}

    return hook


@contextmanager
def negative_away(
    unet, negative: torch.Tensor, scale: float, pooled_away: torch.Tensor | None = None
) -> Iterator[None]:
    """NASA on every cross-attention of ``unet`` (processors named ``...attn2.processor``)
    while the block runs, and with ``pooled_away`` (the negative prompt's pooled embedding
    less the empty prompt's, (1 or B, D)) on the pooled text embedding too; the UNet's own
    processors are put back afterwards, even on error."""
    if pooled_away is not None and not takes_pooled(unet):
        raise WorkbenchError(
            "this UNet takes no pooled text embedding (SD 1.x/2.x): give NASA no pooled direction"
        )
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
    handle = None
    try:
        if pooled_away is not None and scale != 0:
            handle = unet.register_forward_pre_hook(_pooled_hook(pooled_away, scale), with_kwargs=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        unet.set_attn_processor(original)
