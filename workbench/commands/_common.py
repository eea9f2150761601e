"""Arguments and output helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.distill_config import DistillConfig, options, stage_fields, stage_list
from workbench.errors import WorkbenchError
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


# --------------------------------------------------------------------------- DistillConfig options


def add_config_options(parser: argparse.ArgumentParser, memory_only: bool = False) -> None:
    """A flag per ``DistillConfig`` option, generated from its declaration
    (``workbench.distill_config.Option``); ``memory_only``: those the estimate depends on.
    Every flag defaults to None, so a flag not given leaves its field out (and the help says
    the run's default)."""
    defaults = DistillConfig.defaults()
    for name, opt in options().items():
        if name == "steps" or (memory_only and not opt.memory):
            continue
        kind = DistillConfig.__dataclass_fields__[name].type
        text = opt.help + (f" ({', '.join(opt.choices)})" if opt.choices else "")
        if kind == "bool":
            parser.add_argument(flag_of(name), action="store_true", default=None, help=text)
            continue
        if defaults.get(name) is not None and "default" not in text:
            text += f" (default: {defaults[name]})"
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        parser.add_argument(flag_of(name), type=convert, help=text)  # choices: checked by the preflight


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``DistillConfig`` fields the flags set (flags not given are left out)."""
    return {name: getattr(args, name) for name in options() if getattr(args, name, None) is not None}


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """``--preset`` / ``--stages`` / ``--objective``: the plans a run trains."""
    parser.add_argument("--preset", help="the plan: a preset name or plan file (one stage)")
    parser.add_argument(
        "--stages",
        help="progressive run: comma-separated presets/plan files, each removing more; 'lcd' as the last "
        "adds a latent consistency distillation stage on the previous plan (e.g. segmind-vega,lcd)",
    )
    parser.add_argument(
        "--objective",
        help="with --preset: what the one stage optimises: kd (block-removal KD, default) or lcd (latent "
        "consistency distillation straight from the teacher)",
    )


def stage_options(args: argparse.Namespace, required: bool) -> dict[str, Any]:
    """``stages`` (and ``objectives``) from ``--preset`` / ``--stages`` / ``--objective``."""
    if args.preset and args.stages:
        raise WorkbenchError("give one of --preset (one stage) or --stages (comma-separated presets), not both")
    if args.objective and not args.preset:
        raise WorkbenchError("--objective goes with --preset; with --stages, end the list with lcd")
    if not (args.preset or args.stages):
        if required:
            raise WorkbenchError("give one of --preset (one stage) or --stages (comma-separated presets)")
        return {}
    names = [args.preset] if args.preset else stage_list(args.stages)
    return stage_fields(names, args.objective if args.preset else None)
