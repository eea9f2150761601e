"""What would fit: the memory-saving options, cheapest first, the ladder that adds them until
a run fits a GPU size, and the estimate's report as plain text.

The estimates themselves come from ``workbench.memory`` (``memory.suggestions`` runs the
ladder with ``memory.estimate``); a ``MemoryEstimate`` is read here, never made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench.memory_tracker import CATEGORIES, GIB, gib


@dataclass(frozen=True)
class LeanOption:
    """One memory-saving change to a run's config, cheapest (in quality and speed) first."""

    name: str
    flags: str  # how the user asks for it
    applies: Any  # config -> bool: would it change anything?
    apply: Any  # config -> config


def _halve_batch(config):
    return dataclasses.replace(config, batch_size=config.batch_size // 2, grad_accum=config.grad_accum * 2)


LEAN_OPTIONS: tuple[LeanOption, ...] = (
    LeanOption(
        "teacher in bf16",
        "--teacher-dtype bf16",
        lambda c: c.teacher_dtype == "fp32",
        lambda c: dataclasses.replace(c, teacher_dtype="bf16"),
    ),
    LeanOption(
        "bf16 mixed precision",
        "--mixed-precision bf16",
        lambda c: c.mixed_precision == "no",
        lambda c: dataclasses.replace(c, mixed_precision="bf16"),
    ),
    LeanOption(
        "gradient checkpointing (slower steps, same result)",
        "--gradient-checkpointing",
        lambda c: not c.gradient_checkpointing,
        lambda c: dataclasses.replace(c, gradient_checkpointing=True),
    ),
    LeanOption(
        "teacher targets precomputed to disk (the teacher off the GPU during student steps)",
        "--teacher-targets precompute",
        lambda c: (
            c.teacher_targets == "live"
            and not c.has_lcd  # an lcd stage needs the live teacher and its EMA target network
            and (c.w_out > 0 or (c.w_feat > 0 and c.feature_mode != "none"))
        ),
        lambda c: dataclasses.replace(c, teacher_targets="precompute"),
    ),
    LeanOption(
        "8-bit AdamW (bitsandbytes; a quarter of AdamW's states)",
        "--optimizer adamw8bit",
        lambda c: c.optimizer == "adamw",
        lambda c: dataclasses.replace(c, optimizer="adamw8bit"),
    ),
    LeanOption(
        "LoRA-enhanced distillation (adapters where a layer's input is unchanged)",
        "--lora-rank 64",
        lambda c: c.lora_rank == 0 and not c.has_lcd,
        lambda c: dataclasses.replace(c, lora_rank=64),
    ),
    LeanOption(
        "LCM-LoRA (adapters on the frozen student; its EMA target network copies them)",
        "--lcd-lora-rank 64",
        lambda c: c.has_lcd and c.lcd_lora_rank == 0,
        lambda c: dataclasses.replace(c, lcd_lora_rank=64),
    ),
    LeanOption(
        "half the batch, twice the accumulation (same effective batch, slower)",
        "--batch-size B/2 --grad-accum 2A",
        lambda c: c.batch_size > 1 and c.batch_size % 2 == 0,
        _halve_batch,
    ),
)


def ladder(config, first, estimate: Callable[[Any], Any], sizes_gb: tuple[int, ...]) -> list[dict[str, Any]]:
    """For each GPU size the run (``config``, whose estimate is ``first``) does not fit, the
    cheapest options that make it fit.

    Options are added one at a time, cheapest first (``LEAN_OPTIONS``; halving the batch
    repeats down to 1), each rung estimated like the run itself (``estimate(config)``), until
    every size fits or nothing is left to add.
    """
    ladder = [([], config, first)]
    missing = [gb for gb in sizes_gb if _verdict(first, gb) != "fits"]
    while missing:
        options, current, _ = ladder[-1]
        option = next((o for o in LEAN_OPTIONS if o.applies(current)), None)
        if option is None:
            break
        changed = option.apply(current)
        result = estimate(changed)
        ladder.append(([*options, option], changed, result))
        missing = [gb for gb in missing if _verdict(result, gb) != "fits"]
    rows = []
    for gb in sizes_gb:
        if _verdict(first, gb) == "fits":
            continue
        rung = next((r for r in ladder if _verdict(r[2], gb) == "fits"), None)
        rows.append(_suggestion_row(gb, rung))
    return rows


def _verdict(result, gb: int) -> str:
    return next(v["verdict"] for v in result.verdicts((gb,)))


def _suggestion_row(gb: int, rung) -> dict[str, Any]:
    if rung is None:
        return {"gpu_gb": gb, "fits": False, "options": [], "flags": "", "total_gb": None}
    options, changed, result = rung
    flags = [o.flags for o in dict.fromkeys(options) if o.apply is not _halve_batch]
    if any(o.apply is _halve_batch for o in options):
        flags.append(f"--batch-size {changed.batch_size} --grad-accum {changed.grad_accum}")
    return {
        "gpu_gb": gb,
        "fits": True,
        "options": list(dict.fromkeys(o.name for o in options)),
        "flags": " ".join(flags),
        "total_gb": round(result.total / GIB, 3),
    }


def report(result, hints: list[dict[str, Any]] | None = None) -> str:
    """The estimate as plain text (the CLI prints it; the app shows it before Launch)."""
    s = result.settings
    plans = [f"{p} (lcd)" if kind == "lcd" else str(p) for p, kind in zip(s["plans"], s["stage_kinds"])]
    lines = [
        f"peak {gib(result.total)} per process ({result.device}) for {', '.join(plans)} on "
        f"{s['base']}, {s['resolution']} px, batch {s['batch_size']} x {s['grad_accum']} accumulation, "
        f"teacher {s['teacher_dtype']}, mixed precision {s['mixed_precision']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, teacher targets {s['teacher_targets']}; the peak is in {result.where}",
    ]
    for name in CATEGORIES:
        lines.append(f"  {name:<12} {gib(result.categories[name]):>12}")
    margin = "the runtime and allocator margin" if result.device == "cpu" else "the CUDA context and allocator margin"
    lines.append(f"  needs about {gib(result.needed())} with {margin}")
    if result.highest is not result.peak:
        lines.append(f"  the largest training step: {gib(result.peak.total)} (stage {result.peak.stage}'s {result.peak.phase})")
    for phase in result.phases:
        lines.append(f"  {phase.name}: {gib(phase.total)}")
    disk = max(st.teacher_targets_disk_bytes for st in result.stages)
    if disk:
        lines.append(
            f"  precomputed teacher targets take {disk / 2**20:.1f} MiB of disk per step and process "
            f"({gib(disk * 1000)} per 1000 steps)"
        )
    lines.append("  " + "   ".join(f"{v['gpu_gb']} GB: {v['verdict']}" for v in result.verdicts()))
    for row in hints or []:
        if row["fits"]:
            lines.append(f"  to fit {row['gpu_gb']} GB: {row['flags']} (peak {row['total_gb']:.2f} GiB)")
        else:
            lines.append(f"  {row['gpu_gb']} GB: does not fit with the options the estimate knows")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def untried(config) -> list[str]:
    """The flags of the memory-saving options ``config`` does not use yet, cheapest first."""
    return [o.flags for o in LEAN_OPTIONS if o.applies(config)]
