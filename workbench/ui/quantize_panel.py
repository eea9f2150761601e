"""Export tab, quantisation: what a quantised student costs and saves, before shipping it.

*Estimate* needs no weights: the UNet's weight bytes in fp16 and quantised, the share of its
parameters the scheme quantises (Linear weights only), and the peak memory of sampling at a
resolution with a verdict per GPU size, for the teacher and the current plan's student
(``workbench.quantize``). *Measure* builds the student, quantises it, and times both on the
CPU side by side, with the quantised output's difference from the unquantised one.
*Export* writes the quantised diffusers folder with its model card and hands it out as a zip.
The lead wires ``build(ctx)`` into the Export tab.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from workbench import quantize
from workbench.cost import latent_size
from workbench.errors import WorkbenchError
from workbench.memory import GIB
from workbench.ui import format as fmt
from workbench.ui.export_tab import (
    CURRENT_PLAN,
    _fresh_workdir,
    _student,
    own_source,
    slug,
    source_box,
    wire_source,
    zip_folder,
)
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors
from workbench.ui.store import Store

SCHEME_LABELS = {
    "int8": "int8 weight-only",
    "int8-dynamic": "int8 weights + dynamic int8 activations",
    "int4": "int4 weight-only (CUDA)",
    "fp8": "fp8 weight-only (CUDA, sm 8.9+)",
}
RESOLUTIONS = (512, 768, 1024)


# ------------------------------------------------------------------ plain functions (no gradio)


def size(n: int) -> str:
    """Bytes as GiB from 1 GiB up, else MB (toy models are a few MB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1e6:,.1f} MB"


def _activations(store: Store, name: str, config: dict[str, Any], key: tuple, resolution: int) -> int:
    base = store.base(name)
    latent = latent_size(config, resolution, base.vae_scale_factor)
    return store.memo(("quantize-acts", name, key, latent), lambda: quantize.activation_bytes(config, latent))


def estimate_md(store: Store, view: dict[str, Any], plan: list[str], scheme: str, resolution: int) -> str:
    """Weight bytes, quantised share and inference memory (fp16 vs ``scheme``), teacher and student."""
    if scheme not in quantize.SCHEMES:
        raise WorkbenchError(f"unknown quantisation {scheme!r}; choose one of {', '.join(quantize.SCHEMES)}")
    name = view["base"]
    base, spec = store.base(name), store.spec(name, plan)
    rows, verdict_rows = [], []
    for who, config, key in (
        ("teacher", base.unet_config, ()),
        ("student", spec.config, tuple(spec.plan.removed)),
    ):
        acts = _activations(store, name, config, key, resolution)
        share = quantize.param_share(config, scheme)
        for label, s in (("fp16", None), (scheme, scheme)):
            mem = quantize.inference_memory(config, base, s, resolution, activations=acts)
            rows.append([f"{who}, {label}", size(mem.unet_bytes),
                         f"{share.share:.1%}" if s else "-", size(mem.total)])  # fmt: skip
            verdict_rows.append([f"{who}, {label}", *mem.verdicts().values()])
    sizes = [f"{gb} GB" for gb in quantize.INFERENCE_GPU_SIZES_GB]
    notes = quantize.inference_memory(spec.config, base, scheme, resolution, activations=1).notes
    return "\n\n".join(
        [
            f"**{SCHEME_LABELS[scheme]}** at {resolution} px (sampling in fp16, batch 2 for guidance):",
            fmt.table(["UNet", "weights", "quantised share", "sampling peak"], rows),
            fmt.table(["UNet", *sizes], verdict_rows),
            fmt.bullets(
                [
                    "only Linear weights are quantised; convolutions, norms and biases stay in fp16",
                    "peak = UNet weights + one guided UNet step's activations (fake tensors) + text encoders "
                    "and VAE in fp16; 'fits' keeps 1 GiB for the CUDA context and a 10% margin",
                    *notes,
                ]
            ),  # fmt: skip
        ]
    )


def _reporter(progress: Any):
    return ProgressAdapter(progress) if progress is not None else (lambda *a, **k: None)


def measure_md(
    store: Store,
    view: dict[str, Any],
    plan: list[str],
    scheme: str,
    source: str = CURRENT_PLAN,
    progress: Any = None,
) -> str:
    """Quantise the student on the CPU and time it beside the fp32 one (one run, interleaved)."""
    report = _reporter(progress)
    quantize.check_scheme(scheme, None, "cpu")
    student, _ = _student(store, view, plan, source or CURRENT_PLAN, report)
    report(0.5, f"quantising the student ({scheme})")
    quantized = quantize.quantize_unet(student.unet, scheme, None, "cpu")
    report(0.7, "timing fp32 and quantised forwards side by side")
    cost = quantize.compare(student.unet, quantized, scheme, repeats=3)
    return f"**Measured on this machine's CPU** ({SCHEME_LABELS[scheme]}):\n\n" + fmt.bullets(
        fmt.escape(line) for line in quantize.cost_lines(cost)
    )


def export_zip(
    store: Store,
    view: dict[str, Any],
    plan: list[str],
    scheme: str,
    source: str = CURRENT_PLAN,
    progress: Any = None,
) -> tuple[str, str]:
    """The quantised student as a diffusers folder, zipped: (zip path, summary Markdown)."""
    report = _reporter(progress)
    quantize.check_scheme(scheme)  # one line, before any weight is loaded
    student, _ = _student(store, view, plan, source or CURRENT_PLAN, report)
    what = (
        slug(Path(student.run.root).name)
        if student.trained
        else f"{slug(student.base.name)}-{len(student.spec.removed)}removed"
    )
    folder = f"student-{what}-{scheme}"
    work = _fresh_workdir()
    report(0.5, f"quantising and writing ({scheme})")
    result = quantize.export_quantized(student, scheme, work / folder)
    archive = zip_folder(result.out, work / f"{folder}.zip")
    shutil.rmtree(result.out)
    return str(archive), (
        f"**{folder}.zip**: diffusers UNet folder, {SCHEME_LABELS[scheme]} with {result.library} "
        f"({result.share:.1%} of the parameters quantised, the rest {result.dtype}); weights "
        f"{result.weights_bytes / 1e6:,.1f} MB. Load it: "
        f'`UNet2DConditionModel.from_pretrained("{folder}", dtype=torch.float32)` (see its README.md).'
    )


# ------------------------------------------------------------------ the panel


def build(ctx: Shared) -> None:
    gr.Markdown(
        "### Quantise the student\nInt8 / int4 / fp8 weights with torchao, loadable by stock diffusers: "
        "what it saves (weights, sampling memory per GPU) and costs (CPU speed, output change)."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            source = source_box(ctx, "wb-quant-source")
            scheme = gr.Radio(
                [(label, key) for key, label in SCHEME_LABELS.items()], value="int8", label="Quantisation",
                elem_id="wb-quant-scheme",
            )  # fmt: skip
            resolution = gr.Dropdown(list(RESOLUTIONS), value=1024, label="Sampling resolution (px)")
            with gr.Row():
                estimate = gr.Button("Estimate")
                measure = gr.Button("Measure on CPU")
                go = gr.Button("Export quantised", variant="primary")
        with gr.Column(scale=2):
            table = gr.Markdown(elem_id="wb-quant-estimate")
            measured = gr.Markdown(elem_id="wb-quant-measured")
            exported = gr.Markdown(elem_id="wb-quant-exported")
    archive = gr.File(label="Quantised student (.zip)", interactive=False)
    store, settings = ctx.store, ctx.settings

    @inline_errors(n_outputs=1, status_at=0)
    def on_estimate(view, plan, scheme_name, px):
        return estimate_md(store, view, plan, scheme_name, int(px))

    @inline_errors(n_outputs=1, status_at=0)
    def on_measure(view, plan, scheme_name, source_dir, visitor, progress=gr.Progress()):
        source_dir = own_source(settings, visitor, source_dir)
        return measure_md(store, view, plan, scheme_name, source_dir, progress)

    @inline_errors(n_outputs=2, status_at=1)
    def on_export(view, plan, scheme_name, source_dir, visitor, progress=gr.Progress()):
        source_dir = own_source(settings, visitor, source_dir)
        return export_zip(store, view, plan, scheme_name, source_dir, progress)

    estimate.click(on_estimate, [ctx.view, ctx.plan, scheme, resolution], table, api_visibility="private")
    measure.click(
        on_measure,
        [ctx.view, ctx.plan, scheme, source, ctx.visitor],
        measured,
        api_visibility="private",
        **ctx.model_event(),
    )
    go.click(
        on_export, [ctx.view, ctx.plan, scheme, source, ctx.visitor], [archive, exported], api_visibility="private",
        **ctx.model_event(),
    )  # fmt: skip
    wire_source(ctx, source)
