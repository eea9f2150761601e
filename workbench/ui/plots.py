"""Plotly figures as plain JSON dicts (the plotly.js schema), built without plotly's validators.

A toggle redraws two figures; ``plotly.graph_objects.Figure`` validation costs ~7 ms per figure
on a CPU, a plain dict ~0.2 ms. The tests check every figure against plotly's schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from workbench.catalog import REST, Catalog, natural_key
from workbench.ui import format as fmt

KIND_COLOURS = {
    "resnet": ("ResNet", "#4c78a8"),
    "attention": ("attention (norm, projections)", "#f58518"),
    "block": ("transformer block", "#54a24b"),
    "sampler": ("down/upsampler", "#b279a2"),
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
    if "samplers." in atom:
        return "sampler"
    if ".transformer_blocks." in atom:
        return "block"
    return "attention" if ".attentions." in atom else "resnet"


def _stage_atoms(catalog: Catalog, path: str) -> list[list[str]]:
    """Atoms of a stage grouped per layer, in drawing order: ResNet, attention, its blocks."""
    atoms = [a for a in catalog.atom_params if a.startswith(path + ".")]
    if path == "mid_block":  # one group in forward order: resnets.0, attention + blocks, resnets.1
        return [sorted(atoms, key=_mid_order)]
    layers: dict[int, list[str]] = {}
    samplers = [a for a in atoms if "samplers." in a]  # drawn last, after the stage's layers
    for a in atoms:
        if a not in samplers:
            layers.setdefault(int(a.split(".")[3]), []).append(a)
    groups = [sorted(layers[j], key=lambda a: (".attentions." in a, natural_key(a))) for j in sorted(layers)]
    return groups + ([samplers] if samplers else [])


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


# ------------------------------------------------------------------ sensitivity heatmap

UNREMOVABLE = ("cannot be removed", "#d9d9d9")
# Light yellow: removing it changes little; dark red: it matters. Spelled out (ColorBrewer
# YlOrRd, low to high) because plotly.js's named "YlOrRd" runs the other way round.
HEAT_COLOURS = [
    [i / 8, c]
    for i, c in enumerate(
        ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]
    )
]
DEVIATION_FLOOR = 1e-9  # a deviation of 0 (no change at all) is drawn at this colour


@dataclass(frozen=True)
class HeatLayout:
    """Where each unit sits in the sensitivity heatmap: the Blocks tab's toggle rows as rows.

    Rows follow the stages in forward order (down, mid, up), one per layer (then one for the
    stage's attention as a whole); column 0 is the layer (or mid unit) itself, column k+1
    its transformer block k.
    """

    cells: dict[str, tuple[int, int]]  # unit id -> (row, column)
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]


def _heat_slot(unit_id: str, kind: str, stage: str) -> tuple[str, int]:
    """(row label within the stage, column) of a unit."""
    rest = unit_id[len(stage) + 1 :] if unit_id != stage else ""
    parts = rest.split(".")
    if kind == "transformer_block":  # attentions.J.transformer_blocks.K
        row = "attention" if stage == "mid_block" else f"layer {parts[1]}"
        return row, int(parts[3]) + 1
    if kind == "layer":
        return f"layer {parts[1]}", 0
    if kind == "stage_attention":
        return "all attention", 0
    if kind == "mid_attention":
        return "attention", 0
    if kind == "mid_block":
        return "whole block", 0
    if kind == "stage":
        return "whole stage", 0
    return rest or unit_id, 0


def heat_layout(catalog: Catalog) -> HeatLayout:
    """Rows in catalog (forward) order; every unit of the catalog gets exactly one cell."""
    rows: dict[tuple[str, str], int] = {}
    cells: dict[str, tuple[int, int]] = {}
    for unit in catalog.units:
        label, col = _heat_slot(unit.id, unit.kind, unit.stage)
        row = rows.setdefault((unit.stage, label), len(rows))
        cells[unit.id] = (row, col)
    width = 1 + max((c for _, c in cells.values()), default=0)
    row_labels = tuple(f"{_short_stage(stage)} · {label}" for stage, label in rows)
    col_labels = ("unit", *(f"block {k}" for k in range(width - 1)))
    return HeatLayout(cells, row_labels, col_labels)


def _short_stage(path: str) -> str:
    return "mid" if path == "mid_block" else path.replace("_blocks.", " ")


def _wrap(text: str, width: int = 72) -> str:
    """Break a long reason into hover-sized lines."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join([*lines, line] if line else lines)


def _heat_hover(row: dict[str, Any]) -> str:
    lines = [f"<b>{row['unit']}</b>", f"{row['kind'].replace('_', ' ')} · {fmt.params(row['params'])} params"]
    if row.get("deviation") is not None:
        lines.append(f"deviation {row['deviation']:.3g} (relative MSE of the UNet's prediction)")
    if row.get("fidelity_drop") is not None:
        lines.append(f"fidelity drop {row['fidelity_drop']:+.3f}")
    if row.get("full_drop") is not None:
        lines.append(f"full-prompt drop {row['full_drop']:+.3f}")
    if row.get("with"):
        lines.append(f"measured with {row['with']} (it cannot go alone)")
    if row.get("reason"):
        lines.append("cannot be removed: " + _wrap(row["reason"]))
    return "<br>".join(lines)


def sensitivity_figure(layout: HeatLayout, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A heatmap of ``sensitivity.heat_rows``: colour = log10(deviation); units no plan can
    remove (or missing from the map) are grey and hatched, with the reason on hover."""
    z, hover, grey = _heat_cells(layout, rows)
    logs = [v for line in z for v in line if v is not None]
    lo = math.floor(min(logs)) if logs else -6
    hi = math.ceil(max(logs)) if logs else 0
    hi = max(hi, lo + 1)
    return {
        "data": [_heat_trace(layout, z, hover, lo, hi), _blocked_trace(grey)],
        "layout": _heat_figure_layout(layout, bool(grey)),
    }


def _heat_cells(
    layout: HeatLayout, rows: list[dict[str, Any]]
) -> tuple[list[list[float | None]], list[list[str]], list[tuple[int, int, str]]]:
    """(log10 deviations by (row, column), their hover texts, the grey cells: (row, column, hover))."""
    n_rows, n_cols = len(layout.row_labels), len(layout.col_labels)
    z: list[list[float | None]] = [[None] * n_cols for _ in range(n_rows)]
    hover: list[list[str]] = [[""] * n_cols for _ in range(n_rows)]
    grey: list[tuple[int, int, str]] = []
    seen = set()
    for row in rows:
        if row["unit"] not in layout.cells:
            continue
        seen.add(row["unit"])
        r, c = layout.cells[row["unit"]]
        dev = row.get("deviation")
        if dev is None or not math.isfinite(dev):
            grey.append((r, c, _heat_hover(row)))
            continue
        z[r][c] = math.log10(max(dev, DEVIATION_FLOOR))
        hover[r][c] = _heat_hover(row)
    for unit, (r, c) in layout.cells.items():
        if unit not in seen:
            grey.append((r, c, f"<b>{unit}</b><br>not in this sensitivity map"))
    return z, hover, grey


def _heat_trace(
    layout: HeatLayout, z: list[list[float | None]], hover: list[list[str]], lo: int, hi: int
) -> dict[str, Any]:
    ticks = list(range(lo, hi + 1))
    return {
        "type": "heatmap",
        "name": "deviation",
        "z": z,
        "x": list(range(len(layout.col_labels))),
        "y": list(range(len(layout.row_labels))),
        "hovertext": hover,
        "hovertemplate": "%{hovertext}<extra></extra>",
        "hoverongaps": False,
        "colorscale": HEAT_COLOURS,
        "zmin": lo,
        "zmax": hi,
        "xgap": 2,
        "ygap": 2,
        "colorbar": {
            "title": {"text": "deviation", "side": "right"},
            "tickvals": ticks,
            "ticktext": [_decade(t) for t in ticks],
            "thickness": 12,
            "len": 0.9,
        },
    }


def _blocked_trace(grey: list[tuple[int, int, str]]) -> dict[str, Any]:
    """The grey, hatched cells of units no plan can remove, drawn as bars over the heatmap."""
    return {
        "type": "bar",
        "name": UNREMOVABLE[0],
        "x": [c for _, c, _ in grey],
        "y": [0.9] * len(grey),
        "base": [r - 0.45 for r, _, _ in grey],
        "width": 0.9,
        "hovertext": [h for _, _, h in grey],
        "hovertemplate": "%{hovertext}<extra></extra>",
        "marker": {
            "color": UNREMOVABLE[1],
            "pattern": {"shape": "/", "fgcolor": "#888", "size": 6},
            "line": {"width": 0},
        },
        "showlegend": bool(grey),
    }


def _heat_figure_layout(layout: HeatLayout, legend: bool) -> dict[str, Any]:
    n_rows, n_cols = len(layout.row_labels), len(layout.col_labels)
    return {
        "height": 90 + 22 * n_rows,
        "margin": {"l": 8, "r": 8, "t": 30, "b": 8},
        "plot_bgcolor": "white",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "showlegend": legend,
        "legend": {"orientation": "h", "y": -0.01, "yanchor": "top", "x": 0, "font": {"size": 11}},
        "xaxis": {
            "tickvals": list(range(n_cols)),
            "ticktext": list(layout.col_labels),
            "side": "top",
            "range": [-0.5, n_cols - 0.5],
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "tickfont": {"size": 10},
        },
        "yaxis": {
            "tickvals": list(range(n_rows)),
            "ticktext": list(layout.row_labels),
            "range": [n_rows - 0.5, -0.5],
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "automargin": True,
            "tickfont": {"size": 10},
        },
        "hoverlabel": {"align": "left"},
        "dragmode": False,
    }


def _decade(power: int) -> str:
    return f"{10**power:g}" if power >= 0 else f"1e{power}"
