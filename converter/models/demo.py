"""The embedded `demo` model: a small latent diffusion model trained here on synthetic pictures of coloured shapes.

Its architectures are SD v1's (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel with the
CLIP BPE tokenizer) at a size that trains on two CPU cores; its weights ship with the converter as safetensors in
data/demo/ (see the model card there, and scripts/train_demo_model.py, which trained them).
"""
import hashlib
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from . import tiny

IMAGE_SIZE = 64  # pixels; 8x8 latents
TEXT_WIDTH = 48

# tiny's configurations (SD v1's architectures at toy size), at 64x64 pixels and with a wider, deeper text encoder.
UNET_CONFIG = dict(tiny.UNET_CONFIG, sample_size=IMAGE_SIZE // 8, cross_attention_dim=TEXT_WIDTH)
VAE_CONFIG = dict(
    tiny.VAE_CONFIG,
    sample_size=IMAGE_SIZE,
    block_out_channels=(16, 32, 64, 64),
    scaling_factor=1.0,  # replaced by the trained latents' 1 / std (stored with the weights)
)
TEXT_ENCODER_CONFIG = dict(
    tiny.TEXT_ENCODER_CONFIG,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=6,
)

# SD v1's betas rescaled to a zero terminal SNR, v-prediction and "trailing" timesteps (Lin et al. 2024, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"): at the first sampling step the latents hold no trace of
# a picture, so the prompt, not the noise, decides where the shape goes. SD v1's schedule leaves a faint picture
# in its noisiest latents, and a model trained on it reads the layout out of the seed's noise.
SCHEDULER_CONFIG = dict(tiny.SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                        timestep_spacing="trailing")

WEIGHT_FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}
SCALING_FACTOR_KEY = "scaling_factor"  # safetensors metadata of vae.safetensors


def build_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ on the demo's schedule (PNDM and LMS know no zero-SNR rescaling)."""
    return DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)


def weights_folder() -> Path:
    return Path(str(resources.files("coreml_sd.converter") / "data" / "demo"))


def weights_digest(folder: Path | None = None) -> str:
    """SHA-256 over the three weight files: a package records it, so a retrained model converts again."""
    folder = folder or weights_folder()
    digest = hashlib.sha256()
    for name in sorted(WEIGHT_FILES.values()):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def build_modules() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The three modules with their initial (random, seeded by the caller) weights."""
    return (UNet2DConditionModel(**UNET_CONFIG), AutoencoderKL(**VAE_CONFIG),
            CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)))


def build_demo_pipeline(folder: Path | None = None) -> StableDiffusionPipeline:
    """The demo pipeline in float32 with the shipped weights (or those in `folder`)."""
    folder = folder or weights_folder()
    missing = [name for name in WEIGHT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: reinstall coreml-sd, or train them with "
                                "scripts/train_demo_model.py")
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced; leave the caller's RNG alone
        unet, vae, text_encoder = build_modules()
    for module_name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        state = {name: tensor.float() for name, tensor in load_file(folder / WEIGHT_FILES[module_name]).items()}
        module.load_state_dict(state, strict=True)

    with safe_open(folder / WEIGHT_FILES["vae"], "pt") as weights:
        vae.register_to_config(scaling_factor=float(weights.metadata()[SCALING_FACTOR_KEY]))
    return tiny.assemble_pipeline(unet, vae, text_encoder, build_scheduler())
