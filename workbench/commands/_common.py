"""Arguments and output helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.models import DEFAULT_BASE


def add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help="teacher: toy (default), sdxl-base, sd15-base, sd21-base, a local diffusers folder, or a hub id",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human(n: float) -> str:
    """1234567 -> '1.23M' (params or FLOPs)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
