"""GPU acceptance: the CUDA paths no CPU run reaches, checked in one command (<= 8 min on one H100).

    python benchmarks/gpu_check.py                  # on a CUDA GPU: SDXL size, 1024 px
    python benchmarks/gpu_check.py --dry-run        # tiny sizes on the CPU, same code (the test suite runs it)
    python benchmarks/gpu_check.py --only latency,memory --json-out gpu_check.json

One table, a row per check:

- ``latency``: the teacher (random weights from SDXL's real UNet config, bf16) and the student of
  every preset that applies to it, one forward at 1024 px, timed interleaved
  (``latency.measure_speedup``): measured speedup beside the FLOP ratio.
- ``memory``: ``memory.estimate(device="cuda")`` against ``torch.cuda.max_memory_allocated``
  over real training steps of three recipes on Vega at 1024 px, batch 1: plain (fp32
  teacher, fp32 AdamW); lean (bf16 teacher, bf16 autocast, gradient checkpointing, 8-bit
  AdamW); LoRA-enhanced (rank 64). The stage is built as ``Distillation.stage`` builds it
  and steps through the recipe's own ``stage_mod.train_step`` under a real ``Accelerator``;
  the first step creates the optimizer states, the peak is read over the steps after it
  (the estimate's steady state).
- ``few-step``: seconds per image of the denoising loop at 1024 px: the teacher at 20
  guided steps (two UNet calls a step) against the w-conditioned (LCD) Vega student at 4
  LCM steps (one call). UNet and scheduler only: a config-only base has no text encoders
  or VAE.
- ``toy``: the recipe itself (``run_distillation``) on the embedded toy teacher with
  ``--mixed-precision bf16`` and ``fp16``: every logged loss term must stay finite.

Every row runs whatever the rows before it did: an error makes its row FAILED with the
error's first line, and the whole table prints at the end. Exit status 0 when every row is
OK. ``--dry-run`` runs the same functions on the CPU with tiny SDXL-topology models
(``workbench.testing``) at 64 px; its memory rows compare ``memory.estimate(device="cpu")``
with the process's resident high-water mark over the same steps (as ``benchmarks/memory.py``
does), and its second toy row trains without mixed precision (fp16 autocast needs CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch
from accelerate.state import AcceleratorState

from workbench import data, distill, latency, lora_kd, losses, memory, optim
from workbench import stage as stage_mod
from workbench.catalog import build_catalog
from workbench.commands._common import human
from workbench.cost import dummy_inputs
from workbench.distill_config import DistillConfig, check_plans
from workbench.errors import WorkbenchError
from workbench.models import as_teacher, resolve_base
from workbench.parallel import make_accelerator
from workbench.presets import list_presets, load_preset
from workbench.runs import read_metrics
from workbench.schedulers import make_scheduler
from workbench.surgery import (
    GUIDANCE_EMBED_DIM,
    build_student,
    compile_plan,
    stage_models,
    with_guidance_embedding,
)
from workbench.testing import tiny_sdxl_config, tiny_unet

GIB = 2**30
GROUPS = ("latency", "memory", "few-step", "toy")
MEMORY_PRESET = "segmind-vega"  # the lean recipe the targets name
# SDXL's noise schedule (its scheduler_config.json): what the training batches are noised with
SDXL_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon", "timestep_spacing": "leading",
                 "steps_offset": 1}  # fmt: skip
FEW_STEPS, GUIDANCE = 4, 5.0  # LCM steps of the few-step student; the teacher's guidance


@dataclass(frozen=True)
class Sizes:
    """How big the checks are: SDXL on a GPU, or tiny on the CPU (``--dry-run``)."""

    device: str
    base: str  # a base name, or a tiny UNet folder
    resolution: int  # px
    latency_dtype: str
    repeats: int  # timed rounds (latency, few-step)
    warmup: int
    lora_rank: int
    steps: int  # real training steps per memory recipe; the first creates the optimizer states
    toy_steps: int
    toy_precisions: tuple[str, ...]
    eight_bit: bool  # the lean recipe's 8-bit AdamW
    teacher_steps: int  # the teacher's denoising steps per image (few-step row)


def gpu_sizes() -> Sizes:
    return Sizes("cuda", "sdxl-base", 1024, "bf16", repeats=5, warmup=2, lora_rank=64, steps=3, toy_steps=4,
                 toy_precisions=("bf16", "fp16"), eight_bit=True, teacher_steps=20)  # fmt: skip


def dry_sizes(folder: Path) -> Sizes:
    """Tiny sizes on the CPU: a tiny SDXL-topology UNet folder (config and seeded weights). The
    lean recipe takes 8-bit AdamW where bitsandbytes is installed (the GPU run always does)."""
    tiny_unet(tiny_sdxl_config()).save_pretrained(folder)
    eight_bit = importlib.util.find_spec("bitsandbytes") is not None
    return Sizes("cpu", str(folder), 64, "fp32", repeats=1, warmup=0, lora_rank=4, steps=2, toy_steps=1,
                 toy_precisions=("bf16", "no"), eight_bit=eight_bit, teacher_steps=4)  # fmt: skip


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    group: str
    check: str
    status: str  # "OK" or "FAILED"
    result: str  # what was measured, or the error's first line
    seconds: float
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def run_row(group: str, check: str, fn: Callable[[], tuple[str, dict[str, Any]]], device: str) -> Row:
    """One check: its result, or FAILED with the error's first line; memory freed after it."""
    print(f"[{group}] {check} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # accelerate keeps one process-wide state, whose mixed precision a later Accelerator may
    # not change: each row starts from none (the recipe itself makes one per run, in its own process)
    AcceleratorState._reset_state()
    try:
        text, figures = fn()
        row = Row(group, check, "OK", text, time.perf_counter() - started, figures)
    except Exception as err:  # a row's failure is its result: the next row runs
        row = Row(group, check, "FAILED", one_line(err), time.perf_counter() - started)
    latency.free_memory(device)
    print(f"[{group}] {check}: {row.status} {row.result} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    return row


def table(rows: list[Row]) -> str:
    lines = ["| group | check | status | result | s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.check} | {r.status} | {r.result.replace('|', '/')} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


class Held:
    """Models a group's rows share (built once, by the first row that needs them), freed when
    the group is done."""

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._held:
            self._held[key] = build()
        return self._held[key]

    def clear(self) -> None:
        self._held.clear()


# --------------------------------------------------------------------------- latency


def sdxl_presets(base: str) -> list[str]:
    """The presets whose plans apply to the base's UNet (the SDXL ones on SDXL's topology)."""
    catalog = build_catalog(resolve_base(base).unet_config)
    names = []
    for name in list_presets():
        with contextlib.suppress(WorkbenchError):
            compile_plan(catalog, load_preset(name))
            names.append(name)
    return names


def latency_checks(sizes: Sizes, held: Held) -> list[tuple[str, Callable]]:
    setup = latency.latency_setup(sizes.base, sizes.device, sizes.latency_dtype, sizes.resolution)

    def teacher():
        return held.get("teacher", lambda: latency.load_teacher(setup))

    def profile() -> tuple[str, dict[str, Any]]:
        p = latency.profile_for(setup, refresh=True, model=teacher())
        text = (f"{p.teacher_s * 1e3:.1f} ms per forward (±{p.teacher_spread / 2:.0%}), "
                f"{human(p.teacher_flops)}FLOPs, {human(p.teacher_params)} params, {p.dtype} {p.resolution} px "
                f"on {p.device_name}")  # fmt: skip
        return text, {"teacher_s": p.teacher_s, "teacher_flops": p.teacher_flops}

    def speedup(name: str) -> tuple[str, dict[str, Any]]:
        r = latency.measure_speedup(setup.base, name, device=setup.device, dtype=setup.dtype,
                                    resolution=setup.resolution, repeats=sizes.repeats, warmup=sizes.warmup,
                                    teacher=teacher())  # fmt: skip
        text = (f"{r['speedup']:.2f}x measured (±{r['speedup_spread'] / 2:.0%}) beside a FLOP ratio of "
                f"{r['flops_ratio']:.2f}x; {r['student_s'] * 1e3:.1f} ms vs {r['teacher_s'] * 1e3:.1f} ms, "
                f"{human(r['student_params'])} params")  # fmt: skip
        keys = ("speedup", "flops_ratio", "teacher_s", "student_s", "student_params", "estimated_speedup")
        return text, {k: r[k] for k in keys}

    checks = [("teacher", profile)]
    return checks + [(name, lambda name=name: speedup(name)) for name in sdxl_presets(sizes.base)]


# --------------------------------------------------------------------------- memory


def recipes(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The three recipes the memory rows run: name -> ``DistillConfig`` fields."""
    lean = {"teacher_dtype": "bf16", "mixed_precision": "bf16", "gradient_checkpointing": True}
    named = ("lean, 8-bit AdamW", lean | {"optimizer": "adamw8bit"}) if sizes.eight_bit else ("lean", lean)
    return {"plain": {}, named[0]: named[1], f"LoRA rank {sizes.lora_rank}": {"lora_rank": sizes.lora_rank}}


def recipe_config(sizes: Sizes, fields: dict[str, Any]) -> DistillConfig:
    return DistillConfig(stages=(load_preset(MEMORY_PRESET).to_dict(),), steps=sizes.steps, base=sizes.base,
                         batch_size=1, resolution=sizes.resolution, device=sizes.device, **fields)  # fmt: skip


class PeakMeter:
    """Peak memory from ``reset`` to ``peak``, above what was held at creation. CUDA: the
    caching allocator's ``max_memory_allocated`` (tensors only). CPU: the resident
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), as
    ``benchmarks/memory.py`` measures it."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._trim()
        self.baseline = torch.cuda.memory_allocated() if self.cuda else _proc_status("VmRSS")

    def _trim(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def reset(self) -> None:
        self._trim()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status("VmHWM") - self.baseline


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def synthetic_batches(config: DistillConfig, base, device) -> data.Batches:
    """The recipe's own batches (``data.Batches``) over a cache of random latents and text
    embeddings of the base's shapes (what ``data.training_data`` would have cached)."""
    shapes = memory._shapes(base, config.resolution)
    n, c, s, r = 4, shapes.latent_channels, shapes.latent_size, config.resolution
    gen = torch.Generator().manual_seed(0)
    pooled = None if shapes.pooled_dim is None else torch.randn(n, shapes.pooled_dim, generator=gen)
    cache = data.LatentCache(
        torch.randn(n, c, s, s, generator=gen), torch.full((n, c, s, s), 0.1),
        torch.randn(n, shapes.text_len, shapes.text_dim, generator=gen), pooled,
        None if pooled is None else torch.tensor([[r, r, 0, 0, r, r]] * n).float(),
        torch.zeros(shapes.text_len, shapes.text_dim), None if pooled is None else torch.zeros(shapes.pooled_dim),
        [f"example {i}" for i in range(n)],
    )  # fmt: skip
    noise = data.Batches.schedule_of(SDXL_SCHEDULE)
    return data.Batches(cache, noise, config.batch_size, config.grad_accum, config.seed, config.uncond_prob,
                        1, 0, device)  # fmt: skip


def real_stage(config: DistillConfig, base, specs) -> stage_mod.Stage:
    """Stage 1 of a kd run, built as ``Distillation.stage`` builds it, on random weights."""
    acc = make_accelerator(config)
    original = latency.random_unet(base.unet_config, str(acc.device), torch.float32)
    student, teacher, pairs = stage_models(
        original, specs, 0, None, config.stage_teacher, config.feature_mode
    )
    teacher = as_teacher(teacher, acc.device, stage_mod.TEACHER_DTYPES[config.teacher_dtype])
    del original  # a cast teacher is a copy: the recipe parks the original on the CPU
    student = student.float().to(acc.device)
    setup = losses.KDSetup(
        config.weights, pairs if config.w_feat > 0 else [], config.normalize_features, None
    )
    if config.lora_rank:
        lora_kd.add_adapters(student, lora_kd.init_spec(specs, 0), config.lora_rank)
    params = optim.trainable_parameters(student, [])
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = optim.make_optimizer(params, config)
    schedule = optim.make_schedule(optimizer, config)
    wrapped, optimizer = acc.prepare(student, optimizer)
    return stage_mod.Stage(
        0, "kd", wrapped, acc.unwrap_model(wrapped), teacher, setup, optimizer, schedule, acc, 0
    )


def measured_peak(config: DistillConfig) -> tuple[int, list[dict[str, float]]]:
    """(peak bytes over steps 2.., the loss terms of every step) of real training steps."""
    base = resolve_base(config.base)
    specs = check_plans(config, base.unet_config)
    meter = PeakMeter(config.device)
    stage = real_stage(config, base, specs)
    batches = synthetic_batches(config, base, stage.accelerator.device)
    terms = [stage_mod.train_step(stage, batches, 0, config)]  # creates the optimizer states
    meter.reset()
    terms += [stage_mod.train_step(stage, batches, g, config) for g in range(1, config.steps)]
    return meter.peak(), terms


def check_finite(terms: list[dict[str, float]], what: str) -> None:
    bad = [(i, k, v) for i, row in enumerate(terms) for k, v in row.items() if not math.isfinite(v)]
    if bad:
        i, k, v = bad[0]
        raise WorkbenchError(f"{what}: {k} is {v} at step {i + 1} ({len(bad)} non-finite terms in all)")


def memory_checks(sizes: Sizes, held: Held) -> list[tuple[str, Callable]]:
    target = "cuda" if sizes.device.startswith("cuda") else "cpu"

    def check(fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        config = recipe_config(sizes, fields)
        optim.check_optimizer_device(config.optimizer, config.device)  # 8-bit AdamW: fail before the estimate
        result = memory.estimate(config, device=target)
        estimated = result.total - result.categories["encoders"]  # no encoders in the measured process
        measured, terms = measured_peak(config)
        check_finite(terms, "training step")
        error = estimated / measured - 1
        text = (f"estimate {size(estimated)} ({result.peak.phase}) vs measured {size(measured)}: {error:+.1%}; "
                f"loss {terms[-1]['loss/total']:.4g}")  # fmt: skip
        return text, {"estimated": estimated, "measured": measured, "error": error, "phase": result.peak.phase,
                      "needed_gib": result.needed() / GIB, "losses": [t["loss/total"] for t in terms]}  # fmt: skip

    return [(name, lambda f=fields: check(f)) for name, fields in recipes(sizes).items()]


# --------------------------------------------------------------------------- few-step


def denoise(unet, scheduler, steps: int, guidance: float | None, inputs: dict[str, Any]) -> torch.Tensor:
    """One image's denoising loop: ``steps`` scheduler steps, each one UNet call (two halves
    of one doubled batch under classifier-free guidance when ``guidance`` is given)."""
    scheduler.set_timesteps(steps, device=inputs["sample"].device)
    x = inputs["sample"][:1] * scheduler.init_noise_sigma  # (1, C, h, w)
    cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if guidance else x, t)
        out = unet(model_in, t, **cond, return_dict=False)[0]
        if guidance:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def seconds_per_image(run: Callable[[], Any], device: str, repeats: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            started = time.perf_counter()
            run()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def few_step_checks(sizes: Sizes, held: Held) -> list[tuple[str, Callable]]:
    from diffusers import EulerDiscreteScheduler

    def check() -> tuple[str, dict[str, Any]]:
        setup = latency.latency_setup(sizes.base, sizes.device, sizes.latency_dtype, sizes.resolution)
        teacher = latency.load_teacher(setup)
        student = with_guidance_embedding(build_student(teacher, load_preset(MEMORY_PRESET))[0]).eval()
        guided = dummy_inputs(setup.base.unet_config, setup.latent, 2, setup.device, setup.torch_dtype)
        single = {
            k: v[:1] if torch.is_tensor(v) else {n: t[:1] for n, t in v.items()} for k, v in guided.items()
        }
        single["timestep_cond"] = torch.zeros(
            1, GUIDANCE_EMBED_DIM, device=setup.device, dtype=setup.torch_dtype
        )
        euler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULE)
        lcm = make_scheduler("lcm", euler)
        t = seconds_per_image(lambda: denoise(teacher, euler, sizes.teacher_steps, GUIDANCE, guided), setup.device,
                              sizes.repeats, sizes.warmup)  # fmt: skip
        s = seconds_per_image(lambda: denoise(student, lcm, FEW_STEPS, None, single), setup.device,
                              sizes.repeats, sizes.warmup)  # fmt: skip
        text = (f"teacher {sizes.teacher_steps} steps x 2 calls {t:.2f} s vs {MEMORY_PRESET} LCD {FEW_STEPS} LCM steps "
                f"x 1 call {s:.3f} s per image: {t / s:.1f}x (UNet + scheduler, {setup.dtype} "
                f"{setup.resolution} px)")  # fmt: skip
        return text, {"teacher_s": t, "student_s": s, "speedup": t / s}

    return [(f"{MEMORY_PRESET} LCD {FEW_STEPS} steps vs teacher {sizes.teacher_steps}", check)]


# --------------------------------------------------------------------------- toy


def toy_checks(sizes: Sizes, held: Held) -> list[tuple[str, Callable]]:
    def check(precision: str) -> tuple[str, dict[str, Any]]:
        config = DistillConfig(stages=(load_preset("ssd-1b").to_dict(),), steps=sizes.toy_steps, base="toy",
                               toy_samples=4, batch_size=2, mixed_precision=precision, device=sizes.device,
                               sample_steps=2, sample_prompts=("a red circle",), checkpoint_every=sizes.toy_steps)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="gpu-check-toy-") as tmp:
            status = distill.run_distillation(config, Path(tmp) / "run")
            rows, _ = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
        if status["state"] != "done":
            raise WorkbenchError(f"the run ended {status['state']}: {status.get('error')}")
        terms = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in rows]
        check_finite(terms, f"toy run, mixed precision {precision}")
        if len(terms) != sizes.toy_steps:
            raise WorkbenchError(f"{len(terms)} metrics rows for {sizes.toy_steps} steps")
        losses_ = [t["loss/total"] for t in terms]
        steps = f"{len(terms)} step{'s' if len(terms) > 1 else ''}"
        text = f"{steps}, loss/total {losses_[0]:.4f} -> {losses_[-1]:.4f}, every term finite"
        return text, {"losses": losses_}

    return [(f"mixed precision {p}", lambda p=p: check(p)) for p in sizes.toy_precisions]


CHECKS = {"latency": latency_checks, "memory": memory_checks, "few-step": few_step_checks, "toy": toy_checks}


# --------------------------------------------------------------------------- main


def run_checks(sizes: Sizes, groups: tuple[str, ...] = GROUPS,
               checks: dict[str, Callable] | None = None) -> list[Row]:  # fmt: skip
    """Every row of ``groups``, in order; a group that cannot even list its rows is one FAILED row."""
    checks = checks or CHECKS
    rows = []
    for group in groups:
        held = Held()
        try:
            listed = checks[group](sizes, held)
        except Exception as err:
            rows.append(Row(group, "(setup)", "FAILED", one_line(err), 0.0))
            continue
        rows += [run_row(group, name, fn, sizes.device) for name, fn in listed]
        held.clear()
        latency.free_memory(sizes.device)
    AcceleratorState._reset_state()  # as it was found: a caller's later Accelerator may choose again
    return rows


def machine(sizes: Sizes) -> str:
    if sizes.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({torch.get_num_threads()} threads)"
    return f"{where}; torch {torch.__version__}"


@contextlib.contextmanager
def chosen_sizes(dry_run: bool) -> Iterator[Sizes]:
    if not dry_run:
        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_check: no CUDA GPU here; run it on a GPU, or --dry-run for the CPU rehearsal"
            )
        yield gpu_sizes()
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        yield dry_sizes(Path(tmp) / "tiny-unet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    p.add_argument("--json-out", type=Path, help="also write every row as JSON")
    args = p.parse_args(argv)
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    if unknown := [g for g in groups if g not in GROUPS]:
        p.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    with chosen_sizes(args.dry_run) as sizes:
        rows = run_checks(sizes, groups)
        where = machine(sizes)
    print(
        f"# gpu_check{' --dry-run' if args.dry_run else ''}: {where}; {time.perf_counter() - started:.0f} s"
    )
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return 0 if all(r.status == "OK" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
