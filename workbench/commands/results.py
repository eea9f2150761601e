"""``results``: every teacher, run and export with every metric and its interval, as a table
(or CSV); with ``--history RUN``, a run's logged losses step by step. See
``workbench/evaluation/table.py``."""

from __future__ import annotations

import argparse
import sys

from workbench.commands._common import add_json
from workbench.evaluation import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="table of the teacher, every run and every export with their scores")
    p.add_argument("--runs", default=None, help="folder of run folders (default: $WORKBENCH_RUNS_DIR or runs/ "
                   "beside the project)")  # fmt: skip
    p.add_argument("--exports", action="append", default=[], help="also list the export folders in this "
                   "folder (repeatable)")  # fmt: skip
    p.add_argument("--csv", default=None, help="write the table to this CSV file ('-': to stdout)")
    p.add_argument("--history", default=None, metavar="RUN", help="instead, RUN's metrics.jsonl as a table")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.history:
        frame = table.history(args.history)
    else:
        frame = table.results(args.runs or table.default_root(), *args.exports)
    if args.csv == "-":
        frame.to_csv(sys.stdout, index=False)
    elif args.csv:
        print(f"written: {table.to_csv(frame, args.csv)} ({len(frame)} rows)")
    elif args.json:
        print(frame.to_json(orient="records", indent=2))
    else:
        print(frame.to_string(index=False) if args.history else table.text(frame))
    return 0
