"""What a stage trains and how: the student parameters the optimizer updates, the optimizer,
and the learning-rate schedule. One function each, so a new kind (8-bit AdamW, LoRA
adapters) is a local change."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from workbench.errors import WorkbenchError
from workbench.sensitivity_kd import freeze


def trainable_parameters(student: torch.nn.Module, frozen_modules: list[str],
                         log: Callable[[str], None] | None = None) -> list[torch.nn.Parameter]:  # fmt: skip
    """Every student parameter except those of ``frozen_modules`` (which get no gradient, so
    they stay out of the optimizer and of DDP's buckets); with LoRA adapters
    (``lora_kd.add_adapters``), what they left trainable. ``log`` hears what was frozen."""
    if not getattr(student, "_hf_peft_config_loaded", False):  # LoRA adapters chose for themselves
        student.requires_grad_(True)
    if frozen_modules:
        frozen = freeze(student, frozen_modules)
        total = sum(p.numel() for p in student.parameters())
        if log:
            log(f"{len(frozen_modules)} modules frozen ({frozen:,} of {total:,} parameters)")
    return [p for p in student.parameters() if p.requires_grad]


# 8-bit AdamW (bitsandbytes, an optional dependency) keeps both moments in blockwise-quantised
# 8 bits: a byte per weight each plus an fp32 scale per block of 256, a quarter of AdamW's.
BNB_VERSION = "0.50.2"  # tested with
MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
BLOCK = 256  # elements per quantisation block
# Device types with a native 8-bit optimizer kernel in bitsandbytes 0.50
DEVICES_8BIT = ("cuda", "cpu", "xpu")


def make_optimizer(params: list[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    """The run's (a ``DistillConfig``) optimizer: AdamW or 8-bit AdamW, with its learning
    rate and weight decay."""
    if config.optimizer == "adamw8bit":
        return bitsandbytes().optim.AdamW8bit(
            params, lr=config.lr, weight_decay=config.weight_decay, min_8bit_size=MIN_8BIT_SIZE
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise WorkbenchError(
            f"--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install "
            f"bitsandbytes=={BNB_VERSION} (or use --optimizer adamw)"
        ) from None
    return bitsandbytes


def check_optimizer_device(optimizer: str, device: str | torch.device) -> None:
    """8-bit AdamW: one tiny step on ``device`` before the run, so an unsupported device or
    install fails with one line, not a traceback mid-run."""
    if optimizer != "adamw8bit":
        return
    bnb, kind = bitsandbytes(), torch.device(device).type
    if kind not in DEVICES_8BIT:
        raise WorkbenchError(
            f"--optimizer adamw8bit: bitsandbytes has no 8-bit optimizer kernel for device {kind!r} "
            f"(it has for {', '.join(DEVICES_8BIT)}); use --optimizer adamw there"
        )
    try:
        p = torch.nn.Parameter(torch.zeros(MIN_8BIT_SIZE, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=MIN_8BIT_SIZE).step()
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise WorkbenchError(
            f"--optimizer adamw8bit: bitsandbytes {bnb.__version__} cannot run on device "
            f"{str(device)!r} ({type(err).__name__}: {first}); use --optimizer adamw"
        ) from None


def lr_factor(config) -> Callable[[int], float]:
    """The learning rate's factor at a stage step: linear warm-up, then constant or cosine
    down to 0.1 over the stage's ``steps`` (the horizon)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        if config.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, config.steps))
            return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def make_schedule(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
