"""Construct the toy pipeline's components (untrained, seeded).

The UNet has SDXL's exact topology, so every SDXL unit id and compression preset
applies to it, at tiny widths so it trains on a laptop CPU. The VAE has three
levels (scale factor 4): 64 px images become 16x16x4 latents, like SDXL's 4
channels at 1/8 of SDXL's latent side.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from workbench.toy.tokenizer import MAX_LENGTH
from workbench.toy.world import RESOLUTION

TEXT_HIDDEN_1 = 32
TEXT_HIDDEN_2 = 64
TEXT_PROJECTION = 32
ADDITION_TIME_EMBED_DIM = 8
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 4
VAE_SCALE = 2 ** (len(VAE_CHANNELS) - 1)
LATENT_SIZE = RESOLUTION // VAE_SCALE


def _text_config(tokenizer: CLIPTokenizer, hidden: int, heads: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,  # the pipeline reads the penultimate layer
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling looks for this id
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def text_encoders(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    one = CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN_1, 2))
    two = CLIPTextModelWithProjection(
        _text_config(tokenizer, TEXT_HIDDEN_2, 4, projection_dim=TEXT_PROJECTION)
    )
    return one, two


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,  # flat shapes need no global attention
    )


def unet() -> UNet2DConditionModel:
    """SDXL's UNet layout (3 stages, 2 layers, depths 1/2/10, mid depth 10)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        # diffusers' historical name: this is the number of heads per stage.
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN_1 + TEXT_HIDDEN_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION,
    )


def scheduler() -> EulerDiscreteScheduler:
    """SDXL's noise schedule rescaled to zero terminal SNR, with v-prediction.

    With SDXL's own schedule the last training step still carries 6.8 % of the image
    (sqrt of alphas_cumprod[-1] = 0.0047); on 16x16 latents that is enough to read
    where the shape is, so a teacher trained on it learns to take the layout from the
    starting noise and ignores the prompt's position (the first toy did: every seed drew
    its shape in the same place whatever the prompt said). Rescaled to zero terminal
    SNR (Lin et al., 2024) the last step is pure noise and the layout must come from the
    text; epsilon is then undefined there, hence v-prediction. Trailing spacing starts
    sampling at that last training step, so the first step sees what training saw.
    """
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def assemble(
    vae_model: AutoencoderKL,
    encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    tokenizer: CLIPTokenizer,
    unet_model: UNet2DConditionModel,
) -> StableDiffusionXLPipeline:
    """The stock SDXL pipeline around our components.

    ``force_zeros_for_empty_prompt`` makes the unconditional branch all zeros,
    which is what training's prompt dropout feeds the UNet.
    """
    return StableDiffusionXLPipeline(
        vae=vae_model,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet_model,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
