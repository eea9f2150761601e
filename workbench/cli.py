"""Command-line entry point: one sub-command per module in ``workbench.commands``.

Each command module exposes ``register(subparsers)`` (adds its parser and sets
``func``) and a ``run(args) -> int``. User errors (``WorkbenchError``) print one line
on stderr and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workbench.errors import WorkbenchError

# Order is the order shown in --help.
COMMANDS = [
    "units",
    "plan",
    "export",
    "lora",
    "sample",
    "evaluate",
    "distill",
    "memory",
    "latency",
    "sensitivity",
    "autoprune",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workbench",
        description="Compress SDXL-family UNets by block removal and distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"workbench.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
