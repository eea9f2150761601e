"""Blocks tab: the UNet as toggles, stage by stage, beside the teacher-vs-student deltas.

Each layer of a stage gets one row of checkboxes (the whole layer, then each of its
transformer blocks), labelled with parameters and FLOPs. A click recompiles the plan
(``surgery.compile_plan``, well under a millisecond for SDXL) and re-prices it from
per-model data cached in the store, so no toggle ever counts FLOPs or touches weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench import latency
from workbench.catalog import Catalog, natural_key
from workbench.cost import latent_size
from workbench.dtypes import fast_dtype
from workbench.errors import WorkbenchError
from workbench.topology import Stage
from workbench.ui import format as fmt
from workbench.ui import plan_view, sensitivity_panel
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors, panel_updates, user_errors
from workbench.ui.store import Pricing, Store

DEVICES = ["cpu", "cuda"]
DTYPES = ["bf16", "fp16", "fp32"]


# ------------------------------------------------------------------ the board (plain data)


@dataclass(frozen=True)
class ToggleRow:
    """One CheckboxGroup: a label and (choice label, unit id) pairs."""

    label: str
    choices: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Section:
    """One stage of the UNet, drawn as a titled group of toggle rows."""

    title: str
    summary: str
    rows: tuple[ToggleRow, ...]


def board(catalog: Catalog, pricing: Pricing) -> tuple[Section, ...]:
    """Every removable unit of the model as toggle rows, stages top to bottom (down, mid, up)."""
    topo = catalog.topology
    n = len(topo.down)
    sections = [
        _stage_section(catalog, pricing, s, mirror=topo.up[n - 1 - i].path) for i, s in enumerate(topo.down)
    ]
    if topo.mid_type is not None:
        sections.append(_mid_section(catalog, pricing, topo.down[-1].path))
    sections += [
        _stage_section(catalog, pricing, s, mirror=topo.down[n - 1 - k].path) for k, s in enumerate(topo.up)
    ]
    return tuple(sections)


def _choice(catalog: Catalog, pricing: Pricing, unit_id: str, what: str) -> tuple[str, str]:
    unit = catalog.by_id[unit_id]
    return fmt.choice_label(what, unit.params, pricing.unit_flops[unit_id]), unit_id


def _stage_totals(catalog: Catalog, pricing: Pricing, path: str) -> str:
    atoms = [a for a in catalog.atom_params if a.startswith(path + ".")]
    total_params = sum(catalog.atom_params[a] for a in atoms)
    total_flops = sum(pricing.atom_flops.get(a, 0) for a in atoms)
    return f"{fmt.params(total_params)} params · {fmt.flops(total_flops)}"


def _stage_section(catalog: Catalog, pricing: Pricing, stage: Stage, mirror: str) -> Section:
    p = stage.path
    if stage.depths is None:
        layers = tuple(
            _choice(catalog, pricing, f"{p}.layers.{j}", f"layer {j}") for j in range(stage.num_layers)
        )
        rows: tuple[ToggleRow, ...] = (ToggleRow("Layers (a ResNet each)", layers),)
    else:
        rows = tuple(_layer_row(catalog, pricing, p, j, d) for j, d in enumerate(stage.depths))
        rows += (ToggleRow("Whole stage", (_choice(catalog, pricing, f"{p}.attentions", "all attention"),)),)
    if p in catalog.by_id:  # a whole stage: the down stage's section carries the toggle
        whole = _choice(catalog, pricing, p, f"whole stage + {mirror} + samplers")
        rows = (ToggleRow("Remove the stage (block_out_channels loses an entry)", (whole,)), *rows)
    if p.startswith("down"):
        coupling = f"Removing a layer here also removes one layer of {mirror} (its skip connection)."
    else:
        coupling = f"Can lose only as many layers as {mirror} lost (one skip connection per layer)."
    summary = f"{stage.num_layers} layers · {_stage_totals(catalog, pricing, p)}. {coupling}"
    return Section(fmt.stage_title(p, stage.block_type), summary, rows)


def _layer_row(catalog: Catalog, pricing: Pricing, path: str, j: int, depth: int) -> ToggleRow:
    attn = f"{path}.attentions.{j}"
    whole = _choice(catalog, pricing, f"{path}.layers.{j}", "whole layer")
    blocks, each = _block_choices(catalog, pricing, attn, depth)
    label = f"Layer {j}: ResNet + attention with {depth} transformer block{'s' * (depth != 1)}{each}"
    return ToggleRow(label, (whole, *blocks))


def _block_choices(
    catalog: Catalog, pricing: Pricing, attn: str, depth: int
) -> tuple[tuple[tuple[str, str], ...], str]:
    """Block toggles; blocks of one attention are identical, so their size is said once ('each')."""
    ids = [f"{attn}.transformer_blocks.{k}" for k in range(depth)]
    sizes = {(catalog.by_id[u].params, pricing.unit_flops[u]) for u in ids}
    if len(sizes) != 1:
        return tuple(_choice(catalog, pricing, u, f"block {k}") for k, u in enumerate(ids)), ""
    n_params, n_flops = sizes.pop()
    each = f" ({fmt.params(n_params)} params · {fmt.flops(n_flops)} each)"
    return tuple((f"block {k}", u) for k, u in enumerate(ids)), each


def _mid_section(catalog: Catalog, pricing: Pricing, last_down: str) -> Section:
    topo = catalog.topology
    whole = [_choice(catalog, pricing, "mid_block", "whole mid block")]
    rows = []
    if topo.mid_type == "UNetMidBlock2DCrossAttn":
        attn = "mid_block.attentions.0"
        whole.append(_choice(catalog, pricing, attn, "attention + 2nd ResNet"))
        blocks, each = _block_choices(catalog, pricing, attn, topo.mid_depth)
        rows.append(ToggleRow(f"Transformer blocks{each}", blocks))
    rows.insert(0, ToggleRow("Mid block", tuple(whole)))
    summary = (
        f"{_stage_totals(catalog, pricing, 'mid_block')}. Its transformer depth follows the first attention "
        f"of {last_down} (diffusers ties them)."
    )
    return Section(fmt.stage_title("mid_block", topo.mid_type), summary, tuple(rows))


def cached_board(store: Store, name: str, resolution: int) -> tuple[Section, ...]:
    return store.memo(
        ("board", name, int(resolution)),
        lambda: board(store.catalog(name), store.pricing(name, resolution)),
    )


# ------------------------------------------------------------------ handlers (plain functions)


def union(groups: tuple[list[str] | None, ...]) -> list[str]:
    """The removed unit ids from every toggle row, in catalog order."""
    return sorted({u for g in groups for u in (g or [])}, key=natural_key)


def on_toggle(store: Store, view: dict[str, Any], device: str, dtype: str, *groups: list[str]) -> tuple:
    """A checkbox changed: the new plan, and the deltas panel (kept as it was if impossible)."""
    removed = union(groups)
    return (removed, *panel_updates(store, view, removed, device, dtype))


def parse_resolution(store: Store, name: str, value: Any, max_px: int) -> int:
    """An image side from the dropdown (typed values arrive as text); errors say what is valid."""
    try:
        px = int(str(value).strip().removesuffix("px").strip())
    except ValueError:
        raise WorkbenchError(f"resolution {value!r} is not a number of pixels, e.g. 1024") from None
    if px > max_px:
        raise WorkbenchError(f"resolution {px} px is above this app's limit of {max_px} px")
    base = store.base(name)
    latent_size(base.unet_config, px, base.vae_scale_factor)  # raises with the valid step
    return px


def set_resolution(
    store: Store, view: dict[str, Any], plan: list[str], value: Any, device: str, dtype: str, max_px: int
) -> tuple:
    """Re-price every unit at a new resolution (counts FLOPs once per model and resolution)."""
    px = parse_resolution(store, view["base"], value, max_px)
    if px == view["resolution"]:
        return (gr.skip(), *(gr.skip(),) * 4)
    new = plan_view.next_view(view, resolution=px, removed=list(plan))
    store.pricing(new["base"], px)
    return (new, *panel_updates(store, new, list(plan), device, dtype))


def check_latency_resolution(view: dict[str, Any], max_px: int | None) -> None:
    if max_px is not None and view["resolution"] > max_px:
        raise WorkbenchError(
            f"timing at {view['resolution']} px is above this app's limit of {max_px} px for latency; "
            f"choose {max_px} px or less in the resolution box"
        )


def profile_latency(
    store: Store,
    view: dict[str, Any],
    plan: list[str],
    device: str,
    dtype: str,
    max_px: int | None = None,
    progress: Any = None,
) -> tuple:
    """Profile the teacher's atoms on this machine (cached on disk by workbench.latency)."""
    check_latency_resolution(view, max_px)
    name, px = view["base"], view["resolution"]
    adapter = ProgressAdapter(progress) if progress is not None else None
    profile = latency.get_profile(name, device=device, dtype=dtype, resolution=px, progress=adapter)
    store.set_profile(name, px, device, dtype, profile)
    return panel_updates(store, view, list(plan), device, dtype)


def measure_latency(
    store: Store,
    view: dict[str, Any],
    plan: list[str],
    device: str,
    dtype: str,
    repeats: int,
    max_px: int | None = None,
    progress: Any = None,
    teacher_steps: Any = 20,
    student_steps: Any = 4,
    student_guided: bool = False,
) -> str:
    """Time teacher and student side by side on this machine; Markdown with the result, per
    UNet call and per image (each at its own steps; text encoders and VAE decode measured on
    the pipeline when the base has one)."""
    check_latency_resolution(view, max_px)
    sampling = (latency.Sampling(_whole(teacher_steps, "teacher steps"), True),
                latency.Sampling(_whole(student_steps, "student steps"), bool(student_guided)))  # fmt: skip
    spec = store.spec(view["base"], plan)  # an impossible plan is refused before building anything
    adapter = ProgressAdapter(progress) if progress is not None else None
    result = latency.measure_speedup(
        view["base"],
        spec.plan,
        device=device,
        dtype=dtype,
        resolution=view["resolution"],
        repeats=repeats,
        progress=adapter,
    )
    base = store.base(view["base"])
    parts = None
    if base.has_pipeline and device == "cpu":  # the toy or a real pipeline: time its other parts too
        parts = latency.pipeline_parts(store.pipeline(view["base"]), view["resolution"])
    image = latency.per_image(result["teacher_s"], result["student_s"], parts, *sampling)
    return measured_md(result, len(plan), view["resolution"]) + "\n\n" + per_image_md(image, sampling)


def _whole(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{what} must be a whole number >= 1, got {value!r}") from None
    if number != float(value) or number < 1:
        raise WorkbenchError(f"{what} must be a whole number >= 1, got {value!r}")
    return number


def per_image_md(image: dict[str, Any], sampling: tuple) -> str:
    """Teacher and student per image, end to end, each at its own step count."""
    rows = []
    for who, s in zip(("teacher", "student"), sampling):
        r = image[who]
        rows.append([who, s.describe(), fmt.seconds(r["text_s"]) if image["parts_measured"] else "-",
                     fmt.seconds(r["unet_s"]), fmt.seconds(r["decode_s"]) if image["parts_measured"] else "-",
                     fmt.seconds(r["total_s"])])  # fmt: skip
    t, st = image["teacher"]["total_s"], image["student"]["total_s"]
    what = (
        "text encoders + UNet calls + VAE decode"
        if image["parts_measured"]
        else "UNet calls only (no pipeline)"
    )
    head = f"**Per image** ({what}): student {fmt.factor(t, st, 'faster')}"
    return head + "\n\n" + fmt.table(["", "sampling", "text", "UNet", "VAE decode", "image"], rows)


def measured_md(result: dict[str, Any], n_removed: int, resolution: int) -> str:
    """The measured side-by-side timing as a small table, with how far the estimate was."""
    t, s = result.get("teacher_s"), result.get("student_s")
    rows = [["measured", fmt.seconds(t), fmt.seconds(s), fmt.factor(t or 0, s or 0, "faster")]]
    est, err = result.get("estimated_student_s"), result.get("estimate_error")
    if est is not None:
        off = f"estimate {100 * err:+.1f} % off" if isinstance(err, (int, float)) else ""
        rows.append(["estimated from the profile", "", fmt.seconds(est), off])
    ratio = result.get("flops_ratio")
    head = (
        f"**Measured** on {result.get('device', '?')} ({result.get('dtype', '?')}) at {resolution} px, "
        f"one UNet forward, median of {result.get('repeats', '?')}; plan with {n_removed} unit(s) removed"
        + (f", {ratio:.2f}x fewer FLOPs:" if ratio else ":")
    )
    return head + "\n\n" + fmt.table(["", "teacher", "student", ""], rows)


# ------------------------------------------------------------------ layout and wiring


def build(ctx: Shared) -> None:
    """Sensitivity and auto-prune above the toggles (left); the deltas panel (right, stays in view)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=11, elem_classes="wb-toggles"):
            sensitivity = sensitivity_panel.build(ctx)
            _toggles(ctx)
        with gr.Column(scale=9, elem_classes="wb-sticky"):
            _panel(ctx)
    sensitivity_panel.wire(ctx, sensitivity)  # it updates the panel, which exists only now


def _toggles(ctx: Shared) -> None:
    @gr.render(inputs=[ctx.view], show_progress="minimal")
    def render(view: dict[str, Any]) -> None:
        try:
            sections = cached_board(ctx.store, view["base"], view["resolution"])
        except WorkbenchError as err:
            gr.Markdown(fmt.error_md(str(err), "Cannot show this model"))
            return
        groups = _render_sections(sections, set(view["removed"]))

        def toggled(v: dict[str, Any], device: str, dtype: str, *values: list[str]) -> tuple:
            return on_toggle(ctx.store, v, device, dtype, *values)

        gr.on(
            [g.input for g in groups],
            toggled,
            inputs=[ctx.view, *ctx.panel_inputs(), *groups],
            outputs=[ctx.plan, *ctx.panel],
            trigger_mode="always_last",
            show_progress="hidden",
            api_visibility="private",
        )


def _render_sections(sections: tuple[Section, ...], removed: set[str]) -> list[gr.CheckboxGroup]:
    groups = []
    for section in sections:
        with gr.Group(elem_classes="wb-stage"):
            gr.Markdown(f"**{section.title}**  \n<span class='wb-muted'>{fmt.escape(section.summary)}</span>")
            for row in section.rows:
                value = [uid for _, uid in row.choices if uid in removed]
                groups.append(
                    gr.CheckboxGroup(
                        choices=list(row.choices), value=value, label=row.label, elem_classes="wb-row"
                    )
                )
    return groups


def _panel(ctx: Shared) -> None:
    gr.Markdown("### Teacher → student")
    numbers = gr.Markdown(elem_id="wb-numbers")
    notes = gr.Markdown(elem_id="wb-notes")
    gr.Markdown(
        "**Architecture map** — one square per ResNet, attention and transformer block; hover for details."
    )
    arch = gr.Plot(show_label=False, elem_id="wb-arch")
    bars = gr.Plot(show_label=False, elem_id="wb-bars")
    ctx.panel[:] = [numbers, notes, arch, bars]
    with gr.Accordion("Resolution and latency", open=True):
        with gr.Row():
            ctx.resolution = gr.Dropdown(
                label="Resolution (px) for FLOPs and latency", allow_custom_value=True, scale=2
            )
            ctx.device = gr.Dropdown(DEVICES, value="cpu", label="Device", scale=1)
            start = fast_dtype("cpu")
            ctx.dtype = gr.Dropdown(DTYPES, value=start.name, label="Dtype", info=start.reason, scale=1)
        with gr.Row():
            teacher_steps = gr.Number(20, precision=0, label="Teacher steps (guided: 2 calls each)", scale=1)
            student_steps = gr.Number(4, precision=0, label="Student steps", scale=1)
            student_guided = gr.Checkbox(
                False, label="Student uses guidance (off: w-conditioned, 1 call)", scale=1
            )
        with gr.Row():
            profile_btn = gr.Button("Profile (estimate latency)", size="sm")
            measure_btn = gr.Button("Measure real speedup", size="sm")
        measured = gr.Markdown(elem_id="wb-measured")
    _wire_panel(ctx, profile_btn, measure_btn, measured, [teacher_steps, student_steps, student_guided])


def _wire_panel(ctx: Shared, profile_btn: gr.Button, measure_btn: gr.Button, measured: gr.Markdown,
                steps: list) -> None:  # fmt: skip
    store, limits = ctx.store, ctx.settings.limits

    @user_errors
    def on_resolution(view, plan, value, device, dtype):
        return set_resolution(store, view, plan, value, device, dtype, limits.max_flops_px)

    @user_errors
    def on_profile(view, plan, device, dtype, progress=gr.Progress()):
        return profile_latency(store, view, plan, device, dtype, limits.max_latency_px, progress)

    @inline_errors(n_outputs=1, status_at=0)
    def on_measure(view, plan, device, dtype, t_steps, s_steps, guided, progress=gr.Progress()):
        repeats = limits.measure_repeats
        return measure_latency(store, view, plan, device, dtype, repeats, limits.max_latency_px, progress,
                               t_steps, s_steps, guided)  # fmt: skip

    def on_latency_settings(view, plan, device, dtype):
        return panel_updates(store, view, list(plan), device, dtype)

    ctx.resolution.input(
        on_resolution,
        [ctx.view, ctx.plan, ctx.resolution, *ctx.panel_inputs()],
        [ctx.view, *ctx.panel],
        api_visibility="private",
    )
    ctx.dtype.input(
        on_latency_settings, [ctx.view, ctx.plan, *ctx.panel_inputs()], ctx.panel, api_visibility="private"
    )

    def on_device(view, plan, device):  # a new device: its own fast dtype (fp32 on CPU), and why
        choice = fast_dtype(device)
        box = gr.update(value=choice.name, info=choice.reason)
        return box, *on_latency_settings(view, plan, device, choice.name)

    ctx.device.input(
        on_device, [ctx.view, ctx.plan, ctx.device], [ctx.dtype, *ctx.panel], api_visibility="private"
    )
    profile_btn.click(on_profile, [ctx.view, ctx.plan, *ctx.panel_inputs()], ctx.panel, **ctx.model_event())
    measure_btn.click(
        on_measure, [ctx.view, ctx.plan, *ctx.panel_inputs(), *steps], measured, **ctx.model_event()
    )


def default_dtype(device: str) -> str:
    """The Dtype box's value for ``device``: the one rule's fast dtype (fp32 on CPU, bf16 or fp16 on CUDA)."""
    return fast_dtype(device).name


def initial_panel(store: Store, view: dict[str, Any], device: str, dtype: str) -> tuple:
    """The deltas panel and resolution choices for a fresh page."""
    choices = plan_view.resolution_choices(store, view["base"])
    resolution = gr.update(choices=choices, value=view["resolution"])
    return (resolution, *panel_updates(store, view, list(view["removed"]), device, dtype))
