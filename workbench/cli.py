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
    "results",
    "distill",
    "memory",
    "latency",
    "sensitivity",
    "autoprune",
]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none worth saying (None, off)
    or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
            or isinstance(action.default, bool)  # a switch: its help says what it turns on or off
        ):
            return text
        return text + " (default: %(default)s)"


# The largest whole number an option takes (distill_config's MAX_WHOLE too): beyond it torch
# overflows ("Overflow when unpacking long long") wherever the number becomes a size or a seed.
MAX_WHOLE = 2**31 - 1


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows defaults, whose whole-number options (``type=int``)
    stay within ``MAX_WHOLE``, and whose errors are one line, as the commands' own are (every
    sub-command's parser is one)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def _get_value(self, action: argparse.Action, arg_string: str):
        value = super()._get_value(action, arg_string)
        if action.type is int and abs(value) > MAX_WHOLE:
            raise argparse.ArgumentError(action, f"{arg_string} is out of range: give -{MAX_WHOLE} to {MAX_WHOLE}")
        return value

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m workbench",
        description="Compress SDXL-family UNets by block removal and distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
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
