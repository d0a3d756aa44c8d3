"""`tiny-xl` and `tiny-xl-refiner`: SDXL's architecture at toy size, random weights from a fixed seed.

Like `tiny` (coreml_sd.converter.models.tiny), built in memory in about a second, for trying things out and for the
tests, which compare every package with these diffusers pipelines. The base has SDXL's two text encoders (the
second with projection, padding with "!"), a Unet with `text_time` conditioning and two transformer layers in
its deepest blocks, and SDXL's VAE settings; the refiner shares the base's second text encoder and VAE, as
stabilityai's refiner does, with its own Unet conditioned on an aesthetic score instead of the target size.
"""
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .tiny import VAE_CONFIG, clip_vocabulary_files

SEED = 0
TEXT_WIDTH = 32  # the first encoder's (CLIP ViT-L in SDXL, 768)
TEXT_WIDTH_2 = 64  # the second's (OpenCLIP bigG, 1280), also its projection's
TIME_EMBED_DIM = 8  # each size number's sinusoidal embedding (256 in SDXL)

# SDXL's text encoders keep the legacy end-of-text id 2: transformers pools at the highest token id.
_TEXT_ENCODER_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
TEXT_ENCODER_CONFIG = dict(_TEXT_ENCODER_COMMON, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH)
TEXT_ENCODER_2_CONFIG = dict(_TEXT_ENCODER_COMMON, hidden_size=TEXT_WIDTH_2, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, hidden_act="gelu", projection_dim=TEXT_WIDTH_2)

_UNET_COMMON = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
)
UNET_CONFIG = dict(
    _UNET_COMMON,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
    projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 6 * TIME_EMBED_DIM,
)
REFINER_UNET_CONFIG = dict(
    _UNET_COMMON,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=4,
    cross_attention_dim=TEXT_WIDTH_2,
    projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 5 * TIME_EMBED_DIM,
)
# SDXL's VAE is SD's architecture with another latent scale (and float32 decoding in diffusers).
XL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)

# stabilityai/stable-diffusion-xl-base-1.0's scheduler configuration.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two CLIP tokenizers: the same BPE files, the second padding with "!" instead of the end token."""
    vocab, merges = clip_vocabulary_files()
    return (CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="<|endoftext|>"),
            CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!"))


def _build_modules() -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval(),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG)).eval(),
            "vae": AutoencoderKL(**XL_VAE_CONFIG).eval(),
            "unet": UNet2DConditionModel(**UNET_CONFIG).eval(),
            "refiner_unet": UNet2DConditionModel(**REFINER_UNET_CONFIG).eval(),
        }


def build_tiny_xl_pipeline() -> StableDiffusionXLPipeline:
    """The tiny SDXL base in float32, identical weights on every call (the global RNG is left untouched)."""
    modules = _build_modules()
    tokenizer, tokenizer_2 = build_tokenizers()
    pipeline = StableDiffusionXLPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=modules["unet"],
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG), add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_xl_refiner_pipeline() -> StableDiffusionXLImg2ImgPipeline:
    """The tiny SDXL refiner in float32: the base's second text encoder and VAE, its own Unet."""
    modules = _build_modules()
    _, tokenizer_2 = build_tokenizers()
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=modules["vae"], text_encoder=None, text_encoder_2=modules["text_encoder_2"], tokenizer=None,
        tokenizer_2=tokenizer_2, unet=modules["refiner_unet"], scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
