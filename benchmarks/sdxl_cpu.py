"""The loop a user runs on SDXL, at SDXL's real size, on the CPU: random weights built from
the real configs, every command run as a user runs it, peak memory per phase beside the
estimate.

    python benchmarks/sdxl_cpu.py --work /work/bench/sdxl          # ~30-60 min on 2 cores, ~20 GB RAM
    python benchmarks/sdxl_cpu.py --work DIR --only build,distill  # some phases

Phases (each a command in its own process; ``build`` keeps its pipeline for later runs):

- ``build``: a random-weight SDXL pipeline from the real configs (the UNet of
  ``workbench/configs/sdxl-base-unet.json``, CLIP ViT-L and OpenCLIP bigG text encoders,
  the SDXL VAE, SDXL's Euler scheduler; the toy's tokenizer, as no tokenizer ships here),
  saved in fp32 as a diffusers folder; its parameter counts are checked against the public
  ones.
- ``plan``, ``memory``: ``python -m workbench plan`` / ``memory --target cpu`` with the run's
  options (the estimate the run is compared with).
- ``distill``: ``python -m workbench distill`` of the Vega preset with prompt data (the
  teacher draws the training images), at ``--resolution`` with the lean options, killed with
  SIGKILL right after its second checkpoint, then ``--resume``d to the end (sample grid and
  export included).
- ``export``: every format of ``export``; the single file is loaded back through diffusers'
  ``from_single_file`` and compared with the student tensor by tensor.
- ``lora``: a LoRA made with peft on the teacher (rank 4), remapped onto the student with
  ``lora --student`` (the teacher read from the export's record).
- ``latency``: ``python -m workbench latency`` of the Vega student against the teacher.

How memory is measured: each command runs in a child process whose resident set (VmRSS) is
read from ``/proc`` every 0.1 s, and its high-water mark (VmHWM) at the last read; its
output lines are timestamped as they arrive, and a phase of the run is the time between
the log lines that start and end it (``MARKERS``). The runtime's own memory (Python, torch,
diffusers, transformers imported; measured once in a child that imports what the recipe
imports) is subtracted before the estimate is compared: the estimate counts tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from workbench.models import CONFIG_DIR
from workbench.toy import tokenizer as toy_tokenizer

GIB = 2**30
SETTLE_S = 3.0  # a phase's first seconds still hold what the one before let go (freeing takes a moment)
PHASES = ("build", "plan", "memory", "distill", "export", "lora", "latency")
PROMPTS = [
    "a photo of a red fox in the snow", "a watercolor of a lighthouse at dusk", "a bowl of ramen, studio light",
    "an astronaut riding a horse", "a cyberpunk street at night, rain", "a portrait of an old fisherman",
    "a vase of sunflowers on a table", "a castle on a cliff above the sea",
]  # fmt: skip
# Public parameter counts of SDXL's parts (reference/README.md)
COUNTS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
# What a distill log line says has started: (pattern, phase)
MARKERS = (
    (r"encoding training data|the teacher draws", "load the pipeline, draw and encode the data"),
    (r"training data: \d+ cached", "draw the grids' teacher row"),
    (r"the text encoders and VAE leave memory", "assemble stage 1, precompute teacher targets"),
    (r"teacher targets precomputed", "training steps and checkpoints"),
    (r"resumed stage", "training steps and checkpoints"),
    (r"100\.0% loss", "final sample grid, stage save and export"),
    (r"student saved to", "exit"),
)


def lean_flags(args: argparse.Namespace) -> list[str]:
    """The run's options: the lean set for a CPU (no bf16 on a CPU: slow and rarely supported)."""
    flags = ["--base", str(args.work / "pipeline"), "--preset", "segmind-vega", "--resolution", str(args.resolution),
             "--batch-size", "1", "--teacher-targets", "precompute", "--gradient-checkpointing",
             "--optimizer", args.optimizer, "--data", str(args.work / "prompts.txt")]  # fmt: skip
    return flags


# --------------------------------------------------------------------------- measuring a child


def _status(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Child:
    """A command, its output lines (timestamped) and its memory samples."""

    argv: list[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    hwm: int = 0
    rc: int | None = None
    seconds: float = 0.0

    def run(self, kill_when=None, env: dict[str, str] | None = None) -> Child:
        started = time.time()
        proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=os.environ | (env or {}), bufsize=1)  # fmt: skip
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        while proc.poll() is None:
            rss, hwm = _status(proc.pid, "VmRSS"), _status(proc.pid, "VmHWM")
            if rss is not None:
                self.samples.append((time.time(), rss))
                self.hwm = max(self.hwm, hwm or 0)
            if kill_when is not None and kill_when(self):
                proc.send_signal(signal.SIGKILL)
                kill_when = None
            time.sleep(0.1)
        reader.join(timeout=10)
        self.rc, self.seconds = proc.returncode, time.time() - started
        return self

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            print("   |", line.rstrip("\n")[:160], flush=True)

    def peak(self) -> int:
        return max([self.hwm, *(rss for _, rss in self.samples)])

    def phases(self) -> list[dict[str, Any]]:
        """Peak RSS between the log lines that start each phase (``MARKERS``)."""
        starts = [(self.samples[0][0] if self.samples else 0.0, "start the process, import")]
        for t, line in self.lines:
            for pattern, name in MARKERS:
                if re.search(pattern, line) and starts[-1][1] != name:
                    starts.append((t, name))
                    break
        out = []
        for i, (t0, name) in enumerate(starts):
            t1 = starts[i + 1][0] if i + 1 < len(starts) else float("inf")
            rss = [r for t, r in self.samples if t0 <= t < t1]
            settled = [r for t, r in self.samples if t0 + SETTLE_S <= t < t1]  # what the phase itself holds
            if rss:
                out.append({"phase": name, "seconds": round(min(t1, self.samples[-1][0]) - t0, 1), "peak": max(rss),
                            "settled_peak": max(settled) if settled else None})  # fmt: skip
        return out

    def timeline(self) -> list[tuple[float, float]]:
        """(seconds from the start, RSS GiB), one sample a second."""
        start, out = self.samples[0][0] if self.samples else 0.0, []
        for t, rss in self.samples:
            if not out or t - start - out[-1][0] >= 1.0:
                out.append((round(t - start, 1), round(rss / GIB, 3)))
        return out

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def workbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench", *args]


def runtime_baseline() -> int:
    """RSS of a process that has imported what the recipe imports, and nothing else."""
    code = ("import torch, diffusers, transformers, accelerate, peft\n"
            "from workbench import distill\nfrom workbench.libraries import import_pipelines\nimport_pipelines()\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


# --------------------------------------------------------------------------- the phases


def build(work: Path) -> dict[str, Any]:
    """A random-weight SDXL pipeline from the real configs, saved in fp32."""
    folder = work / "pipeline"
    if (folder / "model_index.json").exists():
        return {"pipeline": str(folder), "built": False}
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    started = time.time()
    tok_dir = Path(tempfile.mkdtemp(prefix="sdxl-tok-"))
    toy_tokenizer.save(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    clip = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2}
    one = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))  # fmt: skip
    two = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=1280, intermediate_size=5120,
                                                     num_hidden_layers=32, num_attention_heads=20,
                                                     hidden_act="gelu", projection_dim=1280))  # fmt: skip
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # fmt: skip
    config = json.loads((CONFIG_DIR / "sdxl-base-unet.json").read_text(encoding="utf-8"))
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    parts = {"unet": unet, "text_encoder": one, "text_encoder_2": two, "vae": vae}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    if counts != COUNTS:
        raise SystemExit(f"parameter counts {counts} differ from SDXL's {COUNTS}")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=one, text_encoder_2=two, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler, add_watermarker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    return {"pipeline": str(folder), "built": True, "counts": counts, "seconds": round(time.time() - started, 1)}


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    run = args.work / "run"
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    base = lean_flags(args) + ["--steps", str(args.steps), "--checkpoint-every", "1", "--log-every", "1",
                               "--teacher-image-steps", str(args.teacher_steps), "--sample-steps", str(args.teacher_steps),
                               "--device", "cpu", "--run-dir", str(run)]  # fmt: skip

    def second_checkpoint(child: Child) -> bool:
        status = run / "status.json"
        try:
            return json.loads(status.read_text()).get("checkpoint") == "step_0000002"
        except (OSError, ValueError):
            return False

    first = Child(workbench("distill", *base)).run(kill_when=second_checkpoint)
    resumed = Child(workbench("distill", "--resume", "--run-dir", str(run), "--device", "cpu")).run()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "killed": {"rc": first.rc, "seconds": round(first.seconds, 1), "peak": first.peak(), "phases": first.phases(),
                   "timeline": first.timeline()},
        "resumed": {"rc": resumed.rc, "seconds": round(resumed.seconds, 1), "peak": resumed.peak(),
                    "phases": resumed.phases(), "timeline": resumed.timeline()},
        "steps_logged": [m["step"] for m in metrics],
        "status": json.loads((run / "status.json").read_text()).get("state"),
        "tail": resumed.text().splitlines()[-6:],
    }  # fmt: skip


def run_exports(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for fmt in ("diffusers", "pipeline", "single-file", "checkpoint"):
        folder = args.work / f"export-{fmt}"
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        child = Child(workbench("export", "--student", str(args.work / "run"), "--format", fmt,
                                "--out", str(folder), "--json")).run()  # fmt: skip
        out[fmt] = {"rc": child.rc, "seconds": round(child.seconds, 1), "peak": child.peak()}
    out["single-file reload"] = single_file_check(args.work)
    return out


def single_file_check(work: Path) -> dict[str, Any]:
    code = f"""
import json, torch
from pathlib import Path
from diffusers import UNet2DConditionModel
folder = Path({str(work / "export-single-file")!r})
from safetensors import safe_open
files = sorted(folder.glob("*.safetensors"))
with safe_open(str(files[0]), "pt") as f:
    stored = f.get_tensor(next(iter(f.keys()))).dtype  # the file's dtype (fp16 by default)
loaded = UNet2DConditionModel.from_single_file(str(files[0]), config=str(folder))
mine = UNet2DConditionModel.from_pretrained({str(work / "run" / "student")!r})
a, b = mine.state_dict(), loaded.state_dict()
same = set(a) == set(b) and all(torch.equal(a[k].to(stored).to(b[k].dtype), b[k]) for k in a)
print(json.dumps({{"tensors": len(a), "identical_at_file_dtype": same, "file_dtype": str(stored)}}))
"""
    child = Child([sys.executable, "-c", code]).run()
    found = [json.loads(line) for _, line in child.lines if line.startswith("{")]
    return {"rc": child.rc, "seconds": round(child.seconds, 1), "peak": child.peak(), **(found[-1] if found else {})}


def run_lora(args: argparse.Namespace) -> dict[str, Any]:
    lora_dir = args.work / "teacher-lora"
    code = (f"from workbench.testing import teacher_lora\n"
            f"print(teacher_lora({str(args.work / 'pipeline')!r}, {str(lora_dir)!r}, rank=4, text_encoder=False))")  # fmt: skip
    if not (lora_dir / "pytorch_lora_weights.safetensors").exists():
        made = Child([sys.executable, "-c", code]).run()
        if made.rc:
            return {"rc": made.rc, "error": made.text()[-500:]}
    out = args.work / "student-lora"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # an export records its teacher by name only (no local paths leave the machine): --base names the folder
    child, report = run_json(workbench("lora", "--lora", str(lora_dir / "pytorch_lora_weights.safetensors"),
                                       "--student", str(args.work / "export-diffusers"),
                                       "--base", str(args.work / "pipeline"), "--out", str(out), "--json"))  # fmt: skip
    return {"rc": child.rc, "seconds": round(child.seconds, 1), "peak": child.peak(), "report": report}


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    child, result = run_json(workbench("latency", "--base", str(args.work / "pipeline"), "--preset", "segmind-vega",
                                       "--resolution", str(args.latency_resolution), "--dtype", "fp32",
                                       "--repeats", "3", "--warmup", "1", "--json"))  # fmt: skip
    return {"rc": child.rc, "seconds": round(child.seconds, 1), "peak": child.peak(), "result": result}


def run_json(argv: list[str]) -> tuple[Child, Any]:
    child = Child(argv).run()
    text = child.text()
    start = text.find("{")
    return child, (json.loads(text[start:]) if child.rc == 0 and start >= 0 else text[-800:])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the pipeline, the run and the exports")
    p.add_argument("--only", default=",".join(PHASES), help=f"phases to run, of {', '.join(PHASES)}")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=2, help="the teacher's drawing steps (data and grids)")
    p.add_argument("--optimizer", default="adamw8bit", choices=("adamw", "adamw8bit"))
    p.add_argument("--latency-resolution", type=int, default=256)
    args = p.parse_args(argv)
    if unknown := set(args.only.split(",")) - set(PHASES):
        p.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report_path = args.work / "report.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    only = args.only.split(",")

    def phase(name: str, fn) -> None:
        if name in only:
            print(f"== {name}", flush=True)
            started = time.time()
            report[name] = fn()
            print(f"== {name} done in {time.time() - started:.0f} s", flush=True)
            report_path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    report["machine"] = {"cpus": os.cpu_count(), "baseline_rss": runtime_baseline()}
    phase("build", lambda: build(args.work))
    phase("plan", lambda: run_json(workbench("plan", "--base", str(args.work / "pipeline"), "--preset",
                                             "segmind-vega", "--json"))[1])  # fmt: skip
    phase("memory", lambda: memory_estimate(args))
    phase("distill", lambda: run_distill(args))
    phase("export", lambda: run_exports(args))
    phase("lora", lambda: run_lora(args))
    phase("latency", lambda: run_latency(args))
    print(summary(report))


def memory_estimate(args: argparse.Namespace) -> Any:
    child, result = run_json(workbench("memory", *lean_flags(args), "--target", "cpu", "--json"))
    if isinstance(result, dict):
        result["_seconds"] = round(child.seconds, 1)
    return result


def summary(report: dict[str, Any]) -> str:
    """The table the README shows."""
    base = report["machine"]["baseline_rss"]
    lines = [f"runtime baseline (imports): {base / GIB:.2f} GiB"]
    est = report.get("memory")
    if isinstance(est, dict):
        lines.append(f"estimate (cpu): {est['total_gb']:.2f} GiB at {est.get('peak_where')}")
        for p in est.get("phases", []):
            lines.append(f"  phase: {p['name']}: {p['total_bytes'] / GIB:.2f} GiB")
        lines.append(f"  largest step: {est.get('step_total_gb')} GiB")
    dist = report.get("distill")
    if isinstance(dist, dict):
        for part in ("killed", "resumed"):
            d = dist[part]
            lines.append(f"distill ({part}): rc {d['rc']}, {d['seconds']:.0f} s, peak RSS {d['peak'] / GIB:.2f} GiB "
                         f"({(d['peak'] - base) / GIB:.2f} GiB above the baseline)")  # fmt: skip
            for p in d["phases"]:
                settled = f"{p['settled_peak'] / GIB:6.2f}" if p.get("settled_peak") else "     -"
                lines.append(f"  {p['phase']:<48} {p['seconds']:>7.1f} s  {p['peak'] / GIB:6.2f} GiB"
                             f"  settled {settled} GiB")  # fmt: skip
        if isinstance(est, dict):
            measured = max(dist["killed"]["peak"], dist["resumed"]["peak"]) - base
            lines.append(f"estimate / measured (above baseline): {est['total_bytes'] / measured:.3f}")
    for key in ("export", "lora", "latency"):
        if key in report:
            lines.append(f"{key}: {json.dumps(report[key], default=str)[:600]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
