"""Distill tab: launch a distillation run in the background, watch it, stop, resume, export.

A run is an ordinary ``python -m workbench distill`` process (``workbench.jobs``); this tab
only writes its options and then reads its run folder (status, metrics, samples), so runs
started from a shell, or before a page reload or an app restart, show up the same way.

On the owner's machine the page sees every run in ``runs/``. On a shared Space a page sees
only its visitor's runs (``Runs``, ``workbench.space``): data comes as an upload, never a
path; rewards and stages are the app's own names; runs wait in one queue for the CPU.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from workbench import jobs, memory, space
from workbench.distill_config import (
    CHOICES,
    FEATURE_MODES,
    FEATURE_WEIGHTS,
    LCD_STAGE,
    PRECISIONS,
    STAGE_TEACHERS,
    WHOLE,
    DistillConfig,
    launch_job,
    options,
    preflight,
    stage_fields,
    stage_list,
)
from workbench.errors import ConfigError, WorkbenchError
from workbench.plan import PruningPlan
from workbench.presets import check_name, list_presets, load_preset
from workbench.runs import ACTIVE, RunDir, effective_state, list_runs, read_metrics
from workbench.ui import format as fmt
from workbench.ui.settings import AppSettings, Limits
from workbench.ui.shared import Shared, inline_errors, plot, user_errors
from workbench.ui.store import Store
from workbench.ui.visitors import Runs, as_runs, page_runs, visible_runs

CURRENT_PLAN = "(current plan)"
MAX_POINTS = 400  # points per curve in the loss plot; longer runs are strided
POLL_S = 2.0
SAMPLE_PX = 512  # a smaller sample grid is shown enlarged to at least this width
MAIN_TERMS = ("loss/total", "loss/task", "loss/out", "loss/feat", "loss/lcd", "loss/reward")
# The form is generated from the options' declarations (``distill_config.Option``): every
# option with a label gets a box, with its label and hint; a field in CHOICES a dropdown, a text
# field a text box, any other a number box, each starting at the field's default. The main
# rows place the common ones (LAID_OUT); the lcd_ ones go under "LCD stage options", and any
# other labelled option under "More options", so a new option needs no line here.
OPTIONS = options()
FORM_KEYS = tuple(name for name, opt in OPTIONS.items() if opt.label)  # declaration order
LAID_OUT = ("data", "toy_samples", "steps", "batch_size", "lr", "w_task", "w_out", "w_feat", "feature_mode",
            "mixed_precision", "stage_teacher", "feature_weights", "freeze_sensitive", "sample_every",
            "checkpoint_every")  # fmt: skip
LCD_KEYS = tuple(name for name in FORM_KEYS if name.startswith("lcd_"))
MORE_KEYS = tuple(name for name in FORM_KEYS if name not in LAID_OUT and name not in LCD_KEYS)
# Where the app starts differently from the run's own defaults (short runs, frequent feedback).
APP_DEFAULTS = {"steps": 200, "toy_samples": 512, "sample_every": 50, "checkpoint_every": 50}
FORM_DEFAULTS = {k: v for k, v in (DistillConfig.defaults() | APP_DEFAULTS).items() if k in FORM_KEYS}
OPTIONAL = {k for k, v in FORM_DEFAULTS.items() if v is None}  # empty box: the run's default (None)
# the fields a number box sets (not a choice, not text)
NUMBERS = {
    k for k in FORM_KEYS if k not in CHOICES and "str" not in str(DistillConfig.__dataclass_fields__[k].type)
}
LCD_LABEL = "End with an LCD stage (few-step student)"
# What the page calls each option: its declared label; and the boxes that set the others.
LABELS = {name: OPTIONS[name].label for name in FORM_KEYS} | {
    "base": "Teacher model", "stages": "Plan / progressive stages", "objectives": "stage kinds",
}  # fmt: skip


def label_of(field: str) -> str:
    """The page's name for a DistillConfig field (one the form does not show: in words)."""
    return LABELS.get(field, field.replace("_", " "))


def explain(err: WorkbenchError) -> str:
    """An error as the page says it: options named by their labels, not their CLI flags."""
    text = err.phrased(label_of) if isinstance(err, ConfigError) else str(err)
    if (
        isinstance(err, ConfigError)
        and err.field in NUMBERS
        and err.template.startswith("{field} is missing")
    ):
        text += " (the box is empty, or holds a number too large to read, like 1e400)"  # both arrive as None
    return text[:1].upper() + text[1:] if text[:1].isascii() else text  # not λ -> Λ


def form_fields(form: dict[str, Any]) -> dict[str, Any]:
    """The DistillConfig fields of a form; keys it leaves out take the defaults. A Number box
    hands back 2.0 for 2: whole numbers become ints; 2.5 and empty boxes (None) stay as they
    are, for the preflight to reject."""
    fields = {k: form.get(k, FORM_DEFAULTS[k]) for k in FORM_KEYS}
    for key, value in fields.items():
        if key in WHOLE and isinstance(value, float) and value.is_integer():
            fields[key] = int(value)
        if key in OPTIONAL and isinstance(value, str) and not value.strip():
            fields[key] = None  # an empty text box: the run's default
        if key in OPTIONAL and key in NUMBERS and isinstance(value, str):
            fields[key] = _number_or_text(value)
    return fields


def _number_or_text(text: str) -> float | str | None:
    """An optional number's text box: empty is None (the run's default), a number its float
    (1e400: inf, which the preflight calls not finite), anything else the text, for the
    preflight to reject."""
    try:
        return float(text) if text.strip() else None
    except ValueError:
        return text


def stage_names(stages: str, lcd: bool = False) -> list[str]:
    """The progressive stages the form names (empty: the plan alone), ending with ``lcd`` when
    the LCD stage is asked for (once, however it is asked)."""
    names = stage_list(stages)
    return names + [LCD_STAGE] if lcd and names[-1:] != [LCD_STAGE] else names


def needs_plan(names: list[str]) -> bool:
    """Whether the Plan picker's plan starts the run: no stage names, or only ``lcd``."""
    return all(n == LCD_STAGE for n in names)


def visitor_form(form: dict[str, Any], choice: str, stages: str, uploaded: str | None) -> dict[str, Any]:
    """A Space visitor's form with every box that could name code or a server path checked:
    data is toy or their upload, the reward the shipped one, plan and stages preset names."""
    if choice != CURRENT_PLAN:
        space.check_preset(choice)
    space.check_stage_names(stage_names(stages))
    return form | {
        "data": space.data_source(form.get("data"), uploaded),
        "lcd_reward": space.check_reward(form.get("lcd_reward")),
    }


# --------------------------------------------------------------------------- launch


def plan_for(store: Store, base: str, choice: str, removed: list[str]) -> PruningPlan:
    """The plan a run trains: the Blocks tab's current plan, or a preset."""
    if choice == CURRENT_PLAN:
        if not removed:
            raise WorkbenchError("the current plan removes nothing; toggle units in Blocks or pick a preset")
        return PruningPlan.empty(store.catalog(base), name="current-plan").with_removed(removed)
    return load_preset(choice)


def form_plan(store: Store, base: str, choice: str, removed: list[str], stages: str,
              lcd: bool) -> PruningPlan | None:  # fmt: skip
    """The Plan picker's plan when it starts the run (no progressive stages named), else None."""
    return plan_for(store, base, choice, removed) if needs_plan(stage_names(stages, lcd)) else None


def run_config(base: str, plan: PruningPlan | None, form: dict[str, Any], stages: str,
               lcd: bool = False) -> DistillConfig:  # fmt: skip
    """The run the form asks for: its plan (or progressive stages, maybe ending with an LCD
    stage) and options."""
    names = stage_names(stages, lcd)
    fields = stage_fields([plan, *names] if needs_plan(names) else names)
    return DistillConfig(base=base, **fields, **form_fields(form))


def check_launch(store: Store, base: str, plan: PruningPlan, form: dict[str, Any], stages: str,
                 limits: Limits, lcd: bool = False) -> DistillConfig:  # fmt: skip
    """Everything the run itself would reject (the preflight), then the app's own limits: the
    validated config the run starts from."""
    config = run_config(base, plan, form, stages, lcd)
    specs = preflight(config, base=store.base(base)).specs
    if limits.max_distill_steps and config.steps * len(specs) > limits.max_distill_steps:
        raise ConfigError(
            "steps",
            "this app runs at most {limit} distillation steps in all; ask for fewer {field}",
            limit=limits.max_distill_steps,
        )
    if limits.max_distill_params and specs[0].teacher_params > limits.max_distill_params:
        raise WorkbenchError(
            f"this app distils teachers up to {fmt.params(limits.max_distill_params)} parameters; run it locally"
        )
    return config


def launch(store: Store, base: str, choice: str, removed: list[str], form: dict[str, Any],
           stages: str, name: str, limits: Limits, root: Runs | Path | None = None, lcd: bool = False,
           uploaded: str | None = None) -> str:  # fmt: skip
    """Validate, then start the run (on a Space: queue it); returns its folder."""
    runs = as_runs(root)
    if runs.space:
        form = visitor_form(form, choice, stages, uploaded)
    plan = form_plan(store, base, choice, removed, stages, lcd)
    config = check_launch(store, base, plan, form, stages, limits, lcd)
    name = check_name(
        (name or "").strip() or f"{time.strftime('%Y%m%d-%H%M%S')}-{plan.name if plan else 'stages'}", "run"
    )
    # The run starts from the config validated here (job.json), not from a command line.
    files, argv = {"job.json": json.dumps(launch_job(config), indent=2)}, ["--from-job"]
    if not runs.space:
        return str(jobs.start_run(runs.folder, name, argv, files=files).root)
    if busy := [r for r in list_runs(runs.folder) if r["state"] in ACTIVE]:
        raise WorkbenchError(
            f"your run {busy[0]['name']!r} is still {busy[0]['state']}; stop it first (one run per visitor here)"
        )
    run = jobs.submit_run(runs.folder, name, argv, files=files)
    runs.dispatch()
    return str(run.root)


def launch_or_explain(store: Store, view: dict[str, Any], removed: list[str], choice: str, stages: str,
                      name: str, values: tuple, limits: Limits, root: Runs | Path | None = None,
                      lcd: bool = False, uploaded: str | None = None) -> tuple:  # fmt: skip
    """Launch from the form's values (in ``FORM_KEYS`` order): (message, run picker update).
    A bad value is named by its label, and nothing starts."""
    fields = dict(zip(FORM_KEYS, values))
    fields["data"] = (fields["data"] or "").strip()
    try:
        run_dir = launch(store, view["base"], choice, removed, fields, stages, name, limits, root, lcd, uploaded)
    except WorkbenchError as err:
        return fmt.error_md(explain(err), "Not launched"), gr.skip()
    state = effective_state(RunDir(Path(run_dir)).read_status())
    started = fmt.ok_md(f"{'queued' if state == 'waiting' else 'started'} {Path(run_dir).name}")
    return started, gr.update(choices=run_choices(root), value=run_dir)


# --------------------------------------------------------------------------- will it fit?


def memory_estimate(store: Store, base: str, choice: str, removed: list[str], form: dict[str, Any],
                    stages: str, lcd: bool = False, visitor: tuple[str | None] | None = None):  # fmt: skip
    """(estimate, cheapest options per GPU size it misses) of the form's run, on a CUDA GPU
    (``workbench.memory``: the real step on fake tensors; nothing is loaded). ``visitor``:
    a Space visitor's upload (a 1-tuple), whose form is checked as for a launch."""
    if visitor is not None:
        form = visitor_form(form, choice, stages, visitor[0])
    plan = form_plan(store, base, choice, removed, stages, lcd)
    config = preflight(run_config(base, plan, form, stages, lcd), base=store.base(base)).config
    result = memory.estimate(config)
    return result, memory.suggestions(config, result)


def memory_md(result: Any, hints: list[dict[str, Any]]) -> str:
    """Peak by category, a verdict per GPU size, and what would make it fit."""
    head = (
        f"**Peak GPU memory {memory.gib(result.total)}** per process, in {result.where}; "
        f"needs about {memory.gib(result.needed())} with the CUDA context and allocator margin. "
        f"<span class='wb-muted'>Estimated in {result.seconds:.1f} s by running the training step on fake "
        "tensors (nothing loaded).</span>"
    )
    cats = fmt.table(
        ["at the peak", "GiB"], [[c, f"{result.categories[c] / memory.GIB:.2f}"] for c in memory.CATEGORIES]
    )
    fixes = {h["gpu_gb"]: h for h in hints}
    rows = [[f"{v['gpu_gb']} GB", v["verdict"], _fix(fixes.get(v["gpu_gb"]))] for v in result.verdicts()]
    phases = "; ".join(f"{fmt.escape(ph.name)}: {memory.gib(ph.total)}" for ph in result.phases)
    notes = "".join(f"\n\n<span class='wb-muted'>{fmt.escape(n)}</span>" for n in result.notes)
    if phases:
        notes = f"\n\n<span class='wb-muted'>Outside the training steps: {phases}.</span>{notes}"
    return f"{head}\n\n{cats}\n\n{fmt.table(['GPU', 'verdict', 'to make it fit'], rows)}{notes}"


def _fix(hint: dict[str, Any] | None) -> str:
    if hint is None:
        return ""
    if not hint["fits"]:
        return "no option the estimate knows"
    return f"{' + '.join(hint['options'])} (peak {hint['total_gb']:.2f} GiB; `{hint['flags']}`)"


def estimate_or_explain(store: Store, view: dict[str, Any], removed: list[str], choice: str, stages: str,
                        values: tuple, lcd: bool = False, visitor: tuple[str | None] | None = None) -> str:  # fmt: skip
    """The memory panel for the form's values (in ``FORM_KEYS`` order), or why there is none."""
    form = dict(zip(FORM_KEYS, values))
    form["data"] = (form["data"] or "").strip()
    try:
        return memory_md(*memory_estimate(store, view["base"], choice, removed, form, stages, lcd, visitor))
    except WorkbenchError as err:
        return fmt.error_md(explain(err), "No estimate")


# --------------------------------------------------------------------------- watch

_METRICS: dict[str, tuple[int | None, int, list[dict[str, Any]]]] = {}  # run folder -> (inode, offset, rows)
_METRICS_LOCK = threading.Lock()


def metrics_rows(run_dir: str) -> list[dict[str, Any]]:
    """All metric rows of a run, read incrementally (each poll reads only new lines)."""
    path = RunDir(Path(run_dir)).metrics
    with _METRICS_LOCK:
        inode, offset, rows = _METRICS.get(run_dir, (None, 0, []))
        now = path.stat().st_ino if path.exists() else None
        # a resume replaces the file (atomically: a new inode), and may regrow it past the offset
        if now != inode or (path.exists() and path.stat().st_size < offset):
            offset, rows = 0, []
        new, offset = read_metrics(path, offset)
        rows = rows + new
        _METRICS[run_dir] = (now, offset, rows)
        return rows


def _stride(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    step = max(1, -(-len(rows) // MAX_POINTS))  # ceil: at most MAX_POINTS + 1 points
    return rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else [])


def loss_figure(rows: list[dict[str, Any]], per_layer: bool) -> dict[str, Any]:
    """Plotly figure: one line per loss term (per feature pair too if asked), log y unless a
    value is <= 0 (a reward-guided LCD total, the mean reward), which a log axis would drop."""
    shown = _stride(rows)
    keys = [k for k in MAIN_TERMS if any(k in r for r in rows)]
    if per_layer:
        keys += sorted({k for r in rows[-1:] for k in r if k.startswith("loss/feat/")})
    traces = [
        {"type": "scatter", "mode": "lines", "name": k.removeprefix("loss/"),
         "x": [r["step"] for r in shown if k in r], "y": [r[k] for r in shown if k in r],
         "line": {"width": 2 if k in MAIN_TERMS else 1}}
        for k in keys
    ]  # fmt: skip
    scale = "log" if all(y > 0 for t in traces for y in t["y"]) else "linear"
    return {
        "data": traces,
        "layout": {
            "height": 360, "margin": {"l": 50, "r": 10, "t": 30, "b": 40},
            "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "loss"}, "type": scale},
            "legend": {"orientation": "h", "y": -0.2}, "title": {"text": "training losses", "x": 0.01},
        },
    }  # fmt: skip


def status_md(run_dir: str | None, runs: Runs | None = None) -> str:
    if not run_dir:
        return "<span class='wb-muted'>No run selected. Launch one, or pick a past run.</span>"
    run = RunDir(Path(run_dir))
    status = run.read_status()
    state = effective_state(status)
    total = status.get("total_steps") or run.read_job().get("config", {}).get("steps", "?")
    line = f"<b>{fmt.escape(run.root.name)}</b>: {state}"
    if state != "waiting":  # a waiting run has no step yet
        line += f", step {status.get('step', 0)} / {total}"
    if status.get("stage"):
        line += f", stage {status['stage']}"
    if status.get("message") and state == "running":  # e.g. measuring the sensitivity map
        line += f"<br>{fmt.escape(status['message'])}"
    if state == "waiting" and runs is not None and (queue := runs.queue_line(run_dir)):
        line += f"<br>{queue}"
    if state == "failed":
        error = status.get("error") or _log_tail(run) or "the process ended without reporting (killed?)"
        hint = "Resume continues from the last checkpoint."
        return f"<div class='wb-error'>{line}<br>{fmt.escape(error)}<br>{hint}</div>"
    css = "wb-ok" if state == "done" else "wb-notice"
    return f"<div class='{css}'>{line}</div>"


def _log_tail(run: RunDir) -> str:
    """The last line the process printed, for runs that died before writing an error."""
    try:
        lines = [line for line in run.log.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return f"last output: {lines[-1]}" if lines else ""


def latest_sample(run_dir: str | None) -> str | None:
    if not run_dir:
        return None
    samples = sorted(RunDir(Path(run_dir)).samples.glob("step_*.png"))
    return str(samples[-1]) if samples else None


def sample_view(run_dir: str | None) -> tuple[str, Any]:
    """(caption, image) of the run's latest sample grid; a grid of small images (the toy's
    64 px) comes enlarged by a whole factor, so it is drawn at a readable size with sharp pixels."""
    path = latest_sample(run_dir)
    if path is None:
        return (
            "<span class='wb-muted'>Samples: none yet (drawn every *Samples every* steps, and at the end).</span>",
            None,
        )
    from PIL import Image

    with Image.open(path) as image:
        image.load()
    k = fmt.enlargement(image.size, SAMPLE_PX)
    step = int(Path(path).stem.removeprefix("step_"))
    shown = f", shown {k}× enlarged" if k > 1 else ""
    caption = f"**Samples at step {step}**: teacher (top row) vs student (bottom row){shown}."
    return caption, fmt.enlarged(image, SAMPLE_PX) if k > 1 else path


def run_choices(root: Runs | Path | None = None) -> list[tuple[str, str]]:
    return [
        (f"{r['name']} ({r['state']}, step {r['step']})", r["run_dir"])
        for r in list_runs(as_runs(root).folder)
    ]


def active_run(root: Runs | Path | None = None) -> str | None:
    """The run in progress (waiting, queued or running), if any: one at a time on this machine."""
    return next((r["run_dir"] for r in list_runs(as_runs(root).folder) if r["state"] in ACTIVE), None)


def picker_on_open(root: Runs | Path | None = None) -> tuple[Any, list[tuple[str, str]]]:
    """A page opens (or reloads): every run, the one in progress selected; and the list shown."""
    choices = run_choices(root)
    return gr.update(choices=choices, value=active_run(root)), choices


def picker_refresh(shown: list[tuple[str, str]] | None, root: Runs | Path | None = None) -> tuple[Any, Any]:
    """The run list with each run's live state and step; untouched while nothing changed (so
    an open list stays open)."""
    choices = run_choices(root)
    if choices == shown:
        return gr.skip(), gr.skip()
    return gr.update(choices=choices), choices


def student_zip(run_dir: str | None, runs: Runs | None = None) -> str:
    """The run's trained student (diffusers folder + plan + layer map + model card) as a zip."""
    run_dir = as_runs(runs).own(run_dir)
    student = RunDir(Path(run_dir)).student
    if not (student / "config.json").exists():
        raise WorkbenchError("this run has no exported student yet; it appears when the run is done")
    out = Path(run_dir) / "export" / f"{Path(run_dir).name}-student"
    out.parent.mkdir(exist_ok=True)
    return shutil.make_archive(str(out), "zip", root_dir=student)


# --------------------------------------------------------------------------- layout


@dataclass
class Form:
    """The New run column; ``fields`` holds one input per ``FORM_KEYS`` entry."""

    plan_choice: Any
    stages: Any
    lcd: Any  # the "end with an LCD stage" checkbox
    name: Any
    fields: dict[str, Any]
    upload: Any  # Space: the visitor's data file (None on the owner's machine)
    uploaded: Any  # Space: the folder the upload was unpacked into (server-side state)
    start: Any
    message: Any
    estimate: Any
    memory: Any


@dataclass
class Watch:
    """The run column: pick a run, see its status, losses and samples; stop, resume, download."""

    picker: Any
    refresh: Any
    status: Any
    per_layer: Any
    losses: Any
    caption: Any
    sample: Any
    stop: Any
    resume: Any
    download: Any
    student_file: Any


def build(ctx: Shared) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            form = _form(ctx.settings)
        with gr.Column(scale=3):
            watch = _watch(ctx.settings)
    _wire_launch(ctx, form, watch)
    _wire_watch(ctx, form, watch)


def _form(settings: AppSettings) -> Form:
    limits, D = settings.limits, FORM_DEFAULTS
    gr.Markdown("### New run\nTrains the student of a plan against the loaded teacher (its own process).")
    plan_choice = gr.Dropdown(
        [CURRENT_PLAN, *list_presets()], value=CURRENT_PLAN, label="Plan", elem_id="wb-distill-plan"
    )
    stages = gr.Textbox(
        label="Progressive stages (optional)",
        placeholder="e.g. ssd-1b, segmind-vega (or ssd-1b, lcd)",
        elem_id="wb-distill-stages",
    )
    lcd = gr.Checkbox(
        False, label=LCD_LABEL, elem_id="wb-distill-lcd",
        info="latent consistency distillation after the plan's stages: a student that samples in 1-8 "
        "LCM steps (its options below)",
    )  # fmt: skip
    f: dict[str, Any] = {}

    def number(key: str, value: Any = None, **kw: Any) -> gr.Number:
        # No precision and no minimum: Gradio would round 2.5 to 2, or refuse -1 with its own
        # error; the run's preflight judges every value and the page names the box.
        value = D[key] if value is None else value
        return gr.Number(value, label=LABELS[key], elem_id="wb-distill-" + key.replace("_", "-"), **kw)

    data_info = (
        "toy, or a file you upload here (this Space takes no server paths)"
        if settings.space
        else "toy, an image folder, or a .txt prompt file"
    )
    with gr.Row():
        f["data"] = gr.Textbox(D["data"], label=LABELS["data"], info=data_info, scale=3, elem_id="wb-distill-data")
        f["toy_samples"] = number("toy_samples")
    upload = gr.File(
        label="Your data: a .zip of images with NAME.txt captions (or a metadata.jsonl), or a .txt of prompts",
        file_types=[".zip", ".txt"], type="filepath", visible=settings.space, elem_id="wb-distill-upload",
    )  # fmt: skip
    with gr.Row():
        f["steps"] = number("steps", min(D["steps"], limits.max_distill_steps or D["steps"]))
        f["batch_size"] = number("batch_size")
        f["lr"] = number("lr")
    with gr.Row():
        f["w_task"], f["w_out"], f["w_feat"] = number("w_task"), number("w_out"), number("w_feat")
    with gr.Row():
        for key, choices in (("feature_mode", FEATURE_MODES), ("mixed_precision", PRECISIONS),
                             ("stage_teacher", STAGE_TEACHERS)):  # fmt: skip
            f[key] = gr.Dropdown(list(choices), value=D[key], label=LABELS[key])
    with gr.Row():
        f["feature_weights"] = gr.Dropdown(
            list(FEATURE_WEIGHTS), value=D["feature_weights"], label=LABELS["feature_weights"],
            info=OPTIONS["feature_weights"].hint, elem_id="wb-distill-feature-weights",
        )  # fmt: skip
        f["freeze_sensitive"] = number("freeze_sensitive", info=OPTIONS["freeze_sensitive"].hint)
    with gr.Row():
        f["sample_every"], f["checkpoint_every"] = number("sample_every"), number("checkpoint_every")
        name = gr.Textbox(label="Run name (optional)", elem_id="wb-distill-name")
    with gr.Accordion("LCD stage options", open=False, elem_id="wb-distill-lcd-options"):
        with gr.Row():
            for key in LCD_KEYS:
                f[key] = _box(key, OPTIONS[key].hint)
    if MORE_KEYS:  # options declared with a label that the rows above do not place
        with gr.Accordion("More options", open=False, elem_id="wb-distill-more-options"):
            with gr.Row():
                for key in MORE_KEYS:
                    f[key] = _box(key, OPTIONS[key].hint or OPTIONS[key].help)
    start = gr.Button("Launch run", variant="primary", elem_id="wb-distill-launch")
    message = gr.Markdown(elem_id="wb-distill-message")
    with gr.Accordion("Will it fit? GPU memory of this run", open=True):
        estimate = gr.Button("Estimate GPU memory", size="sm", elem_id="wb-distill-estimate")
        memory_box = gr.Markdown(
            "<span class='wb-muted'>Peak memory by category, a verdict for 16-80 GB GPUs and the cheapest "
            "options that make it fit, before anything is loaded.</span>",
            elem_id="wb-distill-memory",
        )
    return Form(plan_choice, stages, lcd, name, f, upload, gr.State(None), start, message, estimate, memory_box)


def _box(key: str, info: str) -> Any:
    """The input of a DistillConfig field, from its default and type: a dropdown of its
    choices, a number box (no rounding and no bounds: the preflight judges, the page names
    the box), or a text box: for text, and for a number whose default is None (empty: the
    run's default), since Gradio's number box shows and sends an empty value as 0."""
    value, kw = FORM_DEFAULTS[key], {"label": LABELS[key], "info": info, "min_width": 140}
    elem_id = "wb-distill-" + key.replace("_", "-")
    if key in CHOICES:
        return gr.Dropdown(list(CHOICES[key]), value=value, elem_id=elem_id, **kw)
    if key in NUMBERS and key not in OPTIONAL:
        return gr.Number(value, elem_id=elem_id, **kw)
    return gr.Textbox(value or "", elem_id=elem_id, **kw)


def _watch(settings: AppSettings) -> Watch:
    with gr.Row():
        # A Space page lists its visitor's runs once it knows them (never the folder of all runs).
        picker = gr.Dropdown(
            [] if settings.space else run_choices(), label="Run", scale=4, allow_custom_value=False, elem_id="wb-run-picker"
        )
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id="wb-run-refresh")
    status = gr.Markdown(status_md(None), elem_id="wb-run-status")
    per_layer = gr.Checkbox(False, label="show per-layer feature terms")
    losses = gr.Plot(label="losses", elem_id="wb-loss-plot")
    caption = gr.Markdown(elem_id="wb-sample-caption")
    # The caption above, not Gradio's label, which would cover the teacher row.
    sample = gr.Image(show_label=False, type="filepath", format="png", elem_id="wb-sample", interactive=False)
    with gr.Row():
        stop = gr.Button("Stop", elem_id="wb-distill-stop")
        resume = gr.Button("Resume")
        download = gr.Button("Download student (zip)")
    student_file = gr.File(label="student", visible=True)
    return Watch(
        picker, refresh, status, per_layer, losses, caption, sample, stop, resume, download, student_file
    )


def _wire_launch(ctx: Shared, form: Form, watch: Watch) -> None:
    settings, private = ctx.settings, {"api_visibility": "private"}

    def on_launch(view, removed, choice, stage_text, lcd, run_name, visitor, uploaded, *values):
        try:
            runs = page_runs(settings, visitor)
        except WorkbenchError as err:
            return fmt.error_md(explain(err), "Not launched"), gr.skip()
        return launch_or_explain(
            ctx.store, view, removed, choice, stage_text, run_name, values, settings.limits, runs, lcd, uploaded
        )

    inputs = [
        ctx.view,
        ctx.plan,
        form.plan_choice,
        form.stages,
        form.lcd,
        form.name,
        ctx.visitor,
        form.uploaded,
        *(form.fields[k] for k in FORM_KEYS),
    ]
    form.start.click(on_launch, inputs, [form.message, watch.picker], concurrency_limit=1, **private)

    def on_estimate(view, removed, choice, stage_text, lcd, _name, _visitor, uploaded, *values):
        visitor = (uploaded,) if settings.space else None
        return estimate_or_explain(ctx.store, view, removed, choice, stage_text, values, lcd, visitor)

    form.estimate.click(on_estimate, inputs, form.memory, concurrency_limit=1, **private)

    def on_upload(path, visitor):
        if not path:
            return gr.skip(), None, ""
        try:
            source, summary = space.unpack_data(path, page_runs(settings, visitor).folder, settings.limits.upload)
        except WorkbenchError as err:
            return gr.skip(), None, fmt.error_md(str(err), "Upload refused")
        shown = space.UPLOADED + Path(path).name
        return shown, source, fmt.ok_md(f"{fmt.escape(shown)}: {summary}; the Data box now names it")

    form.upload.upload(
        on_upload, [form.upload, ctx.visitor], [form.fields["data"], form.uploaded, form.message],
        concurrency_limit=1, **private,
    )  # fmt: skip


def _wire_watch(ctx: Shared, form: Form, w: Watch) -> None:
    settings, private = ctx.settings, {"api_visibility": "private"}

    def on_tick(run_dir, layers, visitor):
        try:
            runs = page_runs(settings, visitor)
            runs.dispatch()  # a waiting run starts as soon as the Space has room
            run_dir = runs.own(run_dir) if run_dir else None
        except WorkbenchError as err:
            return fmt.error_md(str(err)), gr.skip(), gr.skip(), gr.skip()
        if not run_dir:
            return status_md(None), gr.skip(), gr.skip(), gr.skip()
        return (
            status_md(run_dir, runs), plot(loss_figure(metrics_rows(run_dir), layers)), *sample_view(run_dir)
        )  # fmt: skip

    outputs = [w.status, w.losses, w.caption, w.sample]
    watched = [w.picker, w.per_layer, ctx.visitor]
    timer = gr.Timer(POLL_S)
    timer.tick(on_tick, watched, outputs, show_progress="hidden", **private)
    w.picker.change(on_tick, watched, outputs, **private)
    w.per_layer.change(on_tick, watched, outputs, **private)
    shown = gr.State(None)  # the run list as this page shows it

    def on_refresh(shown_now, visitor):
        return picker_refresh(shown_now, visible_runs(settings, visitor))

    def on_open(visitor):
        return picker_on_open(visible_runs(settings, visitor))

    listing = {"inputs": [shown, ctx.visitor], "outputs": [w.picker, shown], **private}
    timer.tick(on_refresh, show_progress="hidden", **listing)  # states change: stopped, done
    w.refresh.click(on_refresh, **listing)
    # Runs started from a shell or before a reload/restart appear when the page opens (once
    # the visitor is known), and the one in progress is selected.
    ctx.visitor_ready.then(on_open, ctx.visitor, [w.picker, shown], **private)
    acts = [w.picker, ctx.visitor]
    w.stop.click(inline_errors(1, 0)(lambda r, v: _stop(r, page_runs(settings, v))), acts, form.message, **private)
    w.resume.click(
        inline_errors(1, 0)(lambda r, v: _resume(r, page_runs(settings, v))), acts, form.message, **private
    )
    w.download.click(
        user_errors(lambda r, v: student_zip(r, page_runs(settings, v))), acts, w.student_file, **private
    )


def _stop(run_dir: str | None, runs: Runs | None = None) -> str:
    jobs.stop_run(as_runs(runs).own(run_dir))
    return "<div class='wb-notice'>stop requested: the run checkpoints and stops after its current step</div>"


def _resume(run_dir: str | None, runs: Runs | None = None) -> str:
    runs = as_runs(runs)
    jobs.resume_run(runs.own(run_dir), queued=runs.space)
    runs.dispatch()
    return "<div class='wb-ok'>resumed</div>"
