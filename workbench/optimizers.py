"""The optimizers a distillation run can use: AdamW, and 8-bit AdamW (bitsandbytes).

8-bit AdamW keeps both moment estimates in blockwise-quantised 8 bits (a byte per weight
each, plus one fp32 scale per block of 256), a quarter of AdamW's 8 bytes per weight.
bitsandbytes is an optional dependency (``pip install bitsandbytes==0.50.2``); whether it
runs on the training device is checked with one tiny step before the run starts, so an
unsupported device or install fails with one line instead of a traceback mid-run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workbench.errors import WorkbenchError

OPTIMIZERS = ("adamw", "adamw8bit")
BNB_VERSION = "0.50.2"  # tested with
# bitsandbytes keeps 32-bit states for tensors smaller than this (its ``min_8bit_size``)
MIN_8BIT_SIZE = 4096
BLOCK = 256  # elements per quantisation block (one fp32 absmax each)
# Device types with a native 8-bit optimizer kernel in bitsandbytes 0.50 (elsewhere it
# falls back to a slow generic path, or nothing).
DEVICES_8BIT = ("cuda", "cpu", "xpu")


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise WorkbenchError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float):
    """The run's optimizer over ``params`` (the trainable student parameters)."""
    check_optimizer(name)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bnb = _bitsandbytes()
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=MIN_8BIT_SIZE)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise WorkbenchError(
            f"--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install "
            f"bitsandbytes=={BNB_VERSION} (or use --optimizer adamw)"
        ) from None
    return bitsandbytes


def check_device(name: str, device: str | torch.device) -> None:
    """Take one 8-bit step on a tiny tensor on ``device``: a precise error if it can't."""
    if check_optimizer(name) != "adamw8bit":
        return
    bnb = _bitsandbytes()
    kind = torch.device(device).type
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
            f"{str(device)!r} ({type(err).__name__}: {first}); use a CUDA GPU or the CPU, or --optimizer adamw"
        ) from None
