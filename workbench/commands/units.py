"""``units``: the removable units of a base's UNet."""

from __future__ import annotations

import argparse

from workbench.catalog import build_catalog
from workbench.commands._common import add_base, add_json, emit_json, human
from workbench.models import resolve_base


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("units", help="list the removable units of a UNet, with parameter counts")
    add_base(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = resolve_base(args.base)
    catalog = build_catalog(base.unet_config)
    if args.json:
        emit_json(
            {
                "base": base.name,
                "topology": catalog.topology.signature(),
                "total_params": catalog.total_params,
                "rest_params": catalog.rest_params,
                "units": [u.to_dict() for u in catalog.units],
            }
        )
        return 0
    print(f"{base.name}: {human(catalog.total_params)} parameters; {catalog.topology.describe()}")
    for u in catalog.units:
        indent = "    " if u.parent else "  "
        print(f"{indent}{u.id:<55} {u.kind:<18} {human(u.params):>8}")
    print(f"  {'(not removable: embeddings, conv in/out, samplers)':<74} {human(catalog.rest_params):>8}")
    return 0
