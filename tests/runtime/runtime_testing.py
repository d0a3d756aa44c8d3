"""Helpers shared by the runtime tests: image comparison and diffusers' pipelines fed the runtime's noise."""
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    TCDScheduler,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img
from PIL import Image

from coreml_sd.runtime.sampling import draw_noise

PSNR_THRESHOLD_DB = 55.0  # images end to end measure 57.5-58.5 dB against diffusers
# The runtime's scheduler names, mapped here to diffusers' classes as they come.
DIFFUSERS_SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
}


def latent_shape(reference: StableDiffusionPipeline) -> tuple[int, int, int, int]:
    """The shape of one image's latents at the reference Unet's own size (the runtime's noise is drawn in it)."""
    side = reference.unet.config.sample_size
    return (1, reference.unet.config.in_channels, side, side)


def feather(length: int, overlap: int, neighbour_before: bool, neighbour_after: bool) -> np.ndarray:
    """MultiDiffusion's cross-fade along one side of a window, from its definition: a cell at distance d from an edge
    that meets a neighbour weighs (d + 1/2) / overlap, at most 1."""
    distance = np.arange(length, dtype=np.float64)
    weights = np.ones(length)
    if neighbour_before:
        weights = np.minimum(weights, (distance + 0.5) / overlap)
    if neighbour_after:
        weights = np.minimum(weights, (length - 1 - distance + 0.5) / overlap)
    return weights


def pixels(image: Image.Image) -> np.ndarray:
    """A PIL image as floats in [0, 1], the range diffusers' output_type="np" uses."""
    return np.asarray(image, np.float64) / 255


def _with_scheduler(cls, reference: StableDiffusionPipeline, scheduler: str, config: dict):
    """A diffusers pipeline of class `cls` on the reference's modules, with the named scheduler configured
    from `config` (the package's scheduler configuration, as the runtime configures it)."""
    scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(config)
    pipe = cls(**{**reference.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_txt2img(
    reference, config: dict, prompt: str, negative_prompt: str, scheduler: str, steps: int, seed: int,
    guidance_scale: float = 7.5,
) -> np.ndarray:
    """diffusers' text-to-image started from the runtime's initial noise for `seed`."""
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(reference)))
    return _with_scheduler(StableDiffusionPipeline, reference, scheduler, config)(
        prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=latents,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


def diffusers_img2img(
    reference,
    config: dict,
    prompt: str,
    negative_prompt: str,
    scheduler: str,
    steps: int,
    seed: int,
    image: Image.Image,
    strength: float,
    monkeypatch,
    guidance_scale: float = 7.5,
    **embeddings: torch.Tensor,
) -> np.ndarray:
    """diffusers' image-to-image fed the runtime's noise for `seed`: first the noise it adds at the start
    step (diffusers draws it with `randn_tensor`, replaced here), then the VAE posterior's sample. `embeddings`
    (prompt_embeds, negative_prompt_embeds) stand for the prompts."""
    rng = np.random.RandomState(seed)
    noise = torch.from_numpy(draw_noise(rng, latent_shape(reference)))
    sample_noise = torch.from_numpy(draw_noise(rng, latent_shape(reference)))
    x = torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    with torch.no_grad():
        posterior = reference.vae.encode(x).latent_dist
    init_latents = (posterior.mean + posterior.std * sample_noise) * reference.vae.config.scaling_factor
    monkeypatch.setattr(pipeline_stable_diffusion_img2img, "randn_tensor", lambda *args, **kwargs: noise)
    return _with_scheduler(StableDiffusionImg2ImgPipeline, reference, scheduler, config)(
        prompt,
        negative_prompt=negative_prompt or None,
        image=init_latents,  # four channels: taken as latents, not encoded again
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **embeddings,
    ).images[0]
