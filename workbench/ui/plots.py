"""Plotly figures as plain JSON dicts (the plotly.js schema), built without plotly's validators.

A toggle redraws two figures; ``plotly.graph_objects.Figure`` validation costs ~7 ms per figure
on a CPU, a plain dict ~0.2 ms. The tests check every figure against plotly's schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from workbench.catalog import REST, Catalog, natural_key
from workbench.ui import format as fmt

KIND_COLOURS = {
    "resnet": ("ResNet", "#4c78a8"),
    "attention": ("attention (norm, projections)", "#f58518"),
    "block": ("transformer block", "#54a24b"),
}
REMOVED = ("removed", "#d9d9d9")
AUTO_REMOVED = ("removed automatically (coupled)", "#f4a6a6")
TEACHER_COLOUR = "#9e9e9e"
STUDENT_COLOUR = "#4c78a8"


@dataclass(frozen=True)
class Cell:
    """One square of the architecture map: an atom of the catalog."""

    atom: str
    x: float
    y: int
    kind: str  # a key of KIND_COLOURS
    hover: str


@dataclass(frozen=True)
class ArchMap:
    """Where every atom is drawn; computed once per (model, resolution)."""

    cells: tuple[Cell, ...]
    row_labels: tuple[str, ...]


def _atom_kind(atom: str) -> str:
    if ".transformer_blocks." in atom:
        return "block"
    return "attention" if ".attentions." in atom else "resnet"


def _stage_atoms(catalog: Catalog, path: str) -> list[list[str]]:
    """Atoms of a stage grouped per layer, in drawing order: ResNet, attention, its blocks."""
    atoms = [a for a in catalog.atom_params if a.startswith(path + ".")]
    if path == "mid_block":  # one group in forward order: resnets.0, attention + blocks, resnets.1
        return [sorted(atoms, key=_mid_order)]
    layers: dict[int, list[str]] = {}
    for a in atoms:
        layers.setdefault(int(a.split(".")[3]), []).append(a)
    return [sorted(layers[j], key=lambda a: (".attentions." in a, natural_key(a))) for j in sorted(layers)]


def _mid_order(atom: str) -> tuple[int, list[Any]]:
    if atom == "mid_block.resnets.0":
        return (0, [])
    return (1 if ".attentions." in atom else 2, natural_key(atom))


def arch_map(catalog: Catalog, atom_flops: dict[str, int], latent: int) -> ArchMap:
    """Stages top to bottom (down, mid, up), each layer left to right as ResNet | attention | blocks."""
    topo = catalog.topology
    paths = [s.path for s in topo.down] + (["mid_block"] if topo.mid_type else []) + [s.path for s in topo.up]
    n = len(topo.down)
    cells: list[Cell] = []
    labels: list[str] = []
    for row, path in enumerate(paths):
        side = _latent_side(path, n, latent)
        short = "mid" if path == "mid_block" else path.replace("_blocks.", " ")
        labels.append(f"{short} · {side}×{side}")
        x = 0.0
        for layer in _stage_atoms(catalog, path):
            for atom in layer:
                kind = _atom_kind(atom)
                hover = (
                    f"<b>{atom}</b><br>{KIND_COLOURS[kind][0]}<br>"
                    f"{fmt.params(catalog.atom_params[atom])} params · {fmt.flops(atom_flops.get(atom, 0))}"
                )
                cells.append(Cell(atom, x, row, kind, hover))
                x += 1
            x += 1  # a gap between layers
    return ArchMap(tuple(cells), tuple(labels))


def _latent_side(path: str, n_stages: int, latent: int) -> int:
    if path == "mid_block":
        return latent // 2 ** (n_stages - 1)
    index = int(path.split(".")[1])
    level = index if path.startswith("down") else n_stages - 1 - index
    return latent // 2**level


def arch_figure(arch: ArchMap, removed_atoms: frozenset[str], auto_atoms: frozenset[str]) -> dict[str, Any]:
    """The map with removed atoms greyed out and coupled (automatic) removals in light red."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in arch.cells:
        if cell.atom in auto_atoms:
            key = AUTO_REMOVED
        elif cell.atom in removed_atoms:
            key = REMOVED
        else:
            key = KIND_COLOURS[cell.kind]
        groups.setdefault(key, []).append(cell)
    order = [*KIND_COLOURS.values(), REMOVED, AUTO_REMOVED]
    traces = [_cells_trace(name, colour, groups.get((name, colour), [])) for name, colour in order]
    rows = len(arch.row_labels)
    layout = {
        "height": 70 + 34 * rows,
        "margin": {"l": 8, "r": 8, "t": 8, "b": 8},
        "plot_bgcolor": "white",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "showlegend": True,
        "legend": {"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0, "font": {"size": 11}},
        "xaxis": {"visible": False, "fixedrange": True},
        "yaxis": {
            "tickvals": list(range(rows)),
            "ticktext": list(arch.row_labels),
            "autorange": "reversed",
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "automargin": True,
        },
        "hoverlabel": {"align": "left"},
        "dragmode": False,
    }
    return {"data": traces, "layout": layout}


def _cells_trace(name: str, colour: str, cells: list[Cell]) -> dict[str, Any]:
    return {
        "type": "scatter",
        "mode": "markers",
        "name": name,
        "x": [c.x for c in cells],
        "y": [c.y for c in cells],
        "hovertext": [c.hover for c in cells],
        "hovertemplate": "%{hovertext}<extra>%{fullData.name}</extra>",
        "marker": {"symbol": "square", "size": 11, "color": colour, "line": {"width": 0.5, "color": "#666"}},
        "showlegend": True,
    }


def auto_atoms(catalog: Catalog, auto_removed: tuple[str, ...]) -> frozenset[str]:
    """Atoms removed only because of a coupling (mirrored up layer, mid depth)."""
    return frozenset(a for u in auto_removed for a in catalog.by_id[u].atoms if a != REST)


def deltas_figure(rows: list[tuple[str, float, float, str, str]]) -> dict[str, Any]:
    """Teacher vs student per metric as % of the teacher; rows: (metric, teacher, student, t_text, s_text)."""
    metrics = [r[0] for r in rows]
    teacher = {
        "type": "bar",
        "orientation": "h",
        "name": "teacher",
        "y": metrics,
        "x": [100.0] * len(rows),
        "text": [r[3] for r in rows],
        "textposition": "inside",
        "insidetextanchor": "end",
        "marker": {"color": TEACHER_COLOUR},
        "hovertemplate": "%{y}: %{text}<extra>teacher</extra>",
    }
    student = {
        "type": "bar",
        "orientation": "h",
        "name": "student",
        "y": metrics,
        "x": [100.0 * s / t if t else 0.0 for _, t, s, _, _ in rows],
        "text": [r[4] for r in rows],
        "textposition": "inside",
        "insidetextanchor": "end",
        "marker": {"color": STUDENT_COLOUR},
        "hovertemplate": "%{y}: %{text} (%{x:.1f} % of the teacher)<extra>student</extra>",
    }
    layout = {
        "barmode": "group",
        "height": 90 + 52 * len(rows),
        "margin": {"l": 8, "r": 8, "t": 8, "b": 8},
        "plot_bgcolor": "white",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "xaxis": {
            "range": [0, 104],
            "tickvals": [0, 25, 50, 75, 100],
            "ticksuffix": " %",
            "fixedrange": True,
            "gridcolor": "#eee",
        },
        "yaxis": {"autorange": "reversed", "fixedrange": True, "automargin": True},
        "legend": {"orientation": "h", "y": -0.12, "yanchor": "top", "x": 0},
        "font": {"size": 12},
        "uniformtext": {"minsize": 9, "mode": "hide"},
        "dragmode": False,
    }
    return {"data": [teacher, student], "layout": layout}


def to_json(figure: dict[str, Any]) -> str:
    return json.dumps(figure, separators=(",", ":"))
