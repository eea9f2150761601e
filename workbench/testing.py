"""Tiny real UNet configs for tests and quick experiments (not mocks: stock diffusers models).

``tiny_sdxl_config`` has SDXL's exact topology (stages, layers, transformer depths 2 and
10, cross-attention mid block of depth 10, ``text_time`` conditioning) at tiny widths, so
every SDXL preset applies to it unchanged. ``tiny_sd15_config`` has SD 1.x's topology
(4 stages, cross-attention in the first three, no added conditioning), so the BK-SDM
presets apply to it; ``tiny_sd_pipeline`` wraps it (or SD 2.1's variant) in a complete
SD 1.x / 2.x pipeline with one text encoder.

``run_config`` builds the small, fast ``DistillConfig`` the tests run (``FAST_RUN``; the CLI's
same settings: ``FAST_ARGV``; an lcd stage: ``LCD_RUN``); ``FAST_CALIBRATION`` is the sensitivity tests' quick calibration.

``running_app`` starts the real app (``python app.py``) on a free port for the browser tests
and the cold-start benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import losses
from workbench.distill import run_distillation
from workbench.distill_config import DistillConfig
from workbench.errors import WorkbenchError
from workbench.models import CONFIG_DIR, TOY_DIR
from workbench.presets import load_preset
from workbench.runs import RunDir, read_metrics
from workbench.sensitivity import Calibration
from workbench.surgery import with_guidance_embedding

# workbench.toy.build and .tokenizer are imported by the functions that build a pipeline, not here:
# they load transformers (seconds), which every test imports this module for and few need.

ROOT = Path(__file__).resolve().parent.parent  # the checkout that holds app.py

# A run small enough for a test on a CPU: 16 toy images, batches of 2, 2-step sample grids, a
# checkpoint every 2 steps.
FAST_RUN: Mapping[str, Any] = {"toy_samples": 16, "batch_size": 2, "sample_steps": 2, "checkpoint_every": 2}
LCD_RUN: Mapping[str, Any] = {"objectives": ("lcd",), "lcd_sample_steps": 1}  # one lcd stage, 1-step grids
FAST_ARGV = [arg for name, value in FAST_RUN.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
# A sensitivity map in seconds; its settings as a config's sensitivity_settings holds them.
FAST_CALIBRATION_SETTINGS: Mapping[str, int] = {"prompts": 2, "steps": 4, "timesteps": 2}
FAST_CALIBRATION = Calibration(**FAST_CALIBRATION_SETTINGS)


_TINY = {
    "block_out_channels": [8, 16, 16],
    "norm_num_groups": 4,
    "sample_size": 8,
}


def tiny_sdxl_config() -> dict[str, Any]:
    config = json.loads((CONFIG_DIR / "sdxl-base-unet.json").read_text())
    return (
        config
        | _TINY
        | {
            "attention_head_dim": [1, 2, 2],  # heads per stage (diffusers' SDXL naming)
            "cross_attention_dim": 16,
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + 8,  # time ids + pooled text (8)
        }
    )


def tiny_sd15_config() -> dict[str, Any]:
    config = json.loads((CONFIG_DIR / "sd15-unet.json").read_text())
    return (
        config
        | _TINY
        | {
            "block_out_channels": [8, 16, 16, 16],
            "attention_head_dim": 2,
            "cross_attention_dim": 16,
        }
    )


def tiny_unet(config: dict[str, Any], seed: int = 0):
    """A randomly initialised (seeded) UNet with non-trivial weights everywhere."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config).eval()
    # diffusers zero-initialises some output projections; perturb everything so that a
    # wrong weight mapping changes the output.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def tiny_pipeline(folder, perturb: bool = False):
    """Save a complete, untrained SDXL pipeline with a tiny SDXL-topology UNet to ``folder``.

    Real stock components (our toy tokenizer, tiny CLIP encoders, a small VAE), so runs,
    exports and pipelines behave exactly as they would with a trained model, only faster.
    ``perturb`` adds seeded noise to every UNet weight (as ``tiny_unet`` does), so that
    every block changes the output.
    """
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import UNet2DConditionModel

    from workbench.toy import build, tokenizer  # transformers: see the note on the imports

    torch.manual_seed(0)
    tok = tokenizer.save(Path(tempfile.mkdtemp(prefix="tok-")))
    encoders = build.text_encoders(tok)
    config = tiny_sdxl_config() | {
        "cross_attention_dim": build.TEXT_HIDDEN_1 + build.TEXT_HIDDEN_2,
        "addition_time_embed_dim": build.ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * build.ADDITION_TIME_EMBED_DIM + build.TEXT_PROJECTION,
        "sample_size": build.LATENT_SIZE,
    }
    unet = UNet2DConditionModel.from_config(config)
    if perturb:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe = build.assemble(build.vae(), encoders, tok, unet)
    pipe.save_pretrained(folder)
    return Path(folder)


# What tells SD 2.1 from SD 1.5 at tiny widths: linear projections, per-stage head counts,
# attention upcast, and v-prediction with DDIM as stabilityai/stable-diffusion-2-1 ships it.
SD_VERSIONS = {
    "1.5": {"unet": {"attention_head_dim": 2}, "prediction_type": "epsilon"},
    "2.1": {
        "unet": {"attention_head_dim": [1, 2, 2, 2], "use_linear_projection": True, "upcast_attention": True},
        "prediction_type": "v_prediction",
    },
}


def tiny_sd_pipeline(folder, version: str = "1.5", perturb: bool = False):
    """Save a complete, untrained SD 1.5 or SD 2.1 pipeline of tiny widths to ``folder``.

    SD's topology (``tiny_sd15_config``), one CLIP text encoder, no added conditioning;
    our toy tokenizer and VAE (64 px images, 16x16 latents), DDIM with SD 1.5's epsilon
    or SD 2.1's v-prediction. ``perturb`` as for ``tiny_pipeline``.
    """
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from workbench.toy import build, tokenizer  # transformers: see the note on the imports

    if version not in SD_VERSIONS:
        raise ValueError(f"version must be one of {', '.join(SD_VERSIONS)}, got {version!r}")
    torch.manual_seed(0)
    tok = tokenizer.save(Path(tempfile.mkdtemp(prefix="tok-")))
    encoder = build.text_encoders(tok)[0]
    config = tiny_sd15_config() | SD_VERSIONS[version]["unet"] | {
        "cross_attention_dim": build.TEXT_HIDDEN_1,
        "sample_size": build.LATENT_SIZE,
    }  # fmt: skip
    unet = UNet2DConditionModel.from_config(config)
    if perturb:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=SD_VERSIONS[version]["prediction_type"],
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=build.vae(), text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return Path(folder)


LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj")


def teacher_lora(
    pipeline_dir,
    out,
    rank: int = 4,
    alpha: float = 8.0,
    text_encoder: bool = True,
    seed: int = 0,
    unet_targets: tuple[str, ...] = LORA_UNET_TARGETS,
    text_targets: tuple[str, ...] = ("q_proj", "v_proj"),
):
    """A LoRA made with peft on a pipeline's UNet (and first text encoder), saved the way
    diffusers saves one (``pytorch_lora_weights.safetensors`` with adapter metadata).

    Both A and B are random (peft's ``init_lora_weights=False``), so every pair changes its
    module's output: a LoRA fresh from training would have B = 0 and change nothing.
    Returns the file's path.
    """
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets), init_lora_weights=False)
    pipe.unet.add_adapter(config)
    kwargs = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "unet_lora_adapter_metadata": _metadata(pipe.unet.peft_config["default"]),
    }
    if text_encoder:
        te_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(text_targets), init_lora_weights=False
        )
        pipe.text_encoder.add_adapter(te_config)
        kwargs |= {
            "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder),
            "text_encoder_lora_adapter_metadata": _metadata(pipe.text_encoder.peft_config["default"]),
        }
    type(pipe).save_lora_weights(str(out), **kwargs)
    return Path(out) / "pytorch_lora_weights.safetensors"


def _metadata(config) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RunningApp:
    url: str
    started: float  # time.monotonic() just before the process started
    log: Path | None


@contextmanager
def running_app(
    *app_args: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout_s: float = 180.0,
    poll_s: float = 0.5,
) -> Iterator[RunningApp]:
    """Run ``python app.py --port <free port> *app_args`` from the checkout for the ``with``
    block, yielding once the page answers 200. The app runs offline without analytics; ``env``
    adds or overrides variables. Its output goes to ``log`` (else nowhere) and is quoted when
    it exits or does not answer within ``timeout_s``. Terminated (killed after 20 s) at the end."""
    import os
    import subprocess
    import sys
    import time

    if not (ROOT / "app.py").exists():
        raise WorkbenchError(f"running_app needs a checkout with app.py; {ROOT} has none")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    variables = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"} | dict(env or {})
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # closed once the app has it
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *app_args],
            cwd=ROOT, env=variables, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        if log is not None:
            out.close()
    try:
        _wait_until_up(url, proc, log, timeout_s, poll_s)
        yield RunningApp(url, started, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(url: str, proc, log: Path | None, timeout_s: float, poll_s: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkbenchError(f"the app exited with {proc.returncode}{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(poll_s)
    raise WorkbenchError(f"the app did not answer {url} within {timeout_s:.0f} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    return f"; its output ends:\n{log.read_text()[-3000:]}" if log is not None else ""


def random_text_inputs(gen, batch: int = 2, tokens: int = 16, pooled: int = 8) -> dict[str, Any]:
    """Random UNet text inputs of the tiny SDXL pipeline's widths (4 tokens; time ids 6)."""
    import torch

    return {
        "encoder_hidden_states": torch.randn(batch, 4, tokens, generator=gen),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=gen),
                              "time_ids": torch.randn(batch, 6, generator=gen)},
    }  # fmt: skip


def lcd_parts(teacher, timesteps: tuple[int, int] = (100, 900)) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(teacher, w-conditioned student, LCD setup, consistency batch) on a tiny SDXL UNet and the
    toy's noise schedule (v-prediction, zero terminal SNR), seeded: what the LCD tests train."""
    import copy

    import torch
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_pretrained(TOY_DIR, subfolder="scheduler")
    teacher = copy.deepcopy(teacher).requires_grad_(False)
    student = with_guidance_embedding(copy.deepcopy(teacher))
    target = copy.deepcopy(student).requires_grad_(False)
    setup = losses.LCDSetup(schedule.alphas_cumprod.float(), "v_prediction", (1.5, 3.0), target, 0.95)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "inputs": {"timestep": torch.tensor(timesteps)},
        "consistency": {"latents": torch.randn(2, 4, 8, 8, generator=gen), "noise": torch.randn(2, 4, 8, 8, generator=gen),
                        "u": torch.tensor([0.2, 0.9]), "cond": random_text_inputs(gen),
                        "uncond": random_text_inputs(gen)},
    }  # fmt: skip
    return teacher, student, setup, batch


def run_config(
    base: str = "toy",
    *,
    steps: int = 4,
    presets: Sequence[str] = ("ssd-1b",),
    fast: bool = True,
    **fields: Any,
) -> DistillConfig:
    """A test's ``DistillConfig``: one stage per preset in ``presets``, ``steps`` steps on the
    CPU, the ``FAST_RUN`` settings unless ``fast`` is false, then ``fields`` over all of these."""
    stages = tuple(load_preset(name).to_dict() for name in presets)
    settings = {"stages": stages, "steps": steps, "base": base, "device": "cpu", **(FAST_RUN if fast else {})}
    return DistillConfig(**(settings | fields))


def straight_and_resumed(config, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The metrics rows of ``config`` run straight through (``folder/straight``) and of the same
    run stopped after its first step and resumed (``folder/split``): what resume tests compare."""

    run_distillation(config, folder / "straight")
    RunDir(folder / "split").request_stop()  # honoured after the first step
    if run_distillation(config, folder / "split")["state"] != "stopped":
        raise AssertionError("the split run did not stop after its first step")
    if run_distillation(None, folder / "split", resume=True)["state"] != "done":
        raise AssertionError("the resumed run did not finish")
    return read_metrics(folder / "straight" / "metrics.jsonl")[0], read_metrics(
        folder / "split" / "metrics.jsonl"
    )[0]
