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
sees: on the toy teacher it carries the colour and the background. NASA steers it too, with
its own scale: it takes out ``pooled_scale`` times the prompt's content along the negative
prompt's direction, both measured from the empty prompt's pooled embedding e:

    d = (pooled(negative) - e) / |pooled(negative) - e|
    pooled' = pooled - pooled_scale * ((pooled - e) . d) d

(1: nothing of the negative's direction left; 2: as much again the other way). A negative
prompt the prompt does not share (another colour) moves it little, unlike subtracting the
negative's direction outright. SD 1.x/2.x have no pooled conditioning; there NASA is the
cross-attention alone. ``negative_away`` swaps the
processors (and the pooled hook) in for a block of code and always puts the UNet's own back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

NASA_SCALE = 0.5  # default strength in the cross-attention; 0 leaves the output unchanged
# Default strength on the pooled embedding, where NASA suppresses with far less harm to what the
# negative prompt does not name than in the cross-attention; on the toy, 1.5 takes the named
# colour out of 78-82% of images while the other attributes hold (benchmarks/README.md, NASA).
NASA_POOLED_SCALE = 1.5
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


@dataclass(frozen=True)
class PooledNegative:
    """A negative prompt in the pooled text embedding: its pooled embedding and the empty
    prompt's, (1, D) each."""

    negative: torch.Tensor
    empty: torch.Tensor

    def steer(self, pooled: torch.Tensor, scale: float) -> torch.Tensor:
        """``pooled`` (B, D) with ``scale`` x its content along the negative prompt's direction
        taken out (scale 1: none left; 2: as much again the other way)."""
        empty = self.empty.to(pooled.device, pooled.dtype)
        direction = self.negative.to(pooled.device, pooled.dtype) - empty
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        content = ((pooled - empty) * direction).sum(-1, keepdim=True)  # (B, 1)
        return pooled - scale * content * direction


def pooled_negative(negative: torch.Tensor, empty: torch.Tensor) -> PooledNegative:
    if negative.shape[-1] != empty.shape[-1]:
        raise WorkbenchError(
            f"pooled embeddings of {negative.shape[-1]} and {empty.shape[-1]} values; give one text encoder's"
        )
    return PooledNegative(negative.detach(), empty.detach())


def _pooled_hook(pooled: PooledNegative, scale: float):
    """A forward pre-hook that steers ``added_cond_kwargs["text_embeds"]`` away from ``pooled``."""

    def hook(_unet, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        if not added or "text_embeds" not in added:
            raise WorkbenchError(
                "NASA steers the pooled text embedding: call the UNet with added_cond_kwargs={'text_embeds': ...}"
            )
        return args, kwargs | {
            "added_cond_kwargs": added | {"text_embeds": pooled.steer(added["text_embeds"], scale)}
        }

    return hook


@contextmanager
def negative_away(
    unet,
    negative: torch.Tensor,
    scale: float,
    pooled: PooledNegative | None = None,
    pooled_scale: float | None = None,
) -> Iterator[None]:
    """NASA on every cross-attention of ``unet`` (processors named ``...attn2.processor``)
    while the block runs, and with ``pooled`` on the pooled text embedding too, at
    ``pooled_scale`` (default: ``scale``); the UNet's own processors are put back
    afterwards, even on error."""
    pooled_scale = scale if pooled_scale is None else pooled_scale
    if pooled is not None and not takes_pooled(unet):
        raise WorkbenchError(
            "this UNet takes no pooled text embedding (SD 1.x/2.x): give NASA no pooled negative"
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
        if pooled is not None and pooled_scale != 0:
            handle = unet.register_forward_pre_hook(_pooled_hook(pooled, pooled_scale), with_kwargs=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        unet.set_attn_processor(original)
