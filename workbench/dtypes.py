"""Dtype names (``fp32``, ``bf16``, ``fp16``), their torch dtypes, and the one rule for the fast
dtype of a device, which the CLI, the app and the benchmarks all ask.

The rule: fp32 on a CPU, bf16 on a CUDA GPU that supports it, else fp16. A CPU runs fp32 at full
speed on any model; bf16 is fast only on CPUs with bf16 units (AMX, AVX512-BF16) and is emulated,
many times slower, elsewhere; fp16 has no fast CPU kernels at all.

torch is imported when a function needs it, not with this module (the app's first page is served
without importing torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from workbench.errors import WorkbenchError

NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype name and why it was chosen (for a CLI line or a UI note)."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"dtype {self.name}: {self.reason}"


@cache
def torch_dtypes() -> dict[str, Any]:
    """The one table from dtype names to torch dtypes."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``name`` (``fp32``, ``bf16`` or ``fp16``), or a precise error."""
    table = torch_dtypes()
    if name not in table:
        raise WorkbenchError(f"unknown dtype {name!r}; choose one of {', '.join(NAMES)}")
    return table[name]


def fast_dtype(device: str) -> DtypeChoice:
    """The dtype ``device`` (``cpu``, ``cuda``, ``cuda:N``) runs fastest, and why."""
    device = (device or "cpu").strip().lower()
    if not device.startswith("cuda"):
        return DtypeChoice("fp32", "full speed on every CPU (bf16 is fast only on CPUs with AMX/AVX512-BF16)")
    import torch

    if not torch.cuda.is_available():
        return DtypeChoice(
            "fp16", "CUDA is not available here to ask for bf16 support; fp16 runs on every GPU"
        )
    if torch.cuda.is_bf16_supported():
        return DtypeChoice("bf16", f"{torch.cuda.get_device_name(_index(device))} supports bf16")
    return DtypeChoice("fp16", f"{torch.cuda.get_device_name(_index(device))} has no bf16 support")


def _index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0
