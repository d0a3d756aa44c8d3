"""SDXL generation from the tiny-xl packages through the reference executor, against diffusers'
StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline fed the same NumPy-RNG latents: text-to-image
with and without a negative prompt, the base + refiner ensemble, and image-to-image."""
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img

from coreml_sd.runtime import GenerationError, Pipeline
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.sampling import draw_noise

from runtime_testing import PSNR_THRESHOLD_DB, pixels

PROMPT = "a photo of an astronaut riding a horse"
LATENT_SHAPE = (1, 4, 16, 16)
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler}
STEPS = 3


@pytest.fixture(scope="module")
def base(tiny_xl_packages) -> Pipeline:
    return Pipeline.from_package(tiny_xl_packages("tiny-xl"), backend="reference")


@pytest.fixture(scope="module")
def refiner(tiny_xl_packages) -> Pipeline:
    return Pipeline.from_package(tiny_xl_packages("tiny-xl-refiner"), backend="reference")


def with_scheduler(reference, scheduler: str, config: dict):
    reference.scheduler = SCHEDULERS[scheduler].from_config(config)
    return reference


def initial_latents(seed: int) -> torch.Tensor:
    return torch.from_numpy(draw_noise(np.random.RandomState(seed), LATENT_SHAPE))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_txt2img_matches_diffusers(base, tiny_xl_pipeline, scheduler, negative_prompt):
    ours = base(PROMPT, negative_prompt=negative_prompt, steps=STEPS, scheduler=scheduler, seed=5, progress=False)
    reference = with_scheduler(tiny_xl_pipeline, scheduler, base.package.scheduler_config)(
        PROMPT, negative_prompt=negative_prompt or None, num_inference_steps=STEPS, guidance_scale=7.5,
        latents=initial_latents(5), height=128, width=128, output_type="np",
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB


def test_scheduler_defaults_to_the_models_euler(base):
    assert base(PROMPT, steps=1, seed=1, progress=False).parameters[0].count("Sampler: Euler,") == 1


def test_size_conditioning_changes_the_image(base):
    from coreml_sd.runtime.conditioning import SizeConditioning

    plain = base(PROMPT, steps=1, seed=2, progress=False).images[0]
    cropped = base(PROMPT, steps=1, seed=2, size_conditioning=SizeConditioning((512, 512), (64, 0)),
                   progress=False).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(cropped))


def test_base_and_refiner_match_the_diffusers_ensemble(base, refiner, tiny_xl_pipeline, tiny_xl_refiner_pipeline):
    steps, start = 5, 0.6
    ours = base(PROMPT, steps=steps, seed=9, refiner=refiner, refiner_start=start, progress=False)
    config = base.package.scheduler_config
    latents = with_scheduler(tiny_xl_pipeline, "euler", config)(
        PROMPT, num_inference_steps=steps, denoising_end=start, guidance_scale=7.5, latents=initial_latents(9),
        height=128, width=128, output_type="latent",
    ).images
    reference = with_scheduler(tiny_xl_refiner_pipeline, "euler", refiner.package.scheduler_config)(
        PROMPT, image=latents, num_inference_steps=steps, denoising_start=start, guidance_scale=7.5, output_type="np",
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB
    assert f"Refiner: {refiner.package.name}, Refiner start: {start}" in ours.parameters[0]


def test_refiner_must_be_an_sdxl_refiner(base):
    with pytest.raises(GenerationError, match="refiner package"):
        base(PROMPT, steps=1, seed=1, refiner=base, progress=False)


def test_img2img_matches_diffusers(base, tiny_xl_pipeline, start_image, monkeypatch):
    strength, seed = 0.6, 4
    ours = base(PROMPT, steps=STEPS + 2, seed=seed, image=start_image, strength=strength, progress=False)
    rng = np.random.RandomState(seed)
    noise = torch.from_numpy(draw_noise(rng, LATENT_SHAPE))
    sample_noise = torch.from_numpy(draw_noise(rng, LATENT_SHAPE))
    vae = tiny_xl_pipeline.vae
    x = torch.from_numpy(np.asarray(start_image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    init_latents = (posterior.mean + posterior.std * sample_noise) * vae.config.scaling_factor
    monkeypatch.setattr(pipeline_stable_diffusion_xl_img2img, "randn_tensor", lambda *args, **kwargs: noise)
    pipe = StableDiffusionXLImg2ImgPipeline(**tiny_xl_pipeline.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    reference = with_scheduler(pipe, "euler", base.package.scheduler_config)(
        PROMPT, image=init_latents, strength=strength, num_inference_steps=STEPS + 2, guidance_scale=7.5,
        output_type="np",
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB
