"""The model card (README.md) that travels with every exported and every trained student.

YAML front matter as the Hugging Face hub reads it (``base_model`` and ``license`` from the
teacher where known, ``library_name``, ``pipeline_tag``, ``tags``), then what a user needs:
the teacher, what was removed, size and cost, how it was distilled and how well it does
(when trained; toy figures on the toy), how to load each format, which single-file clients
recognise the structure, and what happens to the teacher's LoRAs. The card never names a
local path: teachers are called by hub id or folder name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from workbench.catalog import REST, build_catalog
from workbench.cost import unet_flops
from workbench.errors import WorkbenchError
from workbench.evaluation import format_result
from workbench.models import Base, resolve_base
from workbench.reward import public_name as reward_name
from workbench.runs import read_json, read_metrics
from workbench.sensitivity_kd import GUIDANCE_FILE
from workbench.sgm import client_support
from workbench.student import Student, consistency_kind
from workbench.surgery import student_spec

# Hub ids of the built-in configs, and the licenses of well-known teachers.
BUILTIN_HUB_IDS = {
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15-base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21-base": "stabilityai/stable-diffusion-2-1",
}
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "segmind/SSD-1B": "apache-2.0",
    "segmind/Segmind-Vega": "apache-2.0",
}
TOY_NAME = "the workbench's embedded toy SDXL"
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


# --------------------------------------------------------------------------- naming the teacher


def hub_id(base: Base) -> str | None:
    """The teacher's hub id, when it has one (a hub base, a built-in config, a hub cache folder)."""
    if base.kind == "hub":
        return base.name
    if base.kind == "builtin":
        return BUILTIN_HUB_IDS.get(base.name)
    if base.kind in ("pipeline", "unet"):
        m = _HF_CACHE.search(str(Path(base.location).resolve()))
        return f"{m[1]}/{m[2]}" if m else None
    return None


def public_name(base: Base) -> str:
    """How a card or file names the teacher: hub id, the toy, or a local folder's name only."""
    if base.kind == "toy":
        return TOY_NAME
    return hub_id(base) or Path(base.location).name or base.name


def base_license(base: Base) -> str | None:
    """The teacher's license: its own card's front matter, else the known hub ids', else unknown."""
    if base.kind in ("pipeline", "unet"):
        found = _front_matter_value(Path(base.location) / "README.md", "license")
        if found:
            return found
    return KNOWN_LICENSES.get(hub_id(base) or "")


def _front_matter_value(path: Path, key: str) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.match(r"---\n(.*?)\n---", text, re.S)
    found = re.search(rf"^{key}:\s*(\S.*)$", m[1], re.M) if m else None
    return found[1].strip().strip("'\"") if found else None


# --------------------------------------------------------------------------- reading the teacher back

_TITLE = re.compile(r"^# Student of (.+?) \(plan `", re.M)


def recorded_teacher(unet_dir: str | Path) -> tuple[str, str]:
    """The teacher an export folder records, as (base name, where it is recorded): the card's
    ``base_model`` or title, else a weights file's ``workbench.teacher`` metadata. A teacher
    recorded only by a local folder's name (exports keep no paths), or not at all, is an error
    that asks for ``--base``."""
    unet_dir = Path(unet_dir)
    cards = [unet_dir / "README.md"] + ([unet_dir.parent / "README.md"] if unet_dir.name == "unet" else [])
    for card in (c for c in cards if c.is_file()):
        named = _front_matter_value(card, "base_model") or _card_title(card)
        if named:
            return _base_name(named, card.name, unet_dir), f"the export's model card {card.name}"
    for weights in sorted(unet_dir.glob("*.safetensors")):
        named = _safetensors_teacher(weights)
        if named:
            where = f"the workbench.teacher metadata of {weights.name}"
            return _base_name(named, weights.name, unet_dir), where
    raise WorkbenchError(
        f"student folder {str(unet_dir)!r} records no teacher (no run's job.json, no model card, no "
        "workbench.teacher metadata); give the teacher as --base"
    )


def _card_title(card: Path) -> str | None:
    m = _TITLE.search(card.read_text(encoding="utf-8", errors="replace"))
    return m[1].strip() if m else None


def _safetensors_teacher(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("workbench.teacher")
    except (SafetensorError, OSError):
        return None


def _base_name(named: str, where: str, unet_dir: Path) -> str:
    """The base to resolve for a teacher as a card names it: the toy, or a hub id."""
    if named == TOY_NAME:
        return "toy"
    if "/" in named:  # a hub id: a local folder is recorded by its name alone
        return named
    raise WorkbenchError(
        f"student folder {str(unet_dir)!r} records its teacher only as the local folder name {named!r} "
        f"({where}; exports keep no local paths); give that teacher's folder as --base"
    )


# --------------------------------------------------------------------------- the card


def model_card(
    student: Student,
    fmt: str = "diffusers",
    dtype: str = "fp32",
    weights_file: str | None = None,
    evaluation: dict[str, Any] | None = None,
    lora_report: Any = None,
) -> str:
    """README.md for ``student`` exported as ``fmt`` (``weights_file`` for the single-file ones);
    ``lora_report`` when a remapped teacher LoRA travels in ``lora/``."""
    sections = [
        _front_matter(student),
        _summary(student),
        _size(student),
        _removed(student),
        _distillation(student),
        _evaluation(student, evaluation),
        _loading(student, fmt, dtype, weights_file),
        _clients(student),
        _loras(student, lora_report),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _family_tags(base: Base) -> list[str]:
    sdxl = base.unet_config.get("addition_embed_type") == "text_time"
    return ["stable-diffusion-xl" if sdxl else "stable-diffusion"]


def _front_matter(student: Student) -> str:
    base = student.base
    lines = ["---"]
    if hub_id(base):
        lines.append(f"base_model: {hub_id(base)}")
    license_ = base_license(base)
    if license_:
        lines.append(f"license: {license_}")
    tags = [*_family_tags(base), "text-to-image", "diffusers", "pruning", "sdxl-distillation-workbench"]
    if student.trained:
        tags.append("distillation")
    if base.kind == "toy":
        tags.append("toy-model")
    lines += ["library_name: diffusers", "pipeline_tag: text-to-image", f"tags: [{', '.join(tags)}]", "---"]
    return "\n".join(lines)


def _summary(student: Student) -> str:
    spec, base = student.spec, student.base
    share = spec.student_params / spec.teacher_params
    how = (
        f"then distilled from the teacher ({_steps(student)} steps; see Distillation)"
        if student.trained
        else "initialised from the teacher's kept layers and not distilled yet: expect it to draw "
        "worse than the teacher until it is (`python -m workbench distill`)"
    )
    license_ = base_license(base)
    terms = (
        f"It inherits the teacher's license ({license_})."
        if license_
        else "Its weights come from the teacher: the teacher's license applies."
    )
    return (
        f"# Student of {public_name(base)} (plan `{spec.plan.name}`)\n\n"
        f"A stock diffusers `UNet2DConditionModel` with {spec.student_params:,} parameters "
        f"({share:.1%} of the teacher's {spec.teacher_params:,}), made by removing "
        f"{len(spec.removed)} units from the teacher's UNet, {how}. The teacher's VAE, text "
        f"encoders and scheduler are unchanged. {terms}"
    )


def _steps(student: Student) -> int:
    config = _job_config(student)
    return int(config.get("steps", 0)) * max(1, len(config.get("stages", ())))


def _job_config(student: Student) -> dict[str, Any]:
    return (student.run.read_job().get("config") or {}) if student.run else {}


def _size(student: Student) -> str:
    spec, base = student.spec, student.base
    resolution = int(base.unet_config.get("sample_size", 64)) * base.vae_scale_factor
    teacher = unet_flops(base.unet_config, resolution, base.vae_scale_factor)
    mine = unet_flops(spec.config, resolution, base.vae_scale_factor)
    return (
        "## Size and cost\n\n"
        f"| | teacher | student |\n|---|---|---|\n"
        f"| UNet parameters | {spec.teacher_params:,} | {spec.student_params:,} |\n"
        f"| UNet GFLOPs per step ({resolution} px, batch 1) | {teacher / 1e9:,.2f} | {mine / 1e9:,.2f} |\n\n"
        f"Estimated speedup of the UNet: {teacher / mine:.2f}x (the FLOP ratio; measure it on your "
        "hardware with `python -m workbench latency`).\n\n"
        f"Structure: {spec.topology.describe()}."
    )


def _removed(student: Student) -> str:
    spec = student.spec
    if not spec.removed:
        return "## Removed units\n\nNone: this student has the teacher's exact structure."
    catalog = build_catalog(student.base.unet_config)
    rows = []
    for uid in spec.removed:
        unit = catalog.by_id.get(uid)
        why = " (applied by default)" if uid in spec.auto_removed else ""
        rows.append(f"| `{uid}`{why} | {unit.kind if unit else ''} | {unit.params if unit else 0:,} |")
    notes = "".join(f"\n- {n}" for n in spec.notes)
    return (
        "## Removed units\n\nEvery kept layer and transformer block inherits the teacher's next "
        "remaining one, in order (`layer_map.json` lists each student module's teacher module).\n\n"
        "| unit | kind | parameters |\n|---|---|---|\n" + "\n".join(rows) + (f"\n{notes}" if notes else "")
    )


def _distillation(student: Student) -> str:
    if not student.trained:
        return ""

    c = _job_config(student)
    rows, _ = read_metrics(student.run.metrics)
    last = rows[-1] if rows else {}
    losses = "\n".join(
        f"| `{k}` | {v:.5f} |" for k, v in last.items() if k.startswith("loss/") and k.count("/") == 1
    )
    guided = ""
    record = read_json(student.run.root / GUIDANCE_FILE)
    if record and record.get("stages"):
        final = record["stages"][-1]
        if final.get("feature_weights") is not None:
            guided += " Feature terms were weighted by the teacher's per-unit sensitivity (mean weight 1)."
        if final.get("frozen_modules"):
            guided += (
                f" Frozen while distilling (the most sensitive layers): {', '.join(final['frozen_modules'])}."
            )
    stages = len(c.get("stages", ()))
    kinds = list(c.get("objectives") or ["kd"] * stages)
    staged = f" in {stages} progressive stages" if stages > 1 else ""
    if c.get("init_student"):
        staged += " from a student distilled earlier"
    if "lcd" in kinds:
        staged += (
            f"; {'the last stage' if stages > 1 else 'by'} latent consistency distillation (guided teacher, "
            f"DDIM solver, EMA target {c.get('lcd_ema')}, {c.get('lcd_loss')} loss"
            f"{', LCM-LoRA rank ' + str(c['lcd_lora_rank']) if c.get('lcd_lora_rank') else ''})"
        )
        if c.get("lcd_reward"):
            staged += (
                f", reward-guided (RG-LCD): {c.get('lcd_reward_weight')} x the mean reward of the one-step "
                f"prediction by {reward_name(c['lcd_reward'])} subtracted from the loss"
            )
    kd_loss = (
        ""
        if "kd" not in kinds
        else (
            f"; {'block-removal stages: ' if 'lcd' in kinds else ''}loss = {c.get('w_task')} x task + "
            f"{c.get('w_out')} x output KD + {c.get('w_feat')} x `{c.get('feature_mode')}` feature KD"
        )
    )
    return (
        "## Distillation\n\n"
        f"{_steps(student)} optimizer steps{staged} on `{_data_name(c.get('data', 'toy'))}` data, batch "
        f"{c.get('batch_size')} x {c.get('grad_accum')} accumulation, learning rate {c.get('lr')} "
        f"({c.get('lr_schedule')}), precision {c.get('mixed_precision')}{kd_loss}.{guided}\n\n"
        f"Final losses (step {last.get('step', '?')}):\n\n| term | value |\n|---|---|\n{losses}"
    )


def _data_name(data: str) -> str:
    return data if data == "toy" else Path(data).name


def _evaluation(student: Student, evaluation: dict[str, Any] | None) -> str:
    if evaluation:
        lines = "\n".join(format_result(evaluation))
        what = "the toy checker's verdicts on held-out prompts and" if student.base.kind == "toy" else ""
        return (
            f"## Evaluation\n\nMeasured at export ({what} PSNR/SSIM of the student's images against the "
            f"teacher's on the same samples; mean and 95% interval):\n\n```text\n{lines}\n```"
        )
    if student.base.kind != "toy":
        return ""
    return (
        "## Evaluation\n\nNot measured for this export: `python -m workbench export ... --evaluate` puts "
        "the toy checker's verdicts and PSNR/SSIM against the teacher here; `python -m workbench evaluate "
        "--unet <this folder>` prints them."
    )


def _loading(student: Student, fmt: str, dtype: str, weights_file: str | None) -> str:
    base, teacher = student.base, public_name(student.base)
    pipe_cls = (
        "StableDiffusionXLPipeline"
        if _family_tags(base)[0] == "stable-diffusion-xl"
        else "StableDiffusionPipeline"
    )
    where = hub_id(base) or "path/to/the/teacher"
    snippets = {
        "diffusers": (
            "The teacher's pipeline with this UNet swapped in:\n\n```python\nimport torch\n"
            f"from diffusers import {pipe_cls}, UNet2DConditionModel\n\n"
            'unet = UNet2DConditionModel.from_pretrained("path/to/this/folder")\n'
            f'pipe = {pipe_cls}.from_pretrained("{where}", unet=unet)\n```'
        ),
        "pipeline": (
            "A complete pipeline (the teacher's VAE, text encoders, tokenizers and scheduler):\n\n"
            f"```python\nfrom diffusers import {pipe_cls}\n\n"
            f'pipe = {pipe_cls}.from_pretrained("path/to/this/folder")\n'
            'image = pipe("a photo of a cat").images[0]\n```'
        ),
        "single-file": (
            f"`{weights_file}` holds the UNet in the original key layout (`model.diffusion_model.*`, {dtype}); "
            "`config.json` beside it is its diffusers config:\n\n```python\n"
            "from diffusers import UNet2DConditionModel\n\n"
            f'unet = UNet2DConditionModel.from_single_file("path/to/this/folder/{weights_file}", '
            'config="path/to/this/folder")\n```\n\n'
            "In ComfyUI put the file in `models/diffusion_models` and use 'Load Diffusion Model' with the "
            f"teacher's ({teacher}) text encoders and VAE."
        ),
        "checkpoint": (
            f"`{weights_file}` is a full checkpoint ({dtype}): UNet, VAE and text encoders in the original "
            "layout. In ComfyUI put it in `models/checkpoints` and use 'Load Checkpoint'. For diffusers "
            "export the `pipeline` format instead (or load the UNet alone with "
            f'`UNet2DConditionModel.from_single_file("{weights_file}", config="path/to/this/folder")`).'
        ),
    }
    scheduler = _scheduler_note(base)
    kind = consistency_kind(student) if student.unet is not None else None
    if kind is not None:
        note = LCD_NOTE if kind == "w" else LCM_LORA_NOTE
        return f"## How to load it\n\n{snippets[fmt]}{scheduler}\n\n{note}"
    return (
        f"## How to load it\n\n{snippets[fmt]}{scheduler}\n\nUse the teacher's scheduler and settings "
        "(prediction type, steps, guidance): the student predicts what its teacher predicts."
    )


LCD_NOTE = (
    "This student is consistency-distilled (LCD) with LCM's guidance embedding "
    "(`time_cond_proj_dim`): sample it with `LCMScheduler` (the `pipeline` format carries one) at 1 "
    "to 8 steps; `guidance_scale` goes in as an embedding, one UNet call per step, no classifier-free "
    "guidance pass:\n\n```python\nfrom diffusers import LCMScheduler\n\n"
    "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
    'image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=2.0).images[0]\n```'
)

LCM_LORA_NOTE = (
    "This student is an LCM-LoRA run's (latent consistency distillation through low-rank adapters, "
    "merged into the weights): sample it with `LCMScheduler` (the `pipeline` format carries one) at 1 "
    "to 8 steps and `guidance_scale=1`; the teacher's guidance is in its weights, and a guided pass "
    "would add it again:\n\n```python\nfrom diffusers import LCMScheduler\n\n"
    "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
    'image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=1.0).images[0]\n```'
)


def _scheduler_note(base: Base) -> str:
    if not base.has_pipeline or base.kind == "hub":
        return ""
    config = _read_scheduler(base)
    if config.get("prediction_type") != "v_prediction":
        return ""
    ztsnr = " on a zero-terminal-SNR schedule" if config.get("rescale_betas_zero_snr") else ""
    return (
        f"\n\nThe teacher predicts v{ztsnr}: the checkpoint carries the `v_pred`"
        f"{' and `ztsnr`' if ztsnr else ''} markers ComfyUI reads; with a UNet-only file set "
        "'ModelSamplingDiscrete' to v_prediction (zsnr on) yourself."
    )


def _read_scheduler(base: Base) -> dict[str, Any]:
    path = Path(base.location) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def client_notes(base: Base, spec) -> list[str]:
    """Which single-file clients read this student, one sentence each. The toy's widths are its
    own, so for the toy the same plan is judged on the real SDXL config."""
    if base.kind != "toy":
        return client_support(spec.config).lines()
    head = "The toy's widths match no published model, so only diffusers (given the config) reads its single files."
    sdxl = _on_sdxl(spec.plan)
    if sdxl is None:
        return [head]
    shape = f"the published {sdxl.structure} structure" if sdxl.structure else "no published structure"
    return [f"{head} On SDXL itself this plan gives {shape}:", *sdxl.lines()]


def _clients(student: Student) -> str:
    notes = client_notes(student.base, student.spec)
    if student.base.kind == "toy":
        return "## Single-file clients\n\n" + notes[0] + "\n\n" + "\n".join(f"- {n}" for n in notes[1:])
    return "## Single-file clients\n\n" + "\n".join(f"- {n}" for n in notes)


def _on_sdxl(plan):
    """Client support of the plan's student on the real SDXL config (None if the plan doesn't fit it)."""

    try:
        return client_support(student_spec(resolve_base("sdxl-base").unet_config, plan).config)
    except WorkbenchError:
        return None


def lora_summary(layer_map: dict[str, str], teacher_atoms: set[str]) -> tuple[int, int, int]:
    """(kept in place, moved to another index, removed) over the teacher's block-level modules."""
    kept = sum(1 for s, t in layer_map.items() if s == t)
    moved = len(layer_map) - kept
    removed = len(teacher_atoms - set(layer_map.values()))
    return kept, moved, removed


def _loras(student: Student, report: Any = None) -> str:
    catalog = build_catalog(student.base.unet_config)
    atoms = set(catalog.atom_params) - {REST}
    kept, moved, removed = lora_summary(student.spec.layer_map, atoms)
    return (
        "## LoRAs trained on the teacher\n\n"
        f"Of the teacher's {len(atoms)} block-level modules (ResNets, attention modules, transformer "
        f"blocks), {kept} keep their name here, {moved} are inherited under another index and "
        f"{removed} are gone. Loaded as-is, a teacher LoRA's pairs for the {moved} moved modules land on "
        "whatever block now has their name (the wrong one), and those of removed modules are dropped. "
        "Remap it through this student's layer map first:\n\n```bash\n"
        "python -m workbench lora --lora teacher_lora.safetensors --student path/to/this/folder --out remapped/\n"
        '```\n\nThen `pipe.load_lora_weights("remapped")`: every pair sits on the module that inherited '
        "its teacher module, and the report says what share of the LoRA survived."
    ) + (_included_lora(report) if report is not None else "")


def _included_lora(report: Any) -> str:
    return (
        "\n\nThis folder's `lora/` holds a teacher LoRA remapped that way "
        '(`pipe.load_lora_weights("path/to/this/folder/lora")`; `lora/lora_report.json` has the details):\n\n'
        + "\n".join(f"- {line}" for line in report.lines())
    )


def quantization_section(info: dict[str, Any]) -> str:
    """The card's section on a quantised export (``quantize.quantization_info``): format,
    library and version, what share of the weights is quantised, and how to load it."""
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[info["dtype"]]
    device = "a CUDA GPU (its kernels are CUDA-only)" if info["cuda_only"] else "CPU or GPU"
    return (
        "## Quantisation\n\n"
        f"This UNet is quantised: **{info['scheme']}** ({info['help']}), with {info['library']} "
        f"(`{info['config_class']}`) through diffusers' `TorchAoConfig` (diffusers {info['diffusers']}, "
        f"torch {info['torch']}). Only the weights of `nn.Linear` layers are quantised: "
        f"{info['share']:.1%} of the parameters; convolutions, norms, embeddings and biases stay in "
        f"{info['dtype']}. Weights file: {info['weights_bytes'] / 1e6:,.1f} MB (the same UNet in fp16: "
        f"{info['fp16_bytes'] / 1e6:,.1f} MB).\n\n"
        f"The quantisation config is in `config.json`, so stock diffusers loads it (with torchao installed) "
        f"on {device}; pass the dtype it was made for, as diffusers otherwise picks bfloat16:\n\n"
        "```python\nimport torch\nfrom diffusers import UNet2DConditionModel\n\n"
        f'unet = UNet2DConditionModel.from_pretrained("path/to/this/folder", dtype=torch.{dtype})\n```\n\n'
        "Then swap it into the teacher's pipeline as above. Single-file and checkpoint layouts (A1111, "
        "ComfyUI) cannot hold torchao's packed tensors: this export exists in the diffusers layout only."
    )
