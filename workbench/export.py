"""Deliver a student where images are made: the export formats, one folder each.

Every format writes one folder (``--out``), with the model card (``README.md``),
``plan.json`` and ``layer_map.json`` beside the weights:

- ``diffusers``: the student's UNet as a stock diffusers folder (``from_pretrained``);
- ``pipeline``: the teacher's pipeline (VAE, text encoders, tokenizers, scheduler) with the
  student UNet, loadable by the stock pipeline class with no custom code;
- ``single-file``: the UNet as one ``.safetensors`` in the original key layout
  (``model.diffusion_model.*``), with its ``config.json`` beside it;
- ``checkpoint``: UNet, VAE and text encoders in one ``.safetensors`` in the layout A1111
  and ComfyUI's "Load Checkpoint" read.

A student comes from a plan (built from the teacher's weights) or from a folder that
knows its layer map (a run's ``student/``, or an earlier export). Folders are written
beside the target and renamed into place, readable by everyone, and free of local paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import evaluation, lora, sgm
from workbench.catalog import build_catalog, meta_unet
from workbench.dtypes import torch_dtype
from workbench.errors import WorkbenchError
from workbench.modelcard import model_card, public_name
from workbench.models import Base, load_pipeline, load_unet, load_unet_folder, resolve_base
from workbench.plan import PruningPlan
from workbench.runs import ACTIVE, RunDir, effective_state
from workbench.schedulers import is_w_conditioned, make_scheduler
from workbench.student import Student, consistency_kind
from workbench.surgery import build_student, compile_plan, save_plan_files

FORMATS = {
    "diffusers": "the student's UNet as a diffusers folder (UNet2DConditionModel.from_pretrained)",
    "pipeline": "the teacher's full pipeline with the student UNet (the stock pipeline class loads it)",
    "single-file": "the UNet as one .safetensors in the original key layout (model.diffusion_model.*)",
    "checkpoint": "UNet + VAE + text encoders in one .safetensors (A1111 / ComfyUI 'Load Checkpoint')",
}
DTYPES = ("fp32", "fp16", "bf16")
FILE_FORMATS = ("single-file", "checkpoint")
NEEDS_PIPELINE = ("pipeline", "checkpoint")
LAYER_MAP_FILE = "layer_map.json"
LCD_EVAL_STEPS = 4  # LCM steps a consistency student is scored at (the runs' --lcd-sample-steps default)
Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    pass


def default_dtype(fmt: str) -> str:
    """Single files ship in fp16 (as SDXL's own do); folders keep the training precision."""
    return "fp16" if fmt in FILE_FORMATS else "fp32"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise WorkbenchError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def check_out(out: str | Path) -> Path:
    """The output folder, if it is new or empty (checked before anything loads)."""
    path = Path(out).expanduser()
    if path.is_file():
        raise WorkbenchError(f"output {str(path)!r} is an existing file; give a folder path (new or empty)")
    if path.exists() and any(path.iterdir()):
        raise WorkbenchError(f"output folder {str(path)!r} already exists and is not empty; choose a new one")
    return path


def check_base_for(fmt: str, base: Base) -> None:
    if fmt in NEEDS_PIPELINE and not base.has_pipeline:
        raise WorkbenchError(
            f"the {fmt} format needs the teacher's VAE and text encoders, but base {base.name!r} is "
            f"{'a built-in config' if base.kind == 'builtin' else 'a UNet folder'}; give a pipeline "
            "folder or hub id as --base, or export the diffusers or single-file format"
        )


# --------------------------------------------------------------------------- students


def student_from_plan(base: Base, plan: PruningPlan, teacher=None) -> Student:
    """The plan's student, initialised from the teacher's kept layers."""
    compile_plan(build_catalog(base.unet_config), plan)  # refuse a bad plan before loading weights
    unet, spec = build_student(teacher if teacher is not None else load_unet(base), plan)
    return Student(spec=spec, base=base, unet=unet.eval())


@dataclass(frozen=True)
class StudentFolder:
    """What a student folder says about itself, read without loading weights."""

    unet_dir: Path
    plan: PruningPlan
    layer_map: dict[str, str]
    config: dict[str, Any]
    run: RunDir | None

    def base_name(self) -> str | None:
        """The teacher a run trained from (``job.json``), if the folder belongs to a run."""
        if self.run is None:
            return None
        return (self.run.read_job().get("config") or {}).get("base")


def read_student_folder(folder: str | Path) -> StudentFolder:
    """A run folder, its ``student/``, a diffusers or single-file export, or a pipeline export."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise WorkbenchError(f"student folder {str(root)!r} does not exist or is not a folder")
    unet_dir = next(
        (d for d in (root / "student", root / "unet", root) if (d / "config.json").is_file()), None
    )
    if unet_dir is None:
        if (root / "job.json").is_file():
            raise WorkbenchError(unfinished_run(RunDir(root)))
        raise WorkbenchError(
            f"{str(root)!r} holds no student (no config.json); give a run folder, its student/ "
            "folder, or a folder written by `python -m workbench export`"
        )
    if not (unet_dir / LAYER_MAP_FILE).is_file():
        raise WorkbenchError(
            f"student folder {str(unet_dir)!r} has no {LAYER_MAP_FILE}: without it nobody knows which "
            "teacher layer each student layer inherited; give a folder written by `python -m workbench "
            "export` or a distillation run's student/"
        )
    layer_map = _read_json(unet_dir / LAYER_MAP_FILE).get("student_to_teacher")
    if not isinstance(layer_map, dict):
        raise WorkbenchError(f"{str(unet_dir / LAYER_MAP_FILE)!r} has no 'student_to_teacher' mapping")
    plan = PruningPlan.load(unet_dir / "plan.json")
    run_root = unet_dir.parent
    run = RunDir(run_root) if (run_root / "job.json").is_file() and unet_dir.name == "student" else None
    return StudentFolder(unet_dir, plan, layer_map, _read_json(unet_dir / "config.json"), run)


def unfinished_run(run: RunDir) -> str:
    """Why a run folder without ``student/`` has no student yet, and how to get one: a run
    writes its student when its last step is done (a checkpoint holds training state, not a
    student: it is not exported)."""
    job, status = run.read_job(), run.read_status()
    state, step, total = effective_state(status), status.get("step"), status.get("total_steps")
    where = f"{state} at step {step} of {total}" if step and total else state
    checkpoints = run.list_checkpoints()
    last = f"its last checkpoint is {checkpoints[-1].name}" if checkpoints else "it has no checkpoint yet"
    todo = (
        "wait for it to finish"
        if state in ACTIVE
        else f"finish it with `python -m workbench distill --run-dir {run.root} --resume`"
    )
    done = [run.stage_dir(k) for k in range(len(job.get("stages") or [])) if run.stage_done(k)]
    teacher = (job.get("config") or {}).get("base") or "toy"
    earlier = (
        f", or export an earlier stage's finished student: --student {done[-1]} --base {teacher}"
        if done
        else ""
    )
    return (
        f"run folder {str(run.root)!r} holds no student yet: its run has not finished ({where}; {last}). "
        f"A run writes its student after its last step: {todo}, then export the run folder{earlier}"
    )


def student_from_folder(folder: str | Path, base: Base | None = None) -> Student:
    """A trained (or exported) student, checked against the teacher it claims to come from."""

    info = read_student_folder(folder)
    base = base or resolve_base(info.base_name() or "toy")
    spec = compile_plan(build_catalog(base.unet_config), info.plan)
    # a consistency-distilled student adds LCM's guidance embedding to the plan's UNet
    expected = spec.config | {"time_cond_proj_dim": info.config.get("time_cond_proj_dim")}
    if _without_samplers(spec.layer_map) != _without_samplers(info.layer_map) or not _same_shapes(
        expected, info.config
    ):
        raise WorkbenchError(
            f"student {str(info.unet_dir)!r} was not made from base {base.name!r}: its plan gives a "
            "different layer map on this teacher; pass the teacher it was made from as --base"
        )
    unet = load_unet_folder(info.unet_dir).eval()
    return Student(spec=spec, base=base, unet=unet, folder=info.unet_dir, run=info.run)


def _without_samplers(layer_map: dict[str, str]) -> dict[str, str]:
    """The map without samplers that kept their place (folders written before samplers were atoms
    list none)."""
    return {s: t for s, t in layer_map.items() if not ("samplers." in s and s == t)}


def _same_shapes(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two UNet configs build the same parameters (names and shapes; meta device)."""
    shapes = [{k: v.shape for k, v in meta_unet(c).state_dict().items()} for c in (a, b)]
    return shapes[0] == shapes[1]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise WorkbenchError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{str(path)!r} does not hold a JSON object")
    return data


def evaluate(student: Student, pipeline, prompts: int = 20, seeds: int = 2) -> dict[str, Any]:
    """Teacher and student on the same held-out samples, for the card: the toy checker's
    verdicts and PSNR/SSIM on the toy, PSNR/SSIM against the teacher elsewhere. Both sample at
    the base's guidance; a consistency-distilled student at ``LCD_EVAL_STEPS`` LCM steps, as it
    is meant to be sampled (``consistency_kind``)."""
    is_toy, guidance = student.base.kind == "toy", student.base.guidance
    evaluator = evaluation.Evaluator(
        pipeline, evaluation.default_samples(is_toy, prompts, seeds), checker=is_toy, guidance=guidance
    )
    kind, sampler = consistency_kind(student), None
    if kind is not None:  # an LCM-LoRA student has its guidance in its weights: no guided pass
        sampler = evaluation.Sampler(LCD_EVAL_STEPS, guidance if kind == "w" else 1.0, "lcm")
    scores = evaluator.student(student.unet, sampler)
    found = evaluation.result(evaluator, student.base, evaluator.teacher(), scores, None, sampler)
    found.pop("per_sample")
    return found | {"base": public_name(student.base), "weights": None}


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    out: Path
    fmt: str
    dtype: str
    files: tuple[str, ...]  # relative paths, sorted
    weights_file: str | None  # the single .safetensors of the file formats
    lora_report: Any = None  # lora.LoraReport, when a teacher LoRA was remapped into lora/


def export(
    student: Student,
    fmt: str,
    out: str | Path,
    dtype: str | None = None,
    pipeline=None,
    evaluation: dict[str, Any] | None = None,
    lora_file: str | Path | None = None,
    progress: Progress = _no_progress,
) -> ExportResult:
    """Write ``student`` in format ``fmt`` to the new folder ``out`` (atomically).

    ``pipeline`` is the teacher's loaded pipeline, if the caller has one (the pipeline and
    checkpoint formats load it otherwise, without the teacher's UNet: the student takes its
    place, so its weights are never read). ``evaluation`` holds toy evaluation figures for
    the card. ``lora_file``, a LoRA trained on the teacher, is remapped onto the student and
    written to ``lora/`` (``load_lora_weights(out / "lora")``).
    """
    check_format(fmt)
    dtype = check_dtype(dtype or default_dtype(fmt))
    check_base_for(fmt, student.base)
    check_student_for(fmt, student)
    out = check_out(out)
    remapped = None
    if lora_file is not None:  # a LoRA of another teacher fails here, before anything is written
        progress(0.05, "remapping the LoRA")
        teacher_lora = lora.read_lora(lora_file, student.base)
        remapped = (teacher_lora, *lora.remap(teacher_lora, student.spec.layer_map))
    if fmt in NEEDS_PIPELINE and pipeline is None:
        progress(0.1, "loading the teacher's VAE and text encoders")
        pipeline = load_pipeline(student.base, unet=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        progress(0.3, f"writing the {fmt} format")
        weights_file = _WRITERS[fmt](student, tmp, dtype, pipeline, _file_stem(out))
        save_plan_files(student.spec, tmp if fmt != "pipeline" else tmp / "unet")
        if remapped is not None:
            lora.save_lora(*remapped, tmp / "lora", student_config=student.spec.config)
        report = remapped[2] if remapped else None
        card = model_card(student, fmt, dtype, weights_file, evaluation, lora_report=report)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        progress(0.9, "checking the files")
        files = place_folder(tmp, out, student)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, fmt, dtype, files, weights_file, report)


def _file_stem(out: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", out.name).strip("-.") or "student"


def _cast(state: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Floating tensors in ``dtype``, everything contiguous and on the CPU (as safetensors wants)."""
    target = torch_dtype(dtype)
    return {
        k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }


def _write_diffusers(student: Student, folder: Path, dtype: str, pipeline, stem: str) -> None:
    from diffusers import UNet2DConditionModel

    unet = student.unet
    if dtype != "fp32":  # a converted copy: the caller's student stays as it was
        unet = UNet2DConditionModel.from_config(unet.config).to(torch_dtype(dtype))
        unet.load_state_dict(_cast(student.unet.state_dict(), dtype))
    unet.save_pretrained(folder)
    return None


def check_student_for(fmt: str, student: Student) -> None:
    """A consistency-distilled (w-conditioned) student travels in the diffusers layouts only."""
    if fmt in ("single-file", "checkpoint") and is_w_conditioned(student.unet):
        raise WorkbenchError(
            f"--format {fmt}: this student is consistency-distilled with a guidance embedding "
            "(time_embedding.cond_proj), which the original checkpoint layout has no key for; export "
            "--format diffusers or pipeline"
        )


def _write_pipeline(student: Student, folder: Path, dtype: str, pipeline, stem: str) -> None:
    components = {**pipeline.components, "unet": student.unet}
    if consistency_kind(student):  # a consistency-distilled student (LCD or LCM-LoRA) samples with LCM
        components["scheduler"] = make_scheduler("lcm", pipeline.scheduler)
    type(pipeline)(**components).save_pretrained(folder)  # shares the teacher's modules, copies nothing
    if dtype != "fp32":
        for path in folder.rglob("*.safetensors"):
            _recast_file(path, dtype)
    return None


def _recast_file(path: Path, dtype: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(_cast(state, dtype), str(path), metadata=metadata)


def _write_single_file(student: Student, folder: Path, dtype: str, pipeline, stem: str) -> str:
    state = sgm.unet_to_original(student.unet.state_dict(), student.spec.config)
    name = f"{stem}.safetensors"
    _save_safetensors(state, folder / name, dtype, student)
    student.unet.save_config(folder)  # config.json: what from_single_file(config=folder) reads
    return name


def _write_checkpoint(student: Student, folder: Path, dtype: str, pipeline, stem: str) -> str:
    state = checkpoint_state(student, pipeline)
    name = f"{stem}.safetensors"
    _save_safetensors(state, folder / name, dtype, student)
    student.unet.save_config(folder)
    return name


def checkpoint_state(student: Student, pipeline) -> dict[str, Any]:
    """UNet, VAE and text encoders of one checkpoint, in the original layout of the teacher's family.

    SDXL (two text encoders): CLIP-L under ``conditioner.embedders.0.transformer`` (HF layout),
    the second encoder under ``conditioner.embedders.1.model`` (OpenCLIP layout). SD 1.x/2.x
    (one): ``cond_stage_model.transformer`` for an OpenAI CLIP (quick_gelu, SD 1.x) and
    ``cond_stage_model.model`` for an OpenCLIP encoder (gelu, SD 2.x). A v-prediction teacher
    adds the ``v_pred`` marker (and ``ztsnr`` on a zero-terminal-SNR schedule) that ComfyUI reads.
    """
    import torch

    state = sgm.unet_to_original(student.unet.state_dict(), student.spec.config)
    state |= sgm.vae_to_original(pipeline.vae.state_dict(), pipeline.vae.config)
    encoders = [getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2")]
    if encoders[1] is not None:
        state |= sgm.clip_to_original(encoders[0].state_dict(), "conditioner.embedders.0.transformer.")
        state |= sgm.openclip_to_original(encoders[1].state_dict(), "conditioner.embedders.1.model.")
    elif getattr(encoders[0].config, "hidden_act", "quick_gelu") == "gelu":
        state |= sgm.openclip_to_original(encoders[0].state_dict(), "cond_stage_model.model.")
    else:
        state |= sgm.clip_to_original(encoders[0].state_dict(), "cond_stage_model.transformer.")
    scheduler = pipeline.scheduler.config
    if scheduler.get("prediction_type") == "v_prediction":
        state["v_pred"] = torch.tensor([])
        if scheduler.get("rescale_betas_zero_snr"):
            state["ztsnr"] = torch.tensor([])
    return state


def _save_safetensors(state: dict[str, Any], path: Path, dtype: str, student: Student) -> None:
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "workbench.plan": student.spec.plan.name,
        "workbench.teacher": public_name(student.base),
        "workbench.dtype": dtype,
    }
    save_file(_cast(state, dtype), str(path), metadata=metadata)


_WRITERS = {
    "diffusers": _write_diffusers,
    "pipeline": _write_pipeline,
    "single-file": _write_single_file,
    "checkpoint": _write_checkpoint,
}


# --------------------------------------------------------------------------- hygiene

_TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml")
_TOKENIZER_DATA = {"vocab.json", "merges.txt", "tokenizer.json"}  # vocabularies, not paths


def local_paths(student: Student) -> list[str]:
    """Absolute local paths that must not leak into exported files."""
    paths = [tempfile.gettempdir(), str(Path.home()), os.getcwd()]
    if student.base.kind != "hub":
        paths.append(str(Path(student.base.location).resolve()))
    if student.folder is not None:
        paths.append(str(student.folder.resolve()))
    if student.run is not None:
        paths.append(str(Path(student.run.root).resolve()))
    return [p for p in paths if len(p) > 1]


def finish_folder(folder: Path, local_paths: list[str]) -> None:
    """Drop loader bookkeeping that records where models were read from, check that no
    local path is left in any text file, and make everything readable (dirs 755, files 644)."""
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and ("_name_or_path" in data or "name_or_path" in data):
            data.pop("_name_or_path", None)
            data.pop("name_or_path", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.name not in _TOKENIZER_DATA:
            text = path.read_text(encoding="utf-8", errors="replace")
            leaked = next((p for p in local_paths if p in text), None)
            if leaked:
                raise RuntimeError(f"export: {path.name} mentions the local path {leaked!r}")
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def place_folder(tmp: Path, out: Path, student: Student) -> tuple[str, ...]:
    """Check a written export folder for local paths, move it into place at ``out`` (an empty
    folder there is replaced) and list its files."""
    finish_folder(tmp, local_paths(student))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
