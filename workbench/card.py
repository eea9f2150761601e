"""The model card (README.md) of a distilled student."""

from __future__ import annotations

from workbench.distill_config import DistillConfig
from workbench.runs import RunDir, read_json
from workbench.sensitivity_kd import GUIDANCE_FILE


def model_card(config: DistillConfig, base, spec, run: RunDir) -> str:
    """README.md for an exported student."""
    from workbench.runs import read_metrics

    rows, _ = read_metrics(run.metrics)
    last = rows[-1] if rows else {}
    losses = "\n".join(
        f"| `{k}` | {v:.5f} |" for k, v in last.items() if k.startswith("loss/") and k.count("/") == 1
    )
    guided = ""
    record = read_json(run.root / GUIDANCE_FILE) if config.needs_sensitivity else None
    if record:
        final = record["stages"][-1]
        if final["feature_weights"] is not None:
            guided += " Feature terms were weighted by the teacher's per-unit sensitivity (mean weight 1)."
        if final["frozen_modules"]:
            frozen = ", ".join(final["frozen_modules"])
            guided += f" Frozen while distilling (the most sensitive layers): {frozen}."
    return f"""---
library_name: diffusers
tags: [stable-diffusion-xl, distillation, pruning]
---
# Distilled student of `{base.name}`

A `UNet2DConditionModel` with {spec.student_params:,} parameters ({spec.student_params / spec.teacher_params:.1%}
of the teacher's {spec.teacher_params:,}), made by removing {len(spec.removed)} units (plan
`{spec.plan.name}`, in `plan.json`; `layer_map.json` says which teacher layer each student layer
came from) and distilling for {config.steps * len(config.stages)} steps with task, output and
`{config.feature_mode}` feature losses (weights {config.w_task}, {config.w_out}, {config.w_feat}).{guided}

```python
from diffusers import DiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("path/to/this/folder")
pipe = DiffusionPipeline.from_pretrained("{base.location}", unet=unet)
```

Final losses (step {last.get("step", "?")}):

| term | value |
|---|---|
{losses}
"""
