"""The embedded `tiny` model: SD v1's architecture at toy size, random weights from a fixed seed.

It is built locally in seconds without network, and it is the same object for the converter
(`coreml-convert --model tiny`) and for the tests, which compare every package with it.
"""
from importlib import resources

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from coreml_sd.runtime.safety import SD_FEATURE_EXTRACTOR

SEED = 0
TEXT_WIDTH = 32

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    sample_size=128,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# A CLIP vision tower at toy size; the input stays CLIP's 224x224, as the contract has it.
SAFETY_CHECKER_CONFIG = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=32, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
    projection_dim=16,
)
# Cosine similarities never exceed 1, so with these thresholds the random concepts flag nothing; tests set
# their own to flag chosen images.
SAFETY_THRESHOLD = 1.0

# SD v1.4's scheduler configuration.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def clip_vocabulary_files() -> tuple[str, str]:
    """Paths of the packaged CLIP BPE files (see scripts/derive_clip_vocab.py for their origin)."""
    data = resources.files("coreml_sd.converter") / "data"
    return str(data / "vocab.json"), str(data / "merges.txt")


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = clip_vocabulary_files()
    return CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="<|endoftext|>")


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """The tiny pipeline in float32, identical weights on every call (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    return assemble_pipeline(unet, vae, text_encoder)


def build_tiny_inpainting_pipeline() -> StableDiffusionPipeline:
    """The tiny pipeline with an inpainting Unet (9 input channels: latents, mask, masked image's latents); its
    VAE and text encoder are the tiny model's."""
    tiny = build_tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 9})
    return assemble_pipeline(unet, tiny.vae, tiny.text_encoder)


def assemble_pipeline(unet, vae, text_encoder, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
    """An SD v1 pipeline (PNDM unless `scheduler` is given, the CLIP tokenizer, no safety checker) on the given
    modules, in eval mode."""
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler or PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_safety_checker() -> tuple[StableDiffusionSafetyChecker, dict]:
    """The tiny safety checker in float32 (a random CLIP vision tower and random concepts, from its own seed so
    the pipeline's weights stay as they are) and its feature extractor's configuration (SD v1.4's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        checker = StableDiffusionSafetyChecker(CLIPConfig(**SAFETY_CHECKER_CONFIG))
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            checker.concept_embeds_weights.fill_(SAFETY_THRESHOLD)
            checker.special_care_embeds_weights.fill_(SAFETY_THRESHOLD)
    return checker.eval(), dict(SD_FEATURE_EXTRACTOR)
