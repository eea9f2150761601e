"""Export tab: the current plan's student (built from the loaded teacher's weights) or a trained
run's student, in one of the export formats (``workbench.export``), as a zip with its model card.

An uploaded teacher LoRA is checked against the plan at once (what is kept, renamed, dropped,
and the share that survives) and travels remapped in the zip's ``lora/``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr

from workbench import export, lora
from workbench.errors import WorkbenchError
from workbench.modelcard import client_notes
from workbench.runs import RunDir, list_runs
from workbench.sgm import client_support
from workbench.ui import format as fmt
from workbench.ui.settings import AppSettings
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors
from workbench.ui.store import Store
from workbench.ui.visitors import Runs, as_runs, page_runs, visible_runs

CURRENT_PLAN = "current plan"
FORMAT_LABELS = {
    "diffusers": "diffusers UNet folder",
    "pipeline": "full pipeline folder",
    "single-file": "single-file UNet (.safetensors)",
    "checkpoint": "full checkpoint (.safetensors)",
}
DTYPE_AUTO = "auto"


def slug(text: str) -> str:
    """A file-name-safe version of a base name or hub id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-.") or "model"


def source_choices(root: Runs | Path | None = None) -> list[tuple[str, str]]:
    """The current plan, then every run (on a Space: the visitor's own) that has a trained
    student (newest first)."""
    runs = [
        (f"run {r['name']} (trained student)", r["run_dir"])
        for r in list_runs(as_runs(root).folder)
        if (RunDir(Path(r["run_dir"])).student / "config.json").is_file()
    ]
    return [(f"{CURRENT_PLAN} (built from the teacher)", CURRENT_PLAN), *runs]


def own_source(settings: AppSettings, visitor: str | None, source: str | None) -> str:
    """The current plan, or a run this page may export (on a Space: the visitor's own)."""
    if source in (None, CURRENT_PLAN):
        return CURRENT_PLAN
    return page_runs(settings, visitor).own(source)


def _student(store: Store, view: dict[str, Any], plan: list[str], source: str, progress: Any):
    """(student, the teacher's base name): the current plan's, or a run's trained one."""
    if source and source != CURRENT_PLAN:
        info = export.read_student_folder(source)
        name = info.base_name() or view["base"]
        return export.student_from_folder(source, store.base(name)), name
    name = view["base"]
    store.spec(name, plan)  # an impossible plan is refused before any weight is loaded
    unet, spec = store.student(name, plan, ProgressAdapter(progress, 0.0, 0.5))
    return export.Student(spec=spec, base=store.base(name), unet=unet), name


def export_student(
    store: Store,
    view: dict[str, Any],
    plan: list[str],
    fmt_name: str = "diffusers",
    dtype: str = DTYPE_AUTO,
    source: str = CURRENT_PLAN,
    lora_file: str | None = None,
    evaluate: bool = False,
    progress: Any = None,
) -> tuple[str, str]:
    """Export the student in ``fmt_name`` and zip the folder: (zip path, summary Markdown).
    ``evaluate`` scores teacher and student on held-out samples for the card first."""
    report = ProgressAdapter(progress) if progress is not None else (lambda *a, **k: None)
    export.check_format(fmt_name)
    chosen = None if dtype in (None, DTYPE_AUTO) else export.check_dtype(dtype)
    if lora_file:
        lora.check_lora_file(lora_file)
    base = store.base(view["base"] if source in (None, CURRENT_PLAN) else _run_base(source, view))
    export.check_base_for(fmt_name, base)  # before loading anything
    if evaluate and not base.has_pipeline:
        raise WorkbenchError(f"scoring for the card draws images, but {base.name!r} has no pipeline")
    student, name = _student(store, view, plan, source or CURRENT_PLAN, report)
    needs_pipe = evaluate or fmt_name in export.NEEDS_PIPELINE
    pipe = store.pipeline(name, ProgressAdapter(report, 0.5, 0.6)) if needs_pipe else None
    evaluation = None
    if evaluate:
        report(0.55, "scoring teacher and student on held-out samples")
        evaluation = export.evaluate(student, pipe)
    folder_name = _folder_name(student, fmt_name)
    work = _fresh_workdir()
    result = export.export(
        student, fmt_name, work / folder_name, chosen, pipeline=pipe, evaluation=evaluation, lora_file=lora_file,
        progress=ProgressAdapter(report, 0.6, 0.9),
    )  # fmt: skip
    report(0.92, "zipping")
    archive = zip_folder(result.out, work / f"{folder_name}.zip")
    shutil.rmtree(result.out)  # the zip is what is handed out
    return str(archive), summary_md(student, result, folder_name)


def _run_base(run_dir: str, view: dict[str, Any]) -> str:
    return export.read_student_folder(run_dir).base_name() or view["base"]


def _folder_name(student: export.Student, fmt_name: str) -> str:
    what = (
        Path(student.run.root).name
        if student.trained
        else f"{slug(student.base.name)}-{len(student.spec.removed)}removed"
    )
    return f"student-{what}-{fmt_name}"


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip ``folder`` under its own name; weights are stored, not deflated (they don't shrink)."""
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                packed = (
                    zipfile.ZIP_STORED if path.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                )
                z.write(path, f"{folder.name}/{path.relative_to(folder)}", compress_type=packed)
    return archive


_WORKDIRS: list[Path] = []  # this process's export folders; an SDXL student is ~5 GB


def _fresh_workdir() -> Path:
    """A new export folder; earlier ones go (Gradio has copied their zip into its own cache)."""
    while _WORKDIRS:
        shutil.rmtree(_WORKDIRS.pop(), ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="workbench-export-"))
    _WORKDIRS.append(work)
    return work


def summary_md(student: export.Student, result: export.ExportResult, folder_name: str) -> str:
    spec = student.spec
    notes = "\n\n" + fmt.bullets(fmt.escape(n) for n in spec.notes) if spec.notes else ""
    files = ", ".join(fmt.code(f) for f in result.files if "/" not in f or f.startswith("lora/"))
    what = "trained student" if student.trained else "student (initialised from the teacher, not distilled)"
    lines = [
        f"**{folder_name}.zip**: {FORMAT_LABELS[result.fmt]}, {result.dtype}, the {what}: "
        f"{fmt.params(spec.student_params)} of {fmt.params(spec.teacher_params)} UNet params, "
        f"{len(spec.removed)} units removed.{notes}",
        f"Files: {files}. `README.md` is the model card: how to load it, what was removed, its cost.",
        "Load it: " + _how_to_load(result, folder_name),
    ]
    if result.fmt in export.FILE_FORMATS:
        lines.append("**Single-file clients**\n\n" + fmt.bullets(client_notes(student.base, student.spec)))
    if result.lora_report is not None:
        lines.append("**LoRA** (remapped into `lora/`)\n\n" + fmt.bullets(result.lora_report.lines()))
    return "\n\n".join(lines)


def _how_to_load(result: export.ExportResult, folder: str) -> str:
    return {
        "diffusers": f'`UNet2DConditionModel.from_pretrained("{folder}")`, passed as `unet=` to the teacher\'s pipeline',
        "pipeline": f'`DiffusionPipeline.from_pretrained("{folder}")`: the stock pipeline class, no custom code',
        "single-file": f'`UNet2DConditionModel.from_single_file("{folder}/{result.weights_file}", config="{folder}")`',
        "checkpoint": f"ComfyUI's 'Load Checkpoint' with `{result.weights_file}` (see the clients below)",
    }[result.fmt]


def formats_md(store: Store, view: dict[str, Any], plan: list[str]) -> str:
    """What each format needs, and which single-file clients recognise the current plan's structure."""
    try:
        spec = store.spec(view["base"], plan)
    except WorkbenchError as err:
        return f"Plan not exportable: {fmt.escape(str(err))}"
    base = store.base(view["base"])
    support = client_support(spec.config)
    shape = (
        f"the published **{support.structure}** structure" if support.structure else "no published structure"
    )
    head = f"Structure: {fmt.escape(spec.topology.describe())}" + (
        "." if base.kind == "toy" else f": {shape}."
    )
    needs = (
        ""
        if base.has_pipeline
        else " The pipeline and checkpoint formats need a teacher with a full pipeline."
    )
    return head + needs + "\n\n" + fmt.bullets(client_notes(base, spec))


def lora_md(
    store: Store, view: dict[str, Any], plan: list[str], lora_file: str | None, source: str = CURRENT_PLAN
) -> str:
    """The report for an uploaded teacher LoRA on the current plan's (or the run's) student."""
    if not lora_file:
        return ""
    lora.check_lora_file(lora_file)
    if source and source != CURRENT_PLAN:
        info = export.read_student_folder(source)
        base, layer_map = store.base(info.base_name() or view["base"]), info.layer_map
    else:
        base, layer_map = store.base(view["base"]), store.spec(view["base"], plan).layer_map
    _, report = lora.remap(lora.read_lora(lora_file, base), layer_map)
    return f"**{fmt.escape(Path(lora_file).name)}** on this student:\n\n" + fmt.bullets(
        fmt.escape(s) for s in report.lines()
    )


def source_box(ctx: Shared, elem_id: str) -> gr.Dropdown:
    """The Student picker: the current plan, then the page's runs with a trained student (filled
    once the page knows its visitor, by ``wire_source``)."""
    choices = source_choices(visible_runs(ctx.settings, None))
    return gr.Dropdown(choices, value=CURRENT_PLAN, label="Student", elem_id=elem_id)


def wire_source(ctx: Shared, source: gr.Dropdown) -> None:
    """The picker lists the visitor's runs once known, and runs finished since, when it is opened."""
    refresh = {
        "fn": lambda visitor: gr.update(choices=source_choices(visible_runs(ctx.settings, visitor))),
        "inputs": ctx.visitor, "outputs": source, "api_visibility": "private",
    }  # fmt: skip
    ctx.visitor_ready.then(**refresh)
    source.focus(**refresh)


def build(ctx: Shared) -> None:
    gr.Markdown(
        "### Export a student\nThe current plan's student (the teacher's remaining layers and transformer "
        "blocks, in order, as a stock `UNet2DConditionModel`) or a trained run's student, with its model card."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            source = source_box(ctx, "wb-export-source")
            fmt_box = gr.Radio(
                [(label, key) for key, label in FORMAT_LABELS.items()], value="diffusers", label="Format",
                elem_id="wb-export-format",
            )  # fmt: skip
            dtype = gr.Dropdown(
                [("auto (fp16 single files, fp32 folders)", DTYPE_AUTO), "fp32", "fp16", "bf16"],
                value=DTYPE_AUTO, label="Weights dtype",
            )  # fmt: skip
            lora_in = gr.File(
                label="Teacher LoRA (.safetensors, optional)", file_types=[".safetensors"], type="filepath"
            )
            scored = gr.Checkbox(
                False,
                label="Score teacher and student for the card (20 held-out prompts x 2 seeds; minutes on a CPU)",
            )
            go = gr.Button("Export and zip", variant="primary")
        with gr.Column(scale=2):
            formats = gr.Markdown(elem_id="wb-export-formats")
            lora_report = gr.Markdown(elem_id="wb-export-lora")
    with gr.Row(equal_height=False):
        archive = gr.File(label="Student (.zip)", interactive=False, scale=1)
        summary = gr.Markdown(elem_id="wb-export-summary")
    store, settings = ctx.store, ctx.settings

    def own(source_dir: str | None, visitor: str | None) -> str:
        return own_source(settings, visitor, source_dir)

    @inline_errors(n_outputs=2, status_at=1)
    def on_export(view, plan, fmt_name, dtype_name, source_dir, lora_path, scores, visitor, progress=gr.Progress()):
        source_dir = own(source_dir, visitor)
        return export_student(
            store, view, plan, fmt_name, dtype_name, source_dir, lora_path, scores, progress
        )

    @inline_errors(n_outputs=1, status_at=0)
    def on_lora(view, plan, lora_path, source_dir, visitor):
        return lora_md(store, view, plan, lora_path, own(source_dir, visitor))

    def on_plan(view, plan):
        return formats_md(store, view, plan)

    go.click(
        on_export, [ctx.view, ctx.plan, fmt_box, dtype, source, lora_in, scored, ctx.visitor], [archive, summary],
        api_visibility="private", **ctx.model_event(),
    )  # fmt: skip
    lora_in.change(
        on_lora, [ctx.view, ctx.plan, lora_in, source, ctx.visitor], lora_report, api_visibility="private"
    )
    ctx.plan.change(on_plan, [ctx.view, ctx.plan], formats, api_visibility="private")
    ctx.demo.load(on_plan, [ctx.view, ctx.plan], formats, api_visibility="private")
    wire_source(ctx, source)
