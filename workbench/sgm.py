"""The original (SGM / LDM) key layout that single-file clients read, derived from structure.

A1111, ComfyUI and diffusers' ``from_single_file`` read one ``.safetensors`` file whose
keys follow Stability's original code: ``model.diffusion_model.input_blocks.4.1...`` for
the UNet, ``first_stage_model.encoder.down.0.block.1...`` for the VAE, and the text
encoders under ``conditioner.embedders.N`` (SDXL) or ``cond_stage_model`` (SD 1.x/2.x).

The UNet's original indices depend on its structure: ``input_blocks`` count every down
layer and downsampler in order, ``output_blocks`` every up layer, and ``middle_block`` is
(ResNet, attention, ResNet), one ResNet, or absent. So the map is built from the
student's own ``Topology`` (kept layers per stage, per-attention depths, mid block kind),
never from SDXL's fixed indices. Inside an attention module the names are the same in
both layouts; inside a ResNet they differ (``norm1`` is ``in_layers.0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError
from workbench.topology import topology_of

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


# --------------------------------------------------------------------------- UNet


def unet_module_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module path -> original module path, for a UNet of this config's structure."""
    topo = topology_of(config)
    last = len(topo.down) - 1
    mapping = dict(_UNET_TOP)
    index = 1  # input_blocks.0 is conv_in
    for i, stage in enumerate(topo.down):
        for j in range(stage.num_layers):
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if stage.has_attention:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < last:  # diffusers adds a downsampler to every stage but the last
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    if topo.mid_type is not None:
        mapping["mid_block.resnets.0"] = "middle_block.0"
    if topo.mid_type == "UNetMidBlock2DCrossAttn":
        mapping["mid_block.attentions.0"] = "middle_block.1"
        mapping["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for k, stage in enumerate(topo.up):
        for j in range(stage.num_layers):
            mapping[f"up_blocks.{k}.resnets.{j}"] = f"output_blocks.{index}.0"
            if stage.has_attention:
                mapping[f"up_blocks.{k}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == stage.num_layers - 1 and k < last:  # the upsampler closes the stage's last layer
                slot = 2 if stage.has_attention else 1
                mapping[f"up_blocks.{k}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return mapping


def unet_key(name: str, modules: dict[str, str]) -> str:
    """The original name of one diffusers UNet parameter (or module), given ``unet_module_map``."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            rest = parts[cut:]
            if ".resnets." in f".{module}." and rest and rest[0] in _RESNET:
                rest = [_RESNET[rest[0]], *rest[1:]]
            return ".".join([modules[module], *rest])
    raise WorkbenchError(
        f"UNet parameter {name!r} has no place in the original key layout: the single-file format "
        "covers UNets built from DownBlock2D/CrossAttnDownBlock2D stages with text or no added "
        "conditioning; export this model as a diffusers folder instead"
    )


def unet_to_original(state_dict: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet state dict renamed to ``model.diffusion_model.*`` original keys."""
    modules = unet_module_map(config)
    out = {UNET_PREFIX + unet_key(k, modules): v for k, v in state_dict.items()}
    if len(out) != len(state_dict):
        raise RuntimeError("two UNet parameters mapped to one original key")
    return out


# --------------------------------------------------------------------------- VAE

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(name: str, num_up: int) -> str:
    """The original name of one ``AutoencoderKL`` parameter (encoder/decoder/quant convs)."""
    side, _, rest = name.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return name
    patterns = (
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"down.{m[1]}.block.{m[2]}.{_shortcut(m[3])}",
        ),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"down.{m[1]}.downsample.{m[2]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_shortcut(m[3])}",
        ),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"mid.block_{int(m[1]) + 1}.{_shortcut(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"mid.attn_1.{_vae_attention(m[1])}"),
        (r"(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
        (r"conv_norm_out\.(.*)", lambda m: f"norm_out.{m[1]}"),
    )
    if side in ("encoder", "decoder"):
        for pattern, rename in patterns:
            m = re.fullmatch(pattern, rest)
            if m:
                return f"{side}.{rename(m)}"
    raise WorkbenchError(f"VAE parameter {name!r} has no place in the original key layout")


def _shortcut(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut", 1)


def _vae_attention(rest: str) -> str:
    for new, old in _VAE_ATTENTION.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise WorkbenchError(f"VAE attention parameter {rest!r} has no place in the original key layout")


def vae_to_original(state_dict: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict in the original ``first_stage_model.*`` layout.

    The original attention projections are 1x1 convolutions: their weights get two trailing
    unit dimensions.
    """
    num_up = len(config["up_block_types"])
    out = {}
    for name, tensor in state_dict.items():
        key = vae_key(name, num_up)
        if ".mid.attn_1." in f".{key}" and key.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + key] = tensor
    return out


# --------------------------------------------------------------------------- text encoders

_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def hf_clip_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys as ``transformers`` wrote CLIP text models before v5.6 (``text_model.`` prefix), the
    names single files use; newer ``CLIPTextModel`` state dicts drop that prefix."""
    out = {}
    for name, tensor in state_dict.items():
        key = name if name.startswith(("text_model.", "text_projection.")) else f"text_model.{name}"
        out[key] = tensor
    return out


def clip_to_original(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An OpenAI-CLIP text encoder in the HF layout the original checkpoints keep (SD 1.x,
    SDXL's first encoder), with its position ids; the projection is not part of the layout."""
    import torch

    out = {prefix + k: v for k, v in hf_clip_names(state_dict).items() if not k.startswith("text_projection")}
    positions = out[prefix + "text_model.embeddings.position_embedding.weight"].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return out


def openclip_to_original(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A CLIP text encoder in OpenCLIP's layout (SD 2.x, SDXL's second encoder): q/k/v fused
    into ``in_proj``, the projection stored transposed (``x @ text_projection``)."""
    import torch

    names = hf_clip_names(state_dict)
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for name, tensor in names.items():
        if name in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[name]] = tensor
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(
            r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name
        ):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            if m[2] not in _OPENCLIP_LAYER:
                raise WorkbenchError(f"text encoder parameter {name!r} has no place in OpenCLIP's layout")
            out[prefix + f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = tensor
        else:
            raise WorkbenchError(f"text encoder parameter {name!r} has no place in OpenCLIP's layout")
    for key, parts in fused.items():
        out[prefix + key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --------------------------------------------------------------------------- who reads it

# Structures that single-file clients recognise, as ComfyUI's model detection reads them
# from the keys (comfy/model_detection.py, comfy/supported_models.py): base width, text
# width, added-conditioning width, linear projections, and the transformer depth of each
# down layer in order (0 for a layer without attention).
_SDXL_WIDTHS = (320, 2048, 2816, True)
PUBLISHED = {
    "SDXL": (_SDXL_WIDTHS, (0, 0, 2, 2, 10, 10)),
    "SSD-1B": (_SDXL_WIDTHS, (0, 0, 2, 2, 4, 4)),
    "Segmind-Vega": (_SDXL_WIDTHS, (0, 0, 1, 1, 2, 2)),
    "KOALA-1B": (_SDXL_WIDTHS, (0, 2, 6)),
    "KOALA-700M": (_SDXL_WIDTHS, (0, 2, 5)),
}
# SD 1.x and 2.x are recognised by widths alone; ComfyUI then builds the UNet from the file.
FAMILIES_BY_WIDTH = {
    (320, 768, None, False): "SD 1.x",
    (320, 1024, None, True): "SD 2.x",
}


@dataclass(frozen=True)
class ClientSupport:
    """Which single-file clients can load a UNet of this structure, and why."""

    structure: str | None  # the published model (or family) whose structure this is
    comfyui: bool  # ComfyUI's "Load Checkpoint" / "Load Diffusion Model" detect it
    a1111: bool  # A1111 builds it from its fixed configs
    diffusers: bool  # UNet2DConditionModel.from_single_file(file, config=folder) reads it

    def lines(self) -> list[str]:
        """One plain sentence per client."""
        comfy = (
            f"ComfyUI recognises the structure ({self.structure}) from the file's keys and loads it "
            "with 'Load Checkpoint' or 'Load Diffusion Model'."
            if self.comfyui
            else "ComfyUI does not recognise this structure: its model detection matches SDXL-family "
            "checkpoints only against the published SDXL, SSD-1B, Segmind-Vega and KOALA structures "
            "(and SD 1.x/2.x by their widths), so this file needs a custom loader there."
        )
        a1111 = (
            "A1111 builds the structure from its fixed config for this family and loads the file."
            if self.a1111
            else "A1111 builds its fixed SDXL or SD architecture for every checkpoint of the family "
            "(unless a config .yaml sits beside the file), so a block-removed student needs a custom "
            "loader there."
        )
        diffusers = (
            "diffusers reads it with `from_single_file(file, config=<this folder>)`."
            if self.diffusers
            else "diffusers' single-file converter assumes the same number of layers in every stage, "
            "which this student does not have: use the diffusers folder (or pipeline) format instead."
        )
        return [comfy, a1111, diffusers]


def client_support(config: dict[str, Any]) -> ClientSupport:
    """What the single-file clients make of a UNet with this config (see ``PUBLISHED``)."""
    topo = topology_of(config)
    linear = bool(config.get("use_linear_projection") or False)
    adm = config.get("projection_class_embeddings_input_dim") if config.get("addition_embed_type") else None
    widths = (config["block_out_channels"][0], config.get("cross_attention_dim"), adm, linear)
    depths = tuple(d for s in topo.down for d in (s.depths or (0,) * s.num_layers))
    published = next((name for name, sig in PUBLISHED.items() if sig == (widths, depths)), None)
    family = FAMILIES_BY_WIDTH.get(widths)
    teacher_shaped = published == "SDXL" or (family is not None and _is_sd_teacher_shape(config))
    return ClientSupport(
        structure=published or family,
        comfyui=bool(published or family),
        a1111=teacher_shaped,
        diffusers=isinstance(config.get("layers_per_block", 2), int),
    )


def _is_sd_teacher_shape(config: dict[str, Any]) -> bool:
    """SD 1.x/2.x's own structure: 2 layers per stage, depth 1 everywhere, a cross-attention mid block."""
    topo = topology_of(config)
    stages = (*topo.down, *topo.up)
    uniform = all(s.depths is None or set(s.depths) == {1} for s in stages)
    layers = [s.num_layers for s in topo.down] == [2] * len(topo.down)
    return uniform and layers and topo.mid_type == "UNetMidBlock2DCrossAttn" and topo.mid_depth == 1
