"""packages/README.md's SDXL pair, a `StableDiffusionXLPipeline` snippet and a `coreml-generate` line, against the
Swift package's SDXL text-to-image written out in NumPy (swift_reference.py).

Besides the shared loop, from Apple's ml-stable-diffusion at commit e12202c (swift/StableDiffusion/pipeline/):
StableDiffusionXLPipeline.swift (conditioning: both encoders, the pooled output, the size conditioning),
StableDiffusionXL+Resources.swift (the second tokenizer pads with "!") and StableDiffusionPipeline.Configuration.swift
(the settings), written from what those files do, in this project's words.
"""
import numpy as np
import pytest

from coreml_sd.converter.docgen.swift_example import MIN_STEPS, XL_EXAMPLE, first_input_differences, leading_mismatches
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.conditioning import channels_first
from coreml_sd.runtime.prompt import END_OF_TEXT, PromptEncoder
from coreml_sd.runtime.sampling import draw_noise
from swift_reference import (LOWER_ORDER_BELOW, TRAIN_STEPS, RecordedUnet, ReplayedUnet, SwiftDPMSolver,
                             first_unet_samples, relative_error, runtime_scheduler, sampled_both_ways, swift_latents,
                             swift_timesteps)


def swift_geometry(original_size: float, crop: float, target_size: float) -> np.ndarray:
    """The base's time_ids: each setting twice (height and width), the same row for both halves of the batch."""
    row = [original_size, original_size, crop, crop, target_size, target_size]
    return np.array([row, row], dtype=np.float32)


def swift_conditioning(pipe: Pipeline, prompt: str, negative_prompt: str) -> dict[str, np.ndarray]:
    """Both encoders' hidden states side by side (first encoder's padded with the end token, the second's with
    "!"), the second's pooled output; negative prompt first, encoded whatever it is."""
    package = pipe.package
    first = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder"], END_OF_TEXT)
    second = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder2"], "!")
    hidden, pooled = [], []
    for text in (negative_prompt, prompt):
        outputs = second(text)
        hidden.append(np.concatenate([first(text)["hidden_embeds"], outputs["hidden_embeds"]], axis=2))
        pooled.append(outputs["pooled_outputs"])
    return {"encoder_hidden_states": channels_first(np.concatenate(hidden)), "text_embeds": np.concatenate(pooled)}


@pytest.fixture(scope="module")
def base(tiny_xl_packages) -> Pipeline:
    return Pipeline.from_package(tiny_xl_packages("tiny-xl"), backend="reference")


def test_leading_timesteps_are_swifts_unless_steps_plus_one_divides_1000(base):
    differing = [steps for steps in range(1, TRAIN_STEPS)
                 if runtime_scheduler(base, XL_EXAMPLE, steps).timesteps.tolist() != swift_timesteps("leading", steps)]
    assert differing == leading_mismatches(TRAIN_STEPS)  # the rule packages/README.md states
    assert XL_EXAMPLE.steps not in differing


@pytest.mark.parametrize("steps", [2, LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps])
def test_noise_levels_are_swifts(base, steps):
    """The noise level at each timestep is Swift's sigma / alpha; diffusers' last one is zero where Swift steps to
    timestep 0, and what Swift decodes instead is the denoised prediction that a step to zero returns."""
    scheduler = runtime_scheduler(base, XL_EXAMPLE, steps)
    solver = SwiftDPMSolver(steps, XL_EXAMPLE.spacing)
    levels = solver.sigma[solver.timesteps] / solver.alpha[solver.timesteps]
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), levels, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    assert scheduler.init_noise_sigma == 1  # Swift's initial noise is NumPy's draws, unscaled


@pytest.mark.parametrize("steps", [LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps])
def test_sampling_ends_with_the_latents_swift_decodes(base, steps):
    """From 15 steps on, Swift's steps after the first are all second order; diffusers' too but the last, which goes
    to noise level zero at first order and so returns the denoised prediction that Swift decodes."""
    ours, swift, orders = sampled_both_ways(base, XL_EXAMPLE, steps)
    assert orders == [1] + [2] * (steps - 1)
    assert relative_error(ours, swift) < 1e-5  # float32 rounding, and the float16 inputs of the Unet it flips


def test_shorter_schedules_part_at_the_second_to_last_step(base):
    """Under 15 steps Swift takes its second-to-last step at first order, where diffusers (solver order 2) takes it
    at second order: the reason packages/README.md asks for 15 steps or more."""
    assert XL_EXAMPLE.steps >= LOWER_ORDER_BELOW == MIN_STEPS  # the rule packages/README.md states
    ours, swift, orders = sampled_both_ways(base, XL_EXAMPLE, 5)
    assert orders == [1, 2, 2, 1, 1]
    assert relative_error(ours, swift) > 1e-3


def test_first_unet_input_is_swifts_but_where_float32_rounding_moves_it():
    ours, swift = first_unet_samples(XL_EXAMPLE)
    assert (int(np.count_nonzero(ours != swift)), ours.size) == first_input_differences(XL_EXAMPLE)  # the README's


def test_generate_defaults_give_swifts_unet_inputs_and_latents(base, monkeypatch):
    """coreml-generate's defaults (size conditioning: the package's size, crop (0, 0)) with the snippet's prompts,
    seed, guidance and scheduler, through the tiny-xl Unet: each Unet call gets the inputs Swift builds with the
    snippet's settings at the package's size, and the latents to decode are Swift's."""
    steps = 2  # the tiny Unet is slow here; two first-order steps, taken alike in both (see above)
    recorded = RecordedUnet(base.sampler.unet)
    monkeypatch.setattr(base.sampler, "unet", recorded)
    ours = base(XL_EXAMPLE.prompt, negative_prompt=XL_EXAMPLE.negative_prompt, steps=steps, scheduler="dpm++",
                seed=XL_EXAMPLE.seed, guidance_scale=XL_EXAMPLE.guidance_scale, output_type="latent",
                progress=False).images[0].numpy()
    assert base.width == base.height  # Swift's size settings are one number each
    conditioning = {**swift_conditioning(base, XL_EXAMPLE.prompt, XL_EXAMPLE.negative_prompt),
                    "time_ids": swift_geometry(original_size=base.height, crop=0, target_size=base.height)}
    noise = draw_noise(np.random.RandomState(XL_EXAMPLE.seed), ours.shape)
    replayed = ReplayedUnet(recorded)
    swift, _ = swift_latents(replayed, conditioning, noise, steps, XL_EXAMPLE.guidance_scale, XL_EXAMPLE.spacing)
    assert next(replayed.calls, None) is None  # as many Unet calls
    assert relative_error(ours, swift) < 1e-5
