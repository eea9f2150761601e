"""What quantising a pruned student buys and costs: SDXL bytes and memory, toy speed and quality.

(a) SDXL at full size, from configs on the meta device (no weights): for the teacher and the
    SSD-1B, Segmind-Vega and KOALA-700M students, the parameters, the share torchao
    quantises (Linear weights; int4 also skips Linears whose input width is not a multiple of
    its group), the UNet's weight bytes in fp16, int8 and int4, and the peak memory of sampling
    at 1024 px (fp16 compute, one guided step's activations measured on fake tensors, text
    encoders and VAE in fp16) with a verdict per GPU size.
(b) The toy's Vega student (``--student``: a trained run's student/ folder; without it the
    student as built from the teacher, not distilled): CPU latency per UNet forward of fp32,
    int8 weight-only and int8 dynamic, timed side by side in one run (interleaved), and
    quality against the teacher with the toy checker (full-prompt accuracy with a 95% cluster
    bootstrap interval, paired ratio to the fp32 student) plus PSNR of each quantised
    student's images against the fp32 student's. int4 has no CPU kernel in torchao, so its
    row uses int4 *numerics* (torchao ``IntxWeightOnlyConfig``, int4 in groups of 32, held
    unpacked in int8): the quality int4 weights give, not their bytes or speed.

    python benchmarks/quantize.py [--student RUN/student] [--prompts 40] [--seeds 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoring

from workbench import evaluation as ev
from workbench import export, quantize
from workbench.cost import dummy_inputs
from workbench.memory import GIB
from workbench.models import load_unet, resolve_base
from workbench.presets import load_preset
from workbench.surgery import student_spec

SDXL_STUDENTS = ("sdxl-base", "ssd-1b", "segmind-vega", "koala-700m")
CPU_SCHEMES = ("int8", "int8-dynamic")
INT4_NUMERICS_GROUP = 32  # the toy's Linears are 32-256 wide: torchao's 128 would skip most


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=None, help="a trained Vega student folder (default: undistilled)")
    p.add_argument("--prompts", type=int, default=40, help="held-out prompts (81 in all)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model (after one warm-up)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch for the latency (2: one guided step)")
    p.add_argument("--resolution", type=int, default=1024, help="SDXL sampling resolution for the memory")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args()


# ------------------------------------------------------------------ (a) SDXL on the meta device


def sdxl_rows(resolution: int) -> list[dict]:
    base = resolve_base("sdxl-base")
    rows = []
    for preset in SDXL_STUDENTS:
        config = student_spec(base.unet_config, load_preset(preset)).config
        acts = quantize.activation_bytes(config, resolution // base.vae_scale_factor)
        row = {"preset": preset, "share": {}, "bytes": {}, "memory": {}}
        for scheme in (None, "int8", "int4"):
            name = scheme or "fp16"
            share = quantize.param_share(config, scheme or "int8")
            mem = quantize.inference_memory(config, base, scheme, resolution, activations=acts)
            row["params"], row["conv_share"] = share.total, share.conv_share
            row["share"][name] = share.share if scheme else 0.0
            row["bytes"][name] = mem.unet_bytes
            row["memory"][name] = mem.to_dict()
        rows.append(row)
    return rows


def print_sdxl(rows: list[dict], resolution: int) -> None:
    print(f"\n(a) SDXL UNets, full size (meta device); sampling at {resolution} px in fp16\n")
    head = ["UNet", "params", "Linear share (int8)", "int4 share", "Conv2d share", "fp16 GiB", "int8 GiB",
            "int4 GiB", "int8 / fp16", "int4 / fp16"]  # fmt: skip
    table = []
    for r in rows:
        b = r["bytes"]
        table.append((r["preset"], [f"{r['params'] / 1e9:.3f}B", f"{r['share']['int8']:.1%}",
                                    f"{r['share']['int4']:.1%}", f"{r['conv_share']:.1%}",
                                    *(f"{b[k] / GIB:.2f}" for k in ("fp16", "int8", "int4")),
                                    f"{b['int8'] / b['fp16']:.2f}", f"{b['int4'] / b['fp16']:.2f}"]))  # fmt: skip
    print("\n".join(scoring.table(table, head)))
    sizes = list(quantize.INFERENCE_GPU_SIZES_GB)
    print(f"\nsampling peak at {resolution} px (GiB) and verdict per GPU size (fits / tight / no):\n")
    table = []
    for r in rows:
        for k in ("fp16", "int8", "int4"):
            m = r["memory"][k]
            table.append((f"{r['preset']} {k}", [f"{m['total_gb']:.2f}",
                                                 f"{m['activation_bytes'] / GIB:.2f}",
                                                 *(m["verdicts"][str(g)] for g in sizes)]))  # fmt: skip
    print(
        "\n".join(
            scoring.table(table, ["UNet", "peak GiB", "of it activations", *[f"{g} GB" for g in sizes]])
        )
    )
    print(f"\nnotes: {'; '.join(rows[0]['memory']['fp16']['notes'])}")


# ------------------------------------------------------------------ (b) toy Vega student


def toy_student(folder: str | None):
    base = resolve_base("toy")
    if folder:
        return export.student_from_folder(folder, base), "distilled"
    return export.student_from_plan(base, load_preset("segmind-vega"), load_unet(base)), "undistilled"


def int4_numerics(unet):
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    model = copy.deepcopy(unet)
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_NUMERICS_GROUP))
    # as torchao's int4 does, Linears whose input width is not a multiple of the group stay as they are
    quantize_(
        model, config,
        filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % INT4_NUMERICS_GROUP == 0,
    )  # fmt: skip
    return model.eval()


def latency(models: dict, batch: int, repeats: int) -> dict:
    config = dict(models["fp32"].config)
    torch.manual_seed(0)
    inputs = dummy_inputs(config, config["sample_size"], batch)
    times = quantize.side_by_side(models, inputs, repeats)
    return {k: {"median_s": float(np.median(v)), "min_s": min(v), "max_s": max(v)} for k, v in times.items()}


def quality(e: ev.Evaluator, models: dict) -> dict:
    scores, images = {}, {}
    for name, unet in models.items():
        started = time.time()
        images[name] = e.draw(unet)
        values, seen = ev.judge(images[name], e.samples)
        values |= ev.similarity(images[name], e.teacher_images())
        scores[name] = ev.Scores(e.samples, values, seen)
        print(f"  scored {name} in {time.time() - started:.0f} s", flush=True)
    out = {}
    for name, s in scores.items():
        vs_fp32 = ev.similarity(images[name], images["fp32"]) if name != "fp32" else None
        out[name] = {
            "summary": ev.as_dicts(e.summary(s)),
            "vs_teacher": ev.as_dicts(e.versus(s, e.teacher())),
            "vs_fp32": ev.as_dicts(e.versus(s, scores["fp32"])) if name != "fp32" else None,
            "psnr_vs_fp32": float(np.mean(vs_fp32["psnr"][np.isfinite(vs_fp32["psnr"])]))
            if vs_fp32
            else None,
            "identical_to_fp32": int(np.sum(~np.isfinite(vs_fp32["psnr"]))) if vs_fp32 else None,
        }
    return out


def print_toy(report: dict, e: ev.Evaluator) -> None:
    t = report["toy"]
    print(f"\n(b) toy Segmind-Vega student ({t['kind']}), CPU, {torch.get_num_threads()} thread(s)\n")
    lat, ref = t["latency"], t["latency"]["fp32"]["median_s"]
    head = [
        "student",
        "weights MB",
        "quantised share",
        "ms / forward (median)",
        "vs fp32",
        "UNet out rel. L2",
    ]
    rows = []
    for name, row in t["models"].items():
        ms = lat[name]["median_s"] * 1e3 if name in lat else None
        rows.append((name, [f"{row['bytes'] / 1e6:.2f}", f"{row['share']:.1%}",
                            f"{ms:.1f}" if ms else "-", f"{ref * 1e3 / ms:.2f}x" if ms else "-",
                            f"{row['rel_diff']:.4f}" if row["rel_diff"] is not None else "-"]))  # fmt: skip
    print("\n".join(scoring.table(rows, head)))
    print(f"\n{scoring.header(e, 'toy')}\n")
    q, teacher = t["quality"], report["toy"]["teacher"]
    print(f"teacher: full prompt {scoring.cell(teacher.get('full'))}\n")
    head = [
        "student",
        "full prompt",
        "vs fp32 student (paired)",
        "vs teacher",
        "PSNR vs teacher dB",
        "PSNR vs fp32 dB",
    ]
    rows = []
    for name, f in q.items():
        rows.append((name, [scoring.cell(f["summary"].get("full")),
                            scoring.cell(f["vs_fp32"].get("full"), 3) if f["vs_fp32"] else "-",
                            scoring.cell(f["vs_teacher"].get("full"), 3),
                            scoring.cell(f["summary"]["psnr"], 2),
                            f"{f['psnr_vs_fp32']:.2f} ({f['identical_to_fp32']} identical)" if f["vs_fp32"] else "-"]))  # fmt: skip
    print("\n".join(scoring.table(rows, head)))


def toy_part(args: argparse.Namespace) -> tuple[dict, ev.Evaluator]:
    student, kind = toy_student(args.student)
    models = {"fp32": student.unet}
    for scheme in CPU_SCHEMES:
        models[scheme] = quantize.quantize_unet(student.unet, scheme, "fp32", "cpu")
    models["int4-numerics"] = int4_numerics(student.unet)
    torch.manual_seed(0)
    inputs = dummy_inputs(dict(student.unet.config), student.unet.config["sample_size"], args.batch)
    with torch.no_grad():
        ref = student.unet(**inputs, return_dict=False)[0]
        diffs = {
            n: float((m(**inputs, return_dict=False)[0] - ref).norm() / ref.norm()) for n, m in models.items()
        }
    total = sum(p.numel() for p in student.unet.parameters())
    rows = {n: {"bytes": quantize.model_bytes(m), "share": quantize.quantized_count(m) / total,
                "rel_diff": diffs[n] if n != "fp32" else None} for n, m in models.items()}  # fmt: skip
    timed = {n: models[n] for n in ("fp32", *CPU_SCHEMES)}
    lat = latency(timed, args.batch, args.repeats)
    e = scoring.evaluator("toy", args.prompts, args.seeds)
    teacher = ev.as_dicts(e.summary(e.teacher()))
    return {
        "kind": kind,
        "models": rows,
        "latency": lat,
        "teacher": teacher,
        "quality": quality(e, models),
    }, e


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    started = time.time()
    report = {"args": vars(args), "torchao": quantize.library_version(), "torch": torch.__version__}
    report["sdxl"] = sdxl_rows(args.resolution)
    print_sdxl(report["sdxl"], args.resolution)
    report["toy"], e = toy_part(args)
    report["seconds"] = round(time.time() - started, 1)
    print_toy(report, e)
    print(f"\n{report['seconds']:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
