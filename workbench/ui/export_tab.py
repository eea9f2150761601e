"""Export tab: the student of the current plan, built from the loaded teacher's weights, as a zip.

The zip holds a stock diffusers UNet folder (``config.json`` + safetensors) with ``plan.json``
and ``layer_map.json`` beside it (``surgery.save_student``): ``from_pretrained`` loads it with
no custom code. Trained students from distillation runs will join this tab with the Distill tab.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr

from workbench.surgery import save_student
from workbench.ui import format as fmt
from workbench.ui.shared import ProgressAdapter, Shared, user_errors
from workbench.ui.store import Store


def slug(text: str) -> str:
    """A file-name-safe version of a base name or hub id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-.") or "model"


def export_student(
    store: Store, view: dict[str, Any], plan: list[str], progress: Any = None
) -> tuple[str, str]:
    """Build the student, save it as a diffusers folder and zip it: (zip path, summary Markdown)."""
    report = ProgressAdapter(progress) if progress is not None else (lambda *a, **k: None)
    name = view["base"]
    store.spec(name, plan)  # an impossible plan is refused before any weight is loaded
    student, spec = store.student(name, plan, ProgressAdapter(report, 0.0, 0.6))
    folder_name = f"student-{slug(name)}-{len(spec.removed)}removed"
    work = _fresh_workdir()
    report(0.7, "saving the diffusers folder")
    save_student(student, spec, work / folder_name)
    report(0.85, "zipping")
    archive = zip_folder(work / folder_name, work / f"{folder_name}.zip")
    files = sorted(p.name for p in (work / folder_name).iterdir())
    shutil.rmtree(work / folder_name)  # the zip is what is handed out
    return str(archive), summary_md(store.base(name).location, spec, folder_name, files)


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


def summary_md(teacher_location: str, spec: Any, folder_name: str, files: list[str]) -> str:
    notes = "\n\n" + fmt.bullets(fmt.escape(n) for n in spec.notes) if spec.notes else ""
    return (
        f"**{folder_name}.zip** — {fmt.params(spec.student_params)} of {fmt.params(spec.teacher_params)} "
        f"UNet params, {len(spec.removed)} units removed; {', '.join(fmt.code(f) for f in files)}.{notes}\n\n"
        "Load it like any diffusers UNet and drop it into the teacher's pipeline:\n\n"
        "```python\n"
        "from diffusers import DiffusionPipeline, UNet2DConditionModel\n\n"
        f'unet = UNet2DConditionModel.from_pretrained("{folder_name}")\n'
        f'pipe = DiffusionPipeline.from_pretrained("{teacher_location}", unet=unet)\n'
        "```\n"
        "It is initialised from the teacher's kept layers and not distilled yet."
    )


def build(ctx: Shared) -> None:
    gr.Markdown(
        "### Student of the current plan\nBuilt from the loaded teacher's weights: the teacher's remaining "
        "layers and transformer blocks, in order, as a stock `UNet2DConditionModel`."
    )
    go = gr.Button("Build student and zip it", variant="primary")
    with gr.Row(equal_height=False):
        archive = gr.File(label="Student (.zip)", interactive=False, scale=1)
        summary = gr.Markdown(elem_id="wb-export-summary")
    store = ctx.store

    @user_errors
    def on_export(view, plan, progress=gr.Progress()):
        return export_student(store, view, plan, progress)

    go.click(
        on_export, [ctx.view, ctx.plan], [archive, summary], api_visibility="private", **ctx.model_event()
    )
