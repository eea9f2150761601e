"""A run's processes (accelerate): one process on a CPU or GPU, or several under
``accelerate launch``: DDP (each process a full student), or FSDP with
``workbench/configs/accelerate-fsdp.yaml`` (the student's weights, gradients and optimizer
states sharded across the processes). The recipe asks these things of them, all here."""

from __future__ import annotations

import torch

from workbench import lora_kd
from workbench.catalog import meta_unet
from workbench.distill_config import use_cuda


def make_accelerator(config):
    """A fresh ``Accelerator`` for a run (a ``DistillConfig``). Each stage takes its own, so
    a checkpoint holds that stage's model, optimizer and schedule only. Gradients are
    accumulated by hand (the data stream is the recipe's), so accelerate's is 1."""
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=1, cpu=not use_cuda(config)
    )


def mean_across(acc, totals: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (the logged loss terms of a step)."""
    if acc.num_processes == 1:
        return totals
    keys = sorted(totals)
    values = torch.tensor([totals[k] for k in keys], device=acc.device)
    return dict(zip(keys, acc.reduce(values, reduction="mean").tolist()))


def any_across(acc, flag: bool) -> bool:
    """True on every process if it is true on any (so all stop at the same step)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def is_sharded(acc) -> bool:
    """True under FSDP: no process holds the whole student (accelerate enables it on GPUs only)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def full_student(acc, stage, spec, main: bool):
    """The stage's trained student as a stock UNet on the main process (None elsewhere).
    Sharded, every process takes part in gathering it; LoRA adapters are merged."""
    if not is_sharded(acc):
        return lora_kd.plain(stage.raw, spec, in_place=True) if main else None  # the stage is over
    state = acc.get_state_dict(stage.student)  # a collective: the full weights on the main process
    if not main:
        return None

    unet = meta_unet(spec.config)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet
