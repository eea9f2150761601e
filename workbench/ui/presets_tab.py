"""Presets tab: apply a saved plan to the toggles, save the current plan, download or upload JSON."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from workbench import presets, space
from workbench.errors import WorkbenchError
from workbench.plan import PruningPlan
from workbench.surgery import StudentSpec
from workbench.ui import format as fmt
from workbench.ui import plan_view
from workbench.ui.shared import Shared, inline_errors, panel_updates, user_errors
from workbench.ui.store import Store

MAX_UPLOAD_BYTES = 1_000_000  # a plan lists at most a few hundred ids; anything larger is not a plan


def preset_md(store: Store, view: dict[str, Any], name: str | None) -> str:
    """What a preset is, and what it makes of the loaded model (or why it does not fit)."""
    if not name:
        return "Choose a preset to see what it removes."
    plan = presets.load_preset(name)
    head = f"**{fmt.escape(plan.name)}** — {fmt.escape(plan.description) or 'no description'}"
    source = f"  \n<span class='wb-muted'>Source: {fmt.escape(plan.source)}</span>" if plan.source else ""
    return f"{head}{source}\n\n{fit_md(store, view, plan)}"


def fit_md(store: Store, view: dict[str, Any], plan: PruningPlan) -> str:
    try:
        spec = checked_spec(store, view, plan)
    except WorkbenchError as err:
        return fmt.error_md(str(err), f"Does not fit {view['base']}")
    pricing = store.pricing(view["base"], view["resolution"])
    flops = pricing.student_flops(spec)
    return (
        f"On **{fmt.escape(view['base'])}**: removes {len(plan.removed)} units"
        f"{f' (+{len(spec.auto_removed)} automatically)' if spec.auto_removed else ''}; "
        f"{fmt.params(spec.teacher_params)} → **{fmt.params(spec.student_params)}** params, "
        f"{fmt.flops(pricing.teacher_flops)} → **{fmt.flops(flops)}** at {view['resolution']} px."
    )


def checked_spec(store: Store, view: dict[str, Any], plan: PruningPlan) -> StudentSpec:
    """The student ``plan`` makes of the loaded model; a WorkbenchError says why it does not fit."""
    plan.check_fits(store.catalog(view["base"]))  # the plan's own topology, not only its ids
    return store.spec(view["base"], list(plan.removed))


def apply_plan(
    store: Store, view: dict[str, Any], plan: PruningPlan, device: str, dtype: str, what: str
) -> tuple:
    """Put ``plan`` on the toggles: (view, plan ids, status, *panel)."""
    checked_spec(store, view, plan)
    removed = list(plan.removed)
    new = plan_view.next_view(view, removed=removed)
    status = fmt.ok_md(f"Applied {what}: {len(removed)} units removed. Change the toggles in the Blocks tab.")
    return (new, removed, status, *panel_updates(store, new, removed, device, dtype))


def apply_preset(store: Store, view: dict[str, Any], name: str | None, device: str, dtype: str) -> tuple:
    if not name:
        raise WorkbenchError("choose a preset first")
    return apply_plan(store, view, presets.load_preset(name), device, dtype, f"preset {name!r}")


def current_plan(
    store: Store, view: dict[str, Any], plan: list[str], name: str, description: str = ""
) -> PruningPlan:
    """The session's plan as a PruningPlan of the loaded model, validated."""
    catalog = store.catalog(view["base"])
    value = PruningPlan(
        name=name,
        topology=catalog.topology.signature(),
        removed=tuple(plan),
        description=description.strip(),
        source=f"SDXL distillation workbench, teacher {view['base']}",
    )
    store.spec(view["base"], list(plan))  # never save or hand out an impossible plan
    return value


def save_plan(store: Store, view: dict[str, Any], plan: list[str], name: str, description: str) -> tuple:
    """Save the session's plan as ``presets/<name>.json``: (status, dropdown update)."""
    name = (name or "").strip()
    presets.check_name(name)
    path = presets.save_preset(current_plan(store, view, plan, name, description), name)
    status = fmt.ok_md(f"Saved {len(plan)} removed units as preset {name!r} ({path.name}).")
    return status, gr.update(choices=presets.list_presets(), value=name)


def plan_file(store: Store, view: dict[str, Any], plan: list[str], name: str, description: str) -> str:
    """The session's plan as a JSON file to download; returns its path."""
    name = (name or "").strip() or "my-plan"
    presets.check_name(name)
    value = current_plan(store, view, plan, name, description)
    folder = Path(tempfile.mkdtemp(prefix="workbench-plan-"))
    return str(value.save(folder / f"{name}.json"))


def upload_plan(store: Store, view: dict[str, Any], path: str | None, device: str, dtype: str) -> tuple:
    """Read an uploaded plan strictly and apply it; every problem comes back as a precise message."""
    if not path:
        raise WorkbenchError("no file was uploaded")
    file = Path(path)
    label = f"uploaded file {_original_name(file)!r}"
    if file.stat().st_size > MAX_UPLOAD_BYTES:
        raise WorkbenchError(f"{label} is {file.stat().st_size:,} bytes; a plan is a small JSON file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkbenchError(f"{label} is not a UTF-8 text file; upload a plan JSON") from None
    return apply_plan(store, view, PruningPlan.from_json(text, origin=label), device, dtype, label)


def _original_name(file: Path) -> str:
    # Gradio keeps the uploaded name as the last path part, sometimes behind a hash folder.
    return re.sub(r"^[0-9a-f]{32,}_", "", file.name)


# ------------------------------------------------------------------ layout and wiring


def build(ctx: Shared) -> None:
    store, on_space = ctx.store, ctx.settings.space
    # A Space visitor picks presets by name and keeps their own plans as files (no writes to presets/).
    picked = space.check_preset if on_space else (lambda name: name)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Presets\nPlans saved in `presets/`. Applying one replaces the toggles.")
            choice = gr.Dropdown(presets.list_presets(), value=None, label="Preset")
            preview = gr.Markdown("Choose a preset to see what it removes.", elem_id="wb-preset-preview")
            apply = gr.Button("Apply to the toggles", variant="primary")
        with gr.Column(scale=1):
            gr.Markdown("### Your plan\nSave the current toggles as a preset, or as a file to share.")
            name = gr.Textbox(label="Name", placeholder="e.g. my-ssd-variant (letters, digits, . _ -)")
            description = gr.Textbox(label="Description", lines=2, placeholder="what it removes and why")
            with gr.Row():
                save = gr.Button("Save as preset", visible=not on_space)
                download = gr.Button("Download JSON")
                upload = gr.UploadButton(
                    "Upload JSON…", file_types=[".json"], type="filepath", elem_id="wb-upload"
                )
            file_out = gr.File(label="Plan file", visible=False, interactive=False)
    status = gr.Markdown(elem_id="wb-presets-status")

    @user_errors
    def on_choose(view, preset):
        return preset_md(store, view, picked(preset))

    @inline_errors(n_outputs=3 + len(ctx.panel), status_at=2)
    def on_apply(view, preset, device, dtype):
        return apply_preset(store, view, picked(preset), device, dtype)

    @inline_errors(n_outputs=2, status_at=0)
    def on_save(view, plan, preset_name, text):
        if on_space:
            raise WorkbenchError("this Space saves no presets on its disk: download the JSON and upload it later")
        return save_plan(store, view, plan, preset_name, text)

    @inline_errors(n_outputs=2, status_at=1)
    def on_download(view, plan, preset_name, text):
        path = plan_file(store, view, plan, preset_name, text)
        return gr.update(value=path, visible=True), fmt.ok_md(f"Plan file ready: {Path(path).name}.")

    @inline_errors(n_outputs=3 + len(ctx.panel), status_at=2)
    def on_upload(view, path, device, dtype):
        return upload_plan(store, view, path, device, dtype)

    private = {"api_visibility": "private"}
    ctx.demo.load(
        lambda: gr.update(choices=presets.list_presets()), None, choice, **private
    )  # saved elsewhere
    choice.change(on_choose, [ctx.view, choice], preview, **private)
    ctx.view.change(on_choose, [ctx.view, choice], preview, **private)  # the model may have changed
    apply.click(
        on_apply, [ctx.view, choice, *ctx.panel_inputs()], [ctx.view, ctx.plan, status, *ctx.panel], **private
    )
    save.click(on_save, [ctx.view, ctx.plan, name, description], [status, choice], **private)
    download.click(on_download, [ctx.view, ctx.plan, name, description], [file_out, status], **private)
    upload.upload(
        on_upload,
        [ctx.view, upload, *ctx.panel_inputs()],
        [ctx.view, ctx.plan, status, *ctx.panel],
        **private,
    )
