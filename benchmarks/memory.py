"""Memory estimate: validation against a measured CPU peak, its run time on SDXL, and the
SDXL table (what fits a 24 GB GPU).

    python benchmarks/memory.py validate [--cases toy,sdxl-w5]   # estimate vs measured peak
    python benchmarks/memory.py time                            # SDXL + SSD-1B at 1024 px
    python benchmarks/memory.py table [--batches 1,2,4]         # SDXL presets x options

**How the peak is measured (validate).** Each case runs in a fresh Python process: after
the imports it records its resident set (RSS, ``/proc/self/status``), builds the teacher
and student (random weights) and the optimizer exactly as the estimate does, takes one
real training step on the CPU (this creates the optimizer states), returns freed memory
to the OS (``malloc_trim``), resets the kernel's high-water mark (``/proc/self/clear_refs``
``5``), takes a second step and reads the high-water mark (``VmHWM``). The measured peak
is that high-water mark minus the RSS after the imports: everything the step's process
held at its peak, including what no tensor tracker sees (allocator slack, module
objects, kernel scratch). The estimate it is compared with is ``memory.estimate(...,
device="cpu")`` (the CPU's autocast and AdamW defaults) without the ``encoders`` category
(the measuring process loads no text encoders or VAE).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

GIB = 2**30

# Validation cases: (name, base, preset, batch, resolution, options)
# fmt: off
CASES = {
    "toy": ("toy", "ssd-1b", 8, None, {}),
    "toy-b64": ("toy", "ssd-1b", 64, None, {}),
    "toy-b64-bf16-ckpt": ("toy", "ssd-1b", 64, None, {"mixed_precision": "bf16", "gradient_checkpointing": True}),
    "sdxl-w5": ("sdxl-w5", "ssd-1b", 2, 256, {}),
    "sdxl-w5-vega-bf16": (
        "sdxl-w5",
        "segmind-vega",
        2,
        256,
        {"mixed_precision": "bf16", "teacher_dtype": "bf16"},
    ),
    "sdxl-w5-ckpt-accum": ("sdxl-w5", "ssd-1b", 2, 256, {"gradient_checkpointing": True, "grad_accum": 2}),
}
# fmt: on


def reduced_sdxl(folder: Path) -> str:
    """SDXL's UNet config at a fifth of its width (channels 64/128/256, 64-wide heads as
    SDXL's), every layer and transformer depth kept: a UNet folder (config only)."""
    from workbench.models import resolve_base

    config = dict(resolve_base("sdxl-base").unet_config)
    config.update({"_class_name": "UNet2DConditionModel", "block_out_channels": [64, 128, 256],
                   "attention_head_dim": [1, 2, 4]})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def case_config(name: str, workdir: Path):
    from workbench.distill import DistillConfig
    from workbench.presets import load_preset

    base, preset, batch, resolution, options = CASES[name]
    if base == "sdxl-w5":
        base = reduced_sdxl(workdir / "sdxl-w5")
    return DistillConfig(stages=(load_preset(preset).to_dict(),), steps=1, base=base, batch_size=batch,
                         resolution=resolution, **options)  # fmt: skip


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(name: str, workdir: Path) -> dict:
    """In this (fresh) process: the real step's peak, as the module docstring says."""
    import gc

    import torch

    from workbench import memory, memory_tracker
    from workbench.distill_config import check_plans
    from workbench.models import resolve_base

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    config = case_config(name, workdir)
    base = resolve_base(config.base)
    specs = check_plans(config, base.unet_config)
    shapes = memory._shapes(base, memory.resolution_of(config, base))
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    baseline = _rss("VmRSS")
    models = memory._stage_models(config, base, specs, 0, None)
    optimizer = memory_tracker.optimizer_of(config, models.trainable, "cpu")
    memory._train_step(config, models, optimizer, shapes, "cpu", memory_tracker.Tracker())  # states created
    gc.collect()
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    memory._train_step(config, models, optimizer, shapes, "cpu", memory_tracker.Tracker())
    return {"measured": _rss("VmHWM") - baseline, "step_s": time.perf_counter() - started}


def validate(names: list[str]) -> list[dict]:
    import torch

    from workbench import memory

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config = case_config(name, Path(tmp))
            result = memory.estimate(config, device="cpu")
            estimated = result.total - result.categories["encoders"]
            out = subprocess.run([sys.executable, __file__, "_measure", name, tmp], check=True,
                                 capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"case": name, "estimated": estimated, "measured": measured["measured"],
                   "error": estimated / measured["measured"] - 1, "phase": result.peak.phase,
                   "estimate_s": result.seconds, "step_s": measured["step_s"]}  # fmt: skip
            rows.append(row)
            print(f"| {name} | {estimated / 2**20:.1f} | {measured['measured'] / 2**20:.1f} | "
                  f"{row['error']:+.1%} | {row['phase']} | {row['estimate_s']:.1f} |", flush=True)  # fmt: skip
    return rows


def time_sdxl() -> dict:
    import torch

    from workbench import memory, memory_advice
    from workbench.distill import DistillConfig
    from workbench.presets import load_preset

    torch.set_num_threads(1)
    config = DistillConfig(stages=(load_preset("ssd-1b").to_dict(),), steps=1, base="sdxl-base",
                           batch_size=1, resolution=1024)  # fmt: skip
    memory.estimate(DistillConfig(stages=config.stages, steps=1, base="toy"))  # imports, warm caches
    cpu, wall = time.process_time(), time.perf_counter()
    result = memory.estimate(config)
    row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "total_gib": result.total / GIB, "load": os.getloadavg()[0]}  # fmt: skip
    print(memory_advice.report(result))
    print(json.dumps(row))
    return row


# fmt: off
TABLE_OPTIONS = {
    "as is (fp32 teacher, fp32 AdamW)": {},
    "teacher bf16": {"teacher_dtype": "bf16"},
    "bf16 mixed precision": {"mixed_precision": "bf16"},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "teacher bf16 + bf16 mixed precision + checkpointing": {"teacher_dtype": "bf16", "mixed_precision": "bf16",
                                                           "gradient_checkpointing": True},
    "8-bit AdamW": {"optimizer": "adamw8bit"},
    "LoRA rank 64": {"lora_rank": 64},
    "all: bf16 teacher + bf16 + checkpointing + 8-bit AdamW": {"teacher_dtype": "bf16", "mixed_precision": "bf16",
                                                               "gradient_checkpointing": True, "optimizer": "adamw8bit"},
    "all + LoRA rank 64": {"teacher_dtype": "bf16", "mixed_precision": "bf16", "gradient_checkpointing": True,
                           "optimizer": "adamw8bit", "lora_rank": 64},
}
# fmt: on


def table(presets: list[str], batches: list[int], options: dict[str, dict]) -> list[dict]:
    import torch

    from workbench import memory
    from workbench.distill import DistillConfig
    from workbench.presets import load_preset

    torch.set_num_threads(1)
    rows = []
    print(f"| preset | batch | options | peak GiB | {' | '.join(memory.CATEGORIES)} | 24 GB |")
    print("|---" * (len(memory.CATEGORIES) + 5) + "|")
    for preset in presets:
        for batch in batches:
            for label, fields in options.items():
                config = DistillConfig(stages=(load_preset(preset).to_dict(),), steps=1, base="sdxl-base",
                                       batch_size=batch, resolution=1024, **fields)  # fmt: skip
                r = memory.estimate(config)
                verdict = r.verdicts((24,))[0]["verdict"]
                cats = " | ".join(f"{r.categories[c] / GIB:.2f}" for c in memory.CATEGORIES)
                print(
                    f"| {preset} | {batch} | {label} | {r.total / GIB:.2f} | {cats} | {verdict} |", flush=True
                )
                rows.append({"preset": preset, "batch": batch, "options": label, "total": r.total,
                             "categories": r.categories, "verdict_24": verdict, "seconds": r.seconds})  # fmt: skip
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure(sys.argv[2], Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["validate", "time", "table"])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--presets", default="ssd-1b,segmind-vega")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--options", default=",".join(str(i) for i in range(len(TABLE_OPTIONS))))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.what == "validate":
        print("| case | estimated MiB | measured MiB | error | peak phase | estimate s |")
        print("|---|---|---|---|---|---|")
        rows = validate(args.cases.split(","))
    elif args.what == "time":
        rows = [time_sdxl()]
    else:
        labels = list(TABLE_OPTIONS)
        chosen = {labels[int(i)]: TABLE_OPTIONS[labels[int(i)]] for i in args.options.split(",")}
        rows = table(args.presets.split(","), [int(b) for b in args.batches.split(",")], chosen)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
