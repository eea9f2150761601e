"""What a session's plan means: the deltas panel shared by every handler that changes the plan.

A session's *view* is plain data: ``{"base", "resolution", "removed", "rev"}``. Handlers
that replace the plan from outside the toggles (load a model, apply a preset, change the
resolution) return a new view with ``rev`` bumped, which redraws the toggles; the toggles
themselves only write the ``plan`` state (a list of removed unit ids), so a click never
rebuilds the page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench import latency
from workbench.cost import latent_size
from workbench.errors import WorkbenchError
from workbench.surgery import StudentSpec
from workbench.ui import format as fmt
from workbench.ui import plots
from workbench.ui.store import Store, native_resolution

LATENCY_MISSING = "latency: profile not available yet — press Profile"


def new_view(
    base: str, resolution: int, removed: list[str] | tuple[str, ...] = (), rev: int = 0
) -> dict[str, Any]:
    return {"base": base, "resolution": int(resolution), "removed": list(removed), "rev": int(rev)}


def next_view(view: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The view with ``changes`` applied and ``rev`` bumped (so the toggles redraw even if equal)."""
    return {**view, **changes, "rev": int(view.get("rev", 0)) + 1}


def resolution_choices(store: Store, name: str) -> list[int]:
    """Useful image sides for FLOPs and latency: half, native and double, plus common SD sizes."""
    base = store.base(name)
    native = native_resolution(base)
    candidates = {native // 2, native, native * 2, 512, 768, 1024}
    valid = []
    for px in sorted(candidates):
        try:
            latent_size(base.unet_config, px, base.vae_scale_factor)
            valid.append(px)
        except WorkbenchError:
            continue
    return valid


@dataclass(frozen=True)
class Panel:
    """Everything the deltas panel shows for one plan; ``error`` set when the plan is impossible."""

    numbers_md: str = ""
    notes_md: str = ""
    arch: dict[str, Any] | None = None
    bars: dict[str, Any] | None = None
    error: str | None = None


def panel(store: Store, view: dict[str, Any], removed: list[str], device: str, dtype: str) -> Panel:
    """Compile the plan and price it from cached per-model data (no weights, no FLOP counting)."""
    name, resolution = view["base"], int(view["resolution"])
    try:
        spec = store.spec(name, removed)
    except WorkbenchError as err:
        return Panel(notes_md=_invalid_md(str(err)), error=str(err))
    catalog, pricing = store.catalog(name), store.pricing(name, resolution)
    rows = [
        Row("UNet params", spec.teacher_params, spec.student_params, fmt.params, "fewer"),
        Row(
            f"FLOPs at {resolution} px",
            pricing.teacher_flops,
            pricing.student_flops(spec),
            fmt.flops,
            "fewer",
        ),
    ]
    latency, latency_note = estimate_latency(store, view, spec, device, dtype)
    if latency is not None:
        metric = f"latency, estimated ({device}, {dtype})"
        rows.append(Row(metric, latency["teacher_s"], latency["estimated_student_s"], fmt.seconds, "faster"))
    arch = arch_map(store, name, resolution)
    return Panel(
        numbers_md=_numbers_md(rows, latency_note),
        notes_md=_notes_md(spec),
        arch=plots.arch_figure(arch, spec.removed_atoms, plots.auto_atoms(catalog, spec.auto_removed)),
        bars=plots.deltas_figure([r.bar() for r in rows]),
    )


@dataclass(frozen=True)
class Row:
    """One teacher-vs-student metric, with how to print it."""

    metric: str
    teacher: float
    student: float
    show: Callable[[float], str]
    word: str  # "fewer" / "faster"

    def cells(self) -> list[str]:
        return [
            self.metric,
            self.show(self.teacher),
            self.show(self.student),
            fmt.factor(self.teacher, self.student, self.word),
        ]

    def bar(self) -> tuple[str, float, float, str, str]:
        student = f"{self.show(self.student)} ({fmt.percent(self.student, self.teacher)})"
        return (self.metric.split(" (")[0], self.teacher, self.student, self.show(self.teacher), student)


def arch_map(store: Store, name: str, resolution: int) -> plots.ArchMap:
    """The architecture map's layout for a model, computed once per (model, resolution)."""

    def compute() -> plots.ArchMap:
        pricing = store.pricing(name, resolution)
        return plots.arch_map(store.catalog(name), pricing.atom_flops, pricing.latent)

    return store.memo(("arch", name, int(resolution)), compute)


def estimate_latency(
    store: Store, view: dict[str, Any], spec: StudentSpec, device: str, dtype: str
) -> tuple[dict[str, float] | None, str | None]:
    """The latency estimate from a profile made earlier (or shipped with the model), and a line
    on where its figures come from or why there are none."""
    try:
        profile = cached_profile(store, view, device, dtype)
        if profile is None:
            return None, LATENCY_MISSING
        return latency.estimate_plan(profile, spec), shipped_note(profile) if profile.shipped else None
    except WorkbenchError as err:
        return None, f"latency: {err}"


def shipped_note(profile: Any) -> str:
    """Where a shipped profile's figures come from: another machine, at another time."""
    load = f", load {profile.load_avg[0]:.1f}" if profile.load_avg else ""
    return (
        f"latency: from the profile shipped with {profile.base} (measured {profile.created[:10]} with "
        f"{profile.threads} thread{'s' * (profile.threads != 1)}{load}), not timed on this machine; press Profile to time it here"
    )


def cached_profile(store: Store, view: dict[str, Any], device: str, dtype: str) -> Any:
    """This process's profile, or one made earlier and cached on disk; never profiles."""
    name, px = view["base"], int(view["resolution"])
    profile = store.profile(name, px, device, dtype) or latency.cached_profile(name, device, dtype, px)
    if profile is not None:
        store.set_profile(name, px, device, dtype, profile)
    return profile


def _numbers_md(rows: list[Row], latency_note: str | None) -> str:
    table = fmt.table(["", "teacher", "student", "change"], [r.cells() for r in rows])
    footer = f"\n\n<span class='wb-muted'>{fmt.escape(latency_note)}</span>" if latency_note else ""
    return f"{table}{footer}"


def _notes_md(spec: StudentSpec) -> str:
    chosen = len(spec.plan.removed)
    if not chosen:
        return "Nothing removed yet: the student equals the teacher. Tick units on the left to remove them."
    auto = len(spec.auto_removed)
    head = f"**{chosen} unit{'s' * (chosen != 1)} removed by you**"
    if not auto:
        return head + ", nothing else had to change."
    notes = fmt.bullets(fmt.escape(n) for n in spec.notes)
    return f"{head}, **{auto} more removed automatically** (light red in the map):\n\n{notes}"


def _invalid_md(message: str) -> str:
    return (
        fmt.error_md(message, "This plan can't be built")
        + "\n\nThe numbers and the map still show the last valid plan."
    )
