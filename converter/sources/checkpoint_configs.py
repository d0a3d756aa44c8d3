"""The configurations a single-file checkpoint needs, shipped as data so that no conversion goes online.

A single file (CompVis/LDM layout) holds weights only; diffusers' single-file loader fetches the matching
diffusers configs from the hub. These are the published values of those configs (the Unet, VAE, text
encoder and scheduler of stable-diffusion-v1-5, stable-diffusion-2-base and stable-diffusion-2-1); the
tokenizer is CLIP's BPE, which the converter ships (converter/data).
"""
from dataclasses import dataclass

from ..families import Family
from ..families.sd import SD

PREDICTION_TYPES = ("epsilon", "v_prediction")

SD_UNET_BLOCKS = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
)
SD1_UNET = dict(SD_UNET_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(SD_UNET_BLOCKS, sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True)
SD2_V_UNET = dict(SD2_UNET, sample_size=96)

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

CLIP_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407)
# OpenAI's CLIP ViT-L/14 text tower (SD 1.x).
CLIP_L_TEXT = dict(CLIP_TOKENS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
# OpenCLIP ViT-H/14's text tower (SD 2.x) without its last layer: SD 2.x conditions on the penultimate
# layer's output through the final layer norm, which is this model's last_hidden_state.
OPEN_CLIP_H_TEXT = dict(CLIP_TOKENS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                        num_attention_heads=16, hidden_act="gelu", projection_dim=512)

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   set_alpha_to_one=False, steps_offset=1, clip_sample=False)
PNDM_EPSILON = dict(SD_SCHEDULE, _class_name="PNDMScheduler", skip_prk_steps=True, prediction_type="epsilon")
DDIM_V_PREDICTION = dict(SD_SCHEDULE, _class_name="DDIMScheduler", prediction_type="v_prediction")


@dataclass(frozen=True)
class ModelType:
    """What `--model-type` names: a family and the diffusers configs of its modules."""

    description: str
    family: Family
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    pad_token: str = "<|endoftext|>"


MODEL_TYPES = {
    "sd1": ModelType("SD 1.x (CLIP ViT-L text encoder, 512x512, epsilon)", SD, SD1_UNET, SD_VAE, CLIP_L_TEXT,
                     PNDM_EPSILON),
    # SD 2.x was trained with OpenCLIP's tokenizer, which pads with id 0 ("!"), as its diffusers tokenizer does.
    "sd2": ModelType("SD 2.x base (OpenCLIP ViT-H text encoder, 512x512, epsilon)", SD, SD2_UNET, SD_VAE,
                     OPEN_CLIP_H_TEXT, PNDM_EPSILON, pad_token="!"),
    "sd2-v": ModelType("SD 2.x 768-v (OpenCLIP ViT-H text encoder, 768x768, v-prediction)", SD, SD2_V_UNET,
                       dict(SD_VAE, sample_size=768), OPEN_CLIP_H_TEXT, DDIM_V_PREDICTION, pad_token="!"),
}
# Names --model-type accepts that this converter cannot convert from a single file yet.
NOT_YET = {"sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner"}
