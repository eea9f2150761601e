"""Measured speedup of every preset over its teacher, beside the FLOP ratio and the estimate.

    python benchmarks/speedup.py                      # sdxl-base, 512 px fp32 on CPU (+ 1024 px bf16 on a GPU)
    python benchmarks/speedup.py --presets ssd-1b segmind-vega --repeats 5

One teacher (random weights for the config-only ``sdxl-base``) is built per device and
reused; each preset's student is built, timed interleaved with it, and freed. Prints a
markdown table per device, and how long the instant estimate takes on the base's catalog.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="sdxl-base")
    p.add_argument("--presets", nargs="*", default=None, help="default: every preset in presets/")
    p.add_argument("--device", default=None, help="default: cpu, and cuda too when available")
    p.add_argument(
        "--dtype", default=None, help="default: each device's fast dtype (workbench.dtypes.fast_dtype)"
    )
    p.add_argument("--resolution", type=int, default=None, help="default: 512 on cpu, 1024 on cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--refresh", action="store_true", help="re-profile the teacher even if cached")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json-out", type=Path, default=None, help="also save every result as JSON")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def devices(arg: str | None) -> list[tuple[str, int]]:
    import torch

    if arg:
        return [(arg, 1024 if arg.startswith("cuda") else 512)]
    out = [("cpu", 512)]
    if torch.cuda.is_available():
        out.append(("cuda", 1024))
    return out


def progress(fraction: float, message: str) -> None:
    print(f"    [{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def run_device(args: argparse.Namespace, device: str, resolution: int, presets: list[str]) -> list[dict]:
    from workbench import latency
    from workbench.dtypes import fast_dtype

    setup = latency.latency_setup(args.base, device, args.dtype, resolution)
    why = "as asked" if args.dtype else fast_dtype(device).reason
    label = latency._device_label(device)
    print(f"\n## {args.base} on {label}, {setup.dtype} ({why}), {resolution} px", flush=True)
    t0 = time.perf_counter()
    teacher = latency.load_teacher(setup)
    print(f"teacher built in {time.perf_counter() - t0:.0f} s ({load()})", file=sys.stderr, flush=True)
    latency.profile_for(setup, refresh=args.refresh, progress=progress, model=teacher)
    results = []
    for name in presets:
        print(f"  {name} ({load()})", file=sys.stderr, flush=True)
        r = latency.measure_speedup(
            args.base,
            name,
            device=device,
            dtype=setup.dtype,
            resolution=resolution,
            repeats=args.repeats,
            warmup=args.warmup,
            progress=progress,
            teacher=teacher,
        )
        results.append(r)
        print(row(r), flush=True)
        latency.free_memory(device)  # the student is gone; give its memory back before the next
    del teacher
    latency.free_memory(device)
    return results


def header() -> str:
    return (
        "| preset | UNet params | FLOP ratio | teacher s | student s | speedup | speedup / FLOP ratio "
        "| estimated speedup | estimate error |\n|---|---|---|---|---|---|---|---|---|"
    )


def row(r: dict[str, Any]) -> str:
    return (
        f"| `{r['plan']}` | {r['student_params'] / 1e9:.3f}B | {r['flops_ratio']:.2f}x "
        f"| {r['teacher_s']:.2f} (±{r['teacher_spread'] / 2:.0%}) "
        f"| {r['student_s']:.2f} (±{r['student_spread'] / 2:.0%}) | {r['speedup']:.2f}x (±{r['speedup_spread'] / 2:.0%}) "
        f"| {r['speedup'] / r['flops_ratio']:.2f} | {r['estimated_speedup']:.2f}x | {r['estimate_error']:+.1%} |"
    )


def estimate_timing(base: str, device: str, dtype: str, resolution: int, presets: list[str]) -> str:
    """Mean and worst time of ``estimate_plan`` (and of ``compile_plan`` before it) per preset."""
    from workbench import latency
    from workbench.catalog import build_catalog
    from workbench.models import resolve_base
    from workbench.presets import load_preset
    from workbench.surgery import compile_plan

    profile = latency.get_profile(base, device=device, dtype=dtype, resolution=resolution)
    catalog = build_catalog(resolve_base(base).unet_config)
    est, comp = [], []
    for name in presets:
        plan = load_preset(name)
        for _ in range(200):
            t = time.perf_counter()
            spec = compile_plan(catalog, plan)
            t1 = time.perf_counter()
            latency.estimate_plan(profile, spec)
            t2 = time.perf_counter()
            comp.append(t1 - t)
            est.append(t2 - t1)
    # The worst call mostly measures the OS taking the CPU away on a busy machine; p99 is
    # what a user toggling units would see.
    return (
        f"estimate_plan on the {base} catalog ({len(profile.atom_s)} atoms), {len(est)} calls: "
        f"median {_pct(est, 50) * 1e6:.1f} us, p99 {_pct(est, 99) * 1e6:.1f} us, worst {max(est) * 1e3:.2f} ms; "
        f"compile_plan before it: median {_pct(comp, 50) * 1e3:.2f} ms, p99 {_pct(comp, 99) * 1e3:.2f} ms"
    )


def breakdown(profile) -> str:
    """Time share against FLOP share per (stage, kind) of atom: where time tracks FLOPs."""
    groups: dict[str, list[float]] = {}
    for atom, t in profile.atom_s.items():
        groups.setdefault(_group(atom), [0.0, 0.0])
        groups[_group(atom)][0] += t
        groups[_group(atom)][1] += profile.atom_flops[atom]
    total_t, total_f = profile.teacher_s, profile.teacher_flops
    lines = ["| atoms | time s | time share | GFLOPs | FLOP share | GFLOP/s |", "|---|---|---|---|---|---|"]
    for name, (t, f) in sorted(groups.items()):
        rate = f / t / 1e9 if t > 0 else float("nan")
        lines.append(
            f"| {name} | {t:.2f} | {t / total_t:.1%} | {f / 1e9:.1f} | {f / total_f:.1%} | {rate:.1f} |"
        )
    return "\n".join(lines)


def _group(atom: str) -> str:
    if atom == "rest":
        return "rest (conv in/out, embeddings, samplers)"
    parts = atom.split(".")
    stage = "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])
    kind = (
        "transformer blocks"
        if "transformer_blocks" in atom
        else "attention shells"
        if "attentions" in atom
        else "ResNets"
    )
    return f"{stage} {kind}"


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if q < 100 else max(values)


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_flush_denormal(True)  # random weights must not hit x86's slow denormal path
    from workbench import latency
    from workbench.presets import list_presets

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets or list_presets()
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(f"# speedup benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: `{command}`")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {load()} at start"
    )
    all_results = []
    for device, default_res in devices(args.device):
        resolution = args.resolution or default_res
        results = run_device(args, device, resolution, presets)
        all_results.extend(results)
        print()
        print(header())
        for r in results:
            print(row(r))
        print(estimate_timing(args.base, device, args.dtype, resolution, presets))
        profile = latency.get_profile(args.base, device=device, dtype=args.dtype, resolution=resolution)
        print(f"\nteacher profile ({profile.created}, load {profile.load_avg}):\n{breakdown(profile)}")
    print(f"\n{load()} at end, {datetime.now(timezone.utc):%H:%M} UTC")
    if args.json_out:
        args.json_out.write_text(json.dumps(all_results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing the package
    sys.exit(main())
