"""The pipeline's step hook (what `coreml-sd serve` reports progress and interrupts with) against diffusers'
`callback_on_step_end` and its interrupt flag, on the tiny model's own float32 modules."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.sampling import draw_noise

from runtime_testing import _with_scheduler, latent_shape, pixels

LOGIC_PSNR_DB = 50.0  # as test_runtime_pipeline_logic.py: 8-bit rounding apart (~59 dB)
PROMPT = "a photo of an astronaut riding a horse"
STEPS, STOP_AFTER, SEED = 5, 2, 3


@pytest.fixture(scope="module")
def pipe(package, contract_models) -> Pipeline:
    return Pipeline(package, contract_models(unet_batch_size=2), backend="pytorch", compute_unit="ALL")


def diffusers_interrupted(reference, config: dict) -> tuple[np.ndarray, list[torch.Tensor]]:
    """diffusers' image when its callback sets the interrupt flag after step STOP_AFTER, and the latents each step
    showed the callback."""
    seen = []

    def interrupt(pipeline, index, timestep, tensors):
        seen.append(tensors["latents"].clone())
        pipeline._interrupt = index + 1 == STOP_AFTER
        return tensors

    latents = torch.from_numpy(draw_noise(np.random.RandomState(SEED), latent_shape(reference)))
    image = _with_scheduler(StableDiffusionPipeline, reference, "ddim", config)(
        PROMPT, num_inference_steps=STEPS, latents=latents, generator=torch.Generator().manual_seed(SEED),
        output_type="np", callback_on_step_end=interrupt).images[0]
    return image, seen


def test_a_hook_that_stops_ends_the_pass_as_diffusers_interrupt_does(pipe, package, tiny_pipeline):
    seen = []

    def stop(done: int, total: int, latents: torch.Tensor) -> bool:
        seen.append((done, total, latents.clone()))
        return done == STOP_AFTER

    ours = pipe(PROMPT, steps=STEPS, scheduler="ddim", seed=SEED, progress=False, on_step=stop)
    reference, reference_latents = diffusers_interrupted(tiny_pipeline, package.scheduler_config)
    assert [(done, total) for done, total, _ in seen] == [(1, STEPS), (2, STEPS)]
    for (_, _, latents), expected in zip(seen, reference_latents):
        # the models take float16 inputs, diffusers float32: measured up to 1.4e-4 apart at step 2
        torch.testing.assert_close(latents, expected, rtol=1e-3, atol=1e-3)
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB
    whole = pipe(PROMPT, steps=STEPS, scheduler="ddim", seed=SEED, progress=False)
    assert psnr(pixels(whole.images[0]), pixels(ours.images[0])) < LOGIC_PSNR_DB  # stopping changed the image


def test_a_hook_that_raises_aborts_the_generation(pipe):
    class Abort(Exception):
        pass

    def abort(done: int, total: int, latents: torch.Tensor) -> bool:
        raise Abort

    with pytest.raises(Abort):
        pipe(PROMPT, steps=STEPS, seed=SEED, progress=False, on_step=abort)
