"""What the app is started with: the teacher, where to serve, and the limits of heavy actions.

Host and port follow Gradio's own settings (``GRADIO_SERVER_NAME``, ``GRADIO_SERVER_PORT``)
unless ``--host``/``--port`` are given. Inside a Hugging Face Space (or with
``WORKBENCH_SPACE=1``) limits cap what one visitor can ask of a shared CPU.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from workbench.models import DEFAULT_BASE
from workbench.space import UploadLimits


@dataclass(frozen=True)
class Limits:
    """Upper bounds on user requests; the handlers reject anything beyond them with a message."""

    max_steps: int = 100  # denoising steps per image in Compare
    max_seeds: int = 8  # images per model in one comparison
    max_sample_px: int = 2048  # image side in Compare
    max_flops_px: int = 4096  # resolution for FLOPs/latency (meta device: cheap)
    measure_repeats: int = 5  # timed forwards per model when measuring the real speedup
    max_latency_px: int | None = None  # largest resolution to profile or measure (None: any)
    max_weight_params: int | None = None  # largest UNet whose weights may be loaded (None: any)
    # For the Distill tab: the largest run a visitor may launch (None: no limit).
    max_distill_steps: int | None = None
    max_distill_params: int | None = None
    # Space only: runs training at once across all visitors (the rest wait in one queue), and
    # what visitors leave on disk (runs, uploads) expires after run_ttl_s or past max_disk_bytes.
    max_active_runs: int = 1
    run_ttl_s: float = 24 * 3600
    max_disk_bytes: int = 10 * 2**30
    upload: UploadLimits = field(default_factory=UploadLimits)

    @classmethod
    def for_space(cls) -> Limits:
        """A free CPU Space: 2 vCPUs and 16 GB shared by every visitor."""
        return cls(
            max_steps=25,
            max_seeds=4,
            max_sample_px=512,
            max_flops_px=2048,
            measure_repeats=3,
            max_latency_px=512,
            max_weight_params=1_000_000_000,  # SD 1.5-sized UNets at most; SDXL would not fit
            max_distill_steps=200,
            max_distill_params=50_000_000,
            max_active_runs=1,
        )


@dataclass(frozen=True)
class AppSettings:
    """Everything ``build_app`` needs; plain data."""

    base: str = DEFAULT_BASE
    host: str | None = None  # None: Gradio reads GRADIO_SERVER_NAME (default 127.0.0.1)
    port: int | None = None  # None: Gradio reads GRADIO_SERVER_PORT (default 7860)
    space: bool = False
    limits: Limits = field(default_factory=Limits)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def space_mode(env: dict[str, str]) -> bool:
    """``WORKBENCH_SPACE`` when set; otherwise on inside a Hugging Face Space (detected as Gradio does)."""
    explicit = (env.get("WORKBENCH_SPACE") or "").strip()
    if explicit:
        return _truthy(explicit)
    return env.get("SYSTEM") == "spaces"


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> AppSettings:
    """AppSettings from command-line flags and the environment (flags win)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python app.py", description="Serve the SDXL distillation workbench."
    )
    parser.add_argument(
        "--base",
        default=env.get("WORKBENCH_BASE", DEFAULT_BASE),
        help="teacher loaded at start: toy (default), sdxl-base, sd15-base, sd21-base, a folder or a hub id",
    )
    parser.add_argument(
        "--host", default=None, help="interface to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument(
        "--space",
        action="store_true",
        default=space_mode(env),
        help="apply the limits of a shared CPU Space (default inside a Space; WORKBENCH_SPACE=0/1 overrides)",
    )
    args = parser.parse_args(argv)
    limits = Limits.for_space() if args.space else Limits()
    return AppSettings(base=args.base, host=args.host, port=args.port, space=args.space, limits=limits)
