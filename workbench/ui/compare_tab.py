"""Compare tab: the same prompt and seeds through the teacher and the student of the current plan.

Both use the teacher's pipeline (text encoders, VAE, scheduler); only the UNet differs, and
``sampling.generate`` gives each image its own seeded noise, so seed *s* starts from the same
latents in both columns.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.cost import latent_size
from workbench.errors import WorkbenchError
from workbench.negative import MAX_NASA_SCALE, NASA_POOLED_SCALE, NASA_SCALE, check_scale
from workbench.schedulers import SCHEDULERS, check_sampler
from workbench.ui import format as fmt
from workbench.ui.settings import Limits
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors
from workbench.ui.store import Store, native_resolution, no_pipeline_message

MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
SHOWN_PX = 256  # smaller images are shown enlarged by a whole factor (sharp pixels), larger ones as they fit
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


@dataclass(frozen=True)
class Form:
    """The Compare form as the user left it, field by field (raw widget values: ``validate``
    checks them)."""

    prompt: str
    negative: str
    seeds: str
    steps: Any
    guidance: Any
    size: Any  # empty: the model's native size
    student_scheduler: str = "default"
    student_steps: Any = None  # empty or 0: the teacher's steps
    student_negative: str = ""  # empty: the teacher's negative prompt
    nasa_scale: Any = NASA_SCALE
    nasa_pooled_scale: Any = NASA_POOLED_SCALE


@dataclass(frozen=True)
class Request:
    """A validated comparison request."""

    prompt: str
    negative: str | None
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    size: int
    student_scheduler: str = "default"
    student_steps: int | None = None  # None: the teacher's steps
    student_negative: str | None = None  # None: the teacher's negative prompt
    nasa_scale: float = NASA_SCALE  # a negative prompt of guidance-free sampling steers the attention
    nasa_pooled_scale: float = NASA_POOLED_SCALE  # ... and the pooled text embedding (SDXL family)

    @property
    def student_kw(self) -> dict[str, Any]:
        """How the student column samples: its scheduler, steps and negative prompt."""
        return {"scheduler": self.student_scheduler, "steps": self.student_steps or self.steps,
                "negative_prompt": self.student_negative or self.negative}  # fmt: skip


def parse_seeds(text: str, max_seeds: int) -> list[int]:
    """'0, 1, 7' or '0-3' or '5' -> seeds; errors say what is accepted."""
    seeds: list[int] = []
    asked = 0  # a range counts whole, though only its first max_seeds + 1 are listed
    for part in re.split(r"[,\s]+", (text or "").strip()):
        if not part:
            continue
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match[1]), int(match[2])
            if hi < lo:
                raise WorkbenchError(f"seed range {part!r} runs backwards; write it low-high, e.g. 0-3")
            seeds.extend(range(lo, min(hi, lo + max_seeds) + 1))
            asked += hi - lo + 1
        elif part.isdigit():
            seeds.append(int(part))
            asked += 1
        else:
            raise WorkbenchError(f"seed {part!r} is not a whole number >= 0; write e.g. '0, 1, 2' or '0-3'")
    if not seeds:
        raise WorkbenchError("give at least one seed, e.g. 0 (or '0, 1, 2', or '0-3')")
    if len(seeds) > max_seeds:
        raise WorkbenchError(f"{asked} seeds asked; this app draws at most {max_seeds} per comparison")
    if max(seeds) > MAX_SEED:
        raise WorkbenchError(f"seed {max(seeds)} is too large; seeds go from 0 to {MAX_SEED}")
    return list(dict.fromkeys(seeds))  # duplicates would only repeat an image


def validate(store: Store, name: str, limits: Limits, form: Form) -> Request:
    """Check every field before any model is touched. The student samples with its own
    scheduler (``schedulers.SCHEDULERS``) and steps (empty: the teacher's)."""
    if not (form.prompt or "").strip():
        raise WorkbenchError(
            "the prompt is empty; describe the image, e.g. 'a red circle on a white background'"
        )
    n_steps = _number(form.steps, "steps", int)
    if not 1 <= n_steps <= limits.max_steps:
        raise WorkbenchError(f"steps must be between 1 and {limits.max_steps}, got {form.steps}")
    scale = _number(form.guidance, "guidance", float)
    if not 0 <= scale <= MAX_GUIDANCE:
        raise WorkbenchError(
            f"guidance must be between 0 and {MAX_GUIDANCE:g} (1 or less disables it), got {form.guidance}"
        )
    own_steps = _student_steps(form.student_steps, limits)
    check_sampler(form.student_scheduler, own_steps or n_steps, "student steps")
    return Request(
        student_negative=(form.student_negative or "").strip() or None,
        nasa_scale=check_scale(_number(form.nasa_scale, "NASA scale", float)),
        nasa_pooled_scale=check_scale(
            _number(form.nasa_pooled_scale, "NASA pooled scale", float), "NASA pooled scale"
        ),
        student_scheduler=form.student_scheduler,
        student_steps=own_steps,
        prompt=form.prompt.strip(),
        negative=(form.negative or "").strip() or None,
        seeds=tuple(parse_seeds(str(form.seeds), limits.max_seeds)),
        steps=n_steps,
        guidance=scale,
        size=check_size(store, name, form.size, limits),
    )


def _student_steps(value: Any, limits: Limits) -> int | None:
    """The student's own steps; None (empty or 0) for the teacher's."""
    if value in (None, "", 0):
        return None
    steps = _number(value, "student steps", int)
    if not 1 <= steps <= limits.max_steps:
        raise WorkbenchError(
            f"student steps must be 1 to {limits.max_steps}, or 0 for the teacher's steps, got {value}"
        )
    return steps


def _number(value: Any, what: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{what} must be a number, got {value!r}") from None
    if kind is int and number != float(value):
        raise WorkbenchError(f"{what} must be a whole number, got {value!r}")
    return number


def check_size(store: Store, name: str, size: Any, limits: Limits) -> int:
    """The image side in px: the model's native size when empty; a valid multiple otherwise."""
    base = store.base(name)
    if size in (None, "", 0):
        return native_resolution(base)
    px = _number(size, "image size", int)
    if px > limits.max_sample_px:
        raise WorkbenchError(f"image size {px} px is above this app's limit of {limits.max_sample_px} px")
    latent_size(base.unet_config, px, base.vae_scale_factor)  # raises with the valid step
    return px


def compare(
    store: Store, limits: Limits, view: dict[str, Any], plan: list[str], form: Form, progress: Any = None
) -> tuple[list, list, str]:
    """(teacher images, student images, summary Markdown), each image captioned with its time."""
    name = view["base"]
    request = validate(store, name, limits, form)
    report = ProgressAdapter(progress) if progress is not None else (lambda *a, **k: None)
    pipe = store.pipeline(name, ProgressAdapter(report, 0.0, 0.05))  # says so if there are no weights
    student, spec = store.student(name, plan, ProgressAdapter(report, 0.05, 0.1))
    # Imported only when sampling, and only now: the store's load imported diffusers' pipelines
    # once under workbench.libraries' lock, so this import cannot race the start model's load.
    from workbench.sampling import generate

    kw = {
        "steps": request.steps,
        "guidance": request.guidance,
        "negative_prompt": request.negative,
        "height": request.size,
        "width": request.size,
        "nasa_scale": request.nasa_scale,
        "nasa_pooled_scale": request.nasa_pooled_scale,
    }
    teacher_out, student_out = [], []
    total = 2 * len(request.seeds)
    own = {"teacher": {}, "student": request.student_kw}
    for seed in request.seeds:  # interleaved: both columns see the same machine load
        for unet, out, who in ((None, teacher_out, "teacher"), (student, student_out, "student")):
            report(0.1 + 0.9 * (len(teacher_out) + len(student_out)) / total, f"{who}, seed {seed}")
            started = time.perf_counter()
            (image,) = generate(pipe, [request.prompt], [seed], unet=unet, **(kw | own[who]))
            out.append((image, time.perf_counter() - started, seed))
    return _gallery(teacher_out), _gallery(student_out), summary_md(request, teacher_out, student_out, spec)


def _gallery(items: list[tuple[Any, float, int]]) -> list[tuple[Any, str]]:
    return [(fmt.enlarged(image, SHOWN_PX), f"seed {seed} · {fmt.seconds(t)}") for image, t, seed in items]


def summary_md(request: Request, teacher: list, student: list, spec: Any) -> str:
    t = sum(x[1] for x in teacher) / len(teacher)
    s = sum(x[1] for x in student) / len(student)
    own = ""
    if request.student_scheduler != "default" or request.student_steps:
        own = f" (student: {request.student_kw['steps']} {request.student_scheduler} steps)"
    k = fmt.enlargement((request.size, request.size), SHOWN_PX)
    shown = f" (shown {k}× enlarged, pixel for pixel)" if k > 1 else ""
    return (
        f"**{len(request.seeds)} seed(s), {request.steps} steps{own}, guidance {request.guidance:g}, "
        f"{request.size}×{request.size} px{shown}.** Teacher {fmt.seconds(t)} per image, student "
        f"{fmt.seconds(s)} per image ({fmt.factor(t, s, 'faster')}); wall time including text "
        f"encoding and VAE decoding.  \nStudent: {len(spec.removed)} units removed, "
        f"{fmt.params(spec.student_params)} of {fmt.params(spec.teacher_params)} UNet params. "
        "It is not distilled yet: expect it to drift from the teacher until it is trained."
    )


def size_for(store: Store, view: dict[str, Any], current: Any, chosen_for: str | None, limits: Limits) -> int:
    """The image size to show: the user's choice while the model stays, its native size otherwise."""
    name = view["base"]
    if name == chosen_for:
        try:
            return check_size(store, name, current, limits)
        except WorkbenchError:
            pass  # an invalid leftover goes back to the native size
    return native_resolution(store.base(name))


def guidance_for(store: Store, view: dict[str, Any], current: Any, chosen_for: str | None) -> float:
    """The guidance to show: the user's choice while the model stays, the model's own otherwise
    (``models.Base.guidance``: the toy 2, others 5)."""
    if view["base"] == chosen_for and isinstance(current, (int, float)):
        return float(current)
    return store.base(view["base"]).guidance


def availability_md(store: Store, view: dict[str, Any]) -> str:
    """Why this tab cannot sample the loaded model, before anyone presses the button."""
    base = store.base(view["base"])
    if base.has_pipeline:
        return ""
    return fmt.notice_md(no_pipeline_message(base))


# ------------------------------------------------------------------ layout and wiring


def _form_widgets(limits: Limits) -> dict[str, Any]:
    """The Compare form's widgets in page order, by ``Form`` field."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt", value="a red circle on a white background", lines=2, elem_id="wb-prompt"
            )
            with gr.Row():
                negative = gr.Textbox(label="Negative prompt", placeholder="optional", elem_id="wb-negative")
                student_negative = gr.Textbox(
                    label="Student negative prompt", placeholder="empty: the same", elem_id="wb-student-negative",
                    info="a guidance-free student (w-conditioned, or guidance <= 1) takes it in its "
                    "cross-attention and pooled text embedding (NASA)",
                )  # fmt: skip
        with gr.Column(scale=1):
            seeds = gr.Textbox(
                label="Seeds",
                value="0, 1",
                info=f"e.g. '0, 1, 2' or '0-3'; at most {limits.max_seeds}",
                elem_id="wb-seeds",
            )
            size = gr.Number(
                label="Image size (px)", value=None, precision=0, info="the model's native size by default"
            )
        with gr.Column(scale=1):
            steps = gr.Slider(
                1,
                limits.max_steps,
                value=min(20, limits.max_steps),
                step=1,
                label="Steps",
                elem_id="wb-steps",
            )
            guidance = gr.Slider(  # set to the loaded model's own when a page opens or a model loads
                0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance", elem_id="wb-guidance"
            )
        with gr.Column(scale=1):
            student_scheduler = gr.Dropdown(
                list(SCHEDULERS), value="default", label="Student scheduler", elem_id="wb-student-scheduler",
                info="lcm: consistency-distilled students, 1-8 steps",
            )  # fmt: skip
            student_steps = gr.Number(
                label="Student steps", value=0, elem_id="wb-student-steps",  # no precision: 2.5 is refused, not rounded
                info="0 (or empty): the teacher's steps",
            )  # fmt: skip
            nasa_scale = gr.Slider(
                0, MAX_NASA_SCALE, value=NASA_SCALE, step=0.1, label="NASA scale", elem_id="wb-nasa-scale",
                info="how hard guidance-free sampling steers the cross-attention away from the negative prompt",
            )  # fmt: skip
            nasa_pooled_scale = gr.Slider(
                0, MAX_NASA_SCALE, value=NASA_POOLED_SCALE, step=0.1, label="NASA pooled scale",
                elem_id="wb-nasa-pooled-scale",
                info="... and the pooled text embedding (SDXL family; 1: none of the negative's direction left)",
            )  # fmt: skip
    return {
        "prompt": prompt,
        "negative": negative,
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "size": size,
        "student_scheduler": student_scheduler,
        "student_steps": student_steps,
        "student_negative": student_negative,
        "nasa_scale": nasa_scale,
        "nasa_pooled_scale": nasa_pooled_scale,
    }


def build(ctx: Shared) -> None:
    limits = ctx.settings.limits
    availability = gr.Markdown(elem_id="wb-compare-availability")
    form = _form_widgets(limits)  # Form's fields -> their widgets
    go = gr.Button("Generate teacher and student", variant="primary")
    summary = gr.Markdown(elem_id="wb-compare-summary")
    with gr.Row():
        # scale-down: an image is never drawn larger than it is (the toy's 64 px arrive enlarged 4x)
        teacher = gr.Gallery(
            label="Teacher", columns=4, height="auto", object_fit="scale-down", elem_id="wb-teacher"
        )
        student = gr.Gallery(
            label="Student (current plan)",
            columns=4,
            height="auto",
            object_fit="scale-down",
            elem_id="wb-student",
        )
    store = ctx.store

    @inline_errors(n_outputs=3, status_at=2)
    def on_generate(values, progress=gr.Progress()):  # values: {component: value}, inputs as a set
        fields = Form(**{field: values[box] for field, box in form.items()})
        return compare(store, limits, values[ctx.view], values[ctx.plan], fields, progress)

    size_base = gr.State(None)  # the model the image size was chosen for

    def on_view(view, current, scale, chosen_for):
        return (
            availability_md(store, view),
            size_for(store, view, current, chosen_for, limits),
            guidance_for(store, view, scale, chosen_for),
            view["base"],
        )

    gr.on(
        [ctx.demo.load, ctx.view.change],
        on_view,
        [ctx.view, form["size"], form["guidance"], size_base],
        [availability, form["size"], form["guidance"], size_base],
        api_visibility="private",
    )
    inputs = {ctx.view, ctx.plan, *form.values()}
    go.click(on_generate, inputs, [teacher, student, summary], api_visibility="private", **ctx.model_event())
