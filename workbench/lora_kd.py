"""LoRA-enhanced distillation: low-rank adapters where the student inherited a layer as the
teacher ran it, full weights where the plan changed what a layer sees.

A student layer whose preceding layer (in the forward pass) is the one that preceded its
teacher layer sees the same kind of input as in the teacher: a small low-rank correction
(LoRA on its linear and convolution weights) is enough there. A layer that now follows a
different layer (the one after a removed block or layer) sees features it was never
trained on, so it trains fully. The adapters hold a fraction of the weights, so the
gradients and optimizer states shrink with them (``python -m workbench memory``). For
export the adapters are merged into the weights: the result is a stock
``UNet2DConditionModel`` of the student's config, with exactly the student's parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.catalog import atom_of, build_catalog, meta_unet
from workbench.errors import WorkbenchError
from workbench.surgery import compile_plan, derive_stage_plan
from workbench.topology import Stage, Topology

ADAPTER = "distill"  # the adapter's name in the student


def forward_atoms(topology: Topology) -> list[str]:
    """Every ResNet, attention and transformer block of a UNet, in forward order."""
    atoms: list[str] = []
    for stage in topology.down:
        atoms += _stage_atoms(stage)
    if topology.mid_type is not None:
        atoms.append("mid_block.resnets.0")
    if topology.mid_type == "UNetMidBlock2DCrossAttn":
        atoms.append("mid_block.attentions.0")
        atoms += [f"mid_block.attentions.0.transformer_blocks.{b}" for b in range(topology.mid_depth)]
        atoms.append("mid_block.resnets.1")
    for stage in topology.up:
        atoms += _stage_atoms(stage)
    return atoms


def _stage_atoms(stage: Stage) -> list[str]:
    atoms = []
    for j in range(stage.num_layers):
        atoms.append(f"{stage.path}.resnets.{j}")
        if stage.depths is not None:
            attention = f"{stage.path}.attentions.{j}"
            atoms.append(attention)
            atoms += [f"{attention}.transformer_blocks.{b}" for b in range(stage.depths[j])]
    return atoms


def changed_input_atoms(spec) -> list[str]:
    """Student atoms whose preceding atom is not the one that preceded their teacher atom."""
    student, teacher = forward_atoms(spec.topology), forward_atoms(spec.teacher_topology)
    before = {atom: (teacher[i - 1] if i else None) for i, atom in enumerate(teacher)}
    changed = []
    for i, atom in enumerate(student):
        previous = spec.layer_map[student[i - 1]] if i else None
        if before[spec.layer_map[atom]] != previous:
            changed.append(atom)
    return changed


def init_spec(specs: list[Any], k: int):
    """The spec that maps stage ``k``'s student to the model it was built from: the teacher
    for the first stage, the previous stage's student after that."""
    if k == 0:
        return specs[0]
    plan = derive_stage_plan(specs[k - 1], specs[k], name=f"stage-{k + 1}")
    return compile_plan(build_catalog(specs[k - 1].config), plan)


def lora_targets(student: torch.nn.Module, spec) -> list[str]:
    """Linear and convolution modules outside the changed atoms: they get adapters."""
    changed = set(changed_input_atoms(spec))
    return [
        name
        for name, module in student.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and atom_of(name) not in changed
    ]


def add_adapters(student, spec, rank: int) -> dict[str, Any]:
    """Adapters of ``rank`` on ``lora_targets``; everything else of the changed atoms
    trains fully, the rest of the student is frozen. Returns what trains, for the log."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise WorkbenchError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    targets = lora_targets(student, spec)
    pattern = "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"
    student.requires_grad_(False)
    student.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=pattern), ADAPTER
    )
    changed = set(changed_input_atoms(spec))
    for name, p in student.named_parameters():
        p.requires_grad_("lora_" in name or atom_of(name.replace(".base_layer.", ".")) in changed)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {
        "rank": rank,
        "adapted_modules": len(targets),
        "full_atoms": sorted(changed),
        "trainable": trainable,
    }


def add_consistency_adapters(student, rank: int) -> dict[str, Any]:
    """LCM-LoRA: adapters of ``rank`` on every linear and convolution layer of the student
    (attention, feed-forward, ResNets, samplers, embeddings), everything else frozen. The
    adapter alone is what consistency distillation trains; ``save_adapter`` writes it as a
    LoRA file that ``load_lora_weights`` puts on the stage's starting student."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise WorkbenchError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    targets = [n for n, m in student.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    pattern = "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"
    student.requires_grad_(False)
    student.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=pattern), ADAPTER
    )
    for name, p in student.named_parameters():
        p.requires_grad_("lora_" in name)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {"rank": rank, "adapted_modules": len(targets), "trainable": trainable}


def save_adapter(student, pipeline_class, folder) -> None:
    """The student's adapter as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``
    with its adapter config): ``pipe.load_lora_weights(folder)`` on the stage's starting student."""
    from peft.utils import get_peft_model_state_dict

    config = student.peft_config[ADAPTER].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    pipeline_class.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(student, adapter_name=ADAPTER),
        unet_lora_adapter_metadata=metadata,
    )


def plain(student, spec, in_place: bool = False):
    """The student as a stock UNet: merged if it has adapters, itself otherwise."""
    if not getattr(student, "_hf_peft_config_loaded", False):
        return student
    return merged(student, spec, in_place=in_place)


def merged(student, spec, in_place: bool = False):
    """A stock ``UNet2DConditionModel`` of the student's config with the adapters folded
    into its weights (W + B A * alpha / r). Every weight but the adapted layers' is the
    student's own tensor (shared, not copied). The adapted student is left unchanged, so each
    adapted layer's merged weight is a new tensor; ``in_place`` (the end of a stage, when the
    adapted student is spent) adds the adapter into the layer's own weight instead, so the
    merge holds no second copy of the student at all."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state: dict[str, torch.Tensor] = {}
    for name, module in student.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            delta = module.get_delta_weight(ADAPTER).detach()
            if in_place:
                base.weight.data.add_(delta)
                state[f"{name}.weight"] = base.weight.detach()
            else:
                state[f"{name}.weight"] = (base.weight + delta).detach()
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach()
    for name, p in student.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if "lora_" not in name and plain not in state:
            state[plain] = p.detach()
    out = meta_unet(spec.config)
    out.load_state_dict(state, strict=True, assign=True)
    return out.train(student.training)
