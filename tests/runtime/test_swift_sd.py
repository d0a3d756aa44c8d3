"""packages/README.md's SD 1.x pair, a `StableDiffusionPipeline` snippet and a `coreml-generate` line, against the
Swift package's SD text-to-image written out in NumPy (swift_reference.py).

Besides the shared loop, from Apple's ml-stable-diffusion at commit e12202c (swift/StableDiffusion/): the
conditioning of pipeline/StableDiffusionPipeline.swift (the negative prompt encoded whatever it is, first; the text
encoder's `last_hidden_state`, channels first), tokenizer/BPETokenizer.swift (pads with the end-of-text token), the
settings of pipeline/StableDiffusionPipeline.Configuration.swift (`.linspace` is the default spacing), written from
what those files do, in this project's words.
"""
import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler

from coreml_sd.converter.sources.checkpoint_configs import DDIM_V_PREDICTION, PNDM_EPSILON
from coreml_sd.converter.docgen.swift_example import (LINSPACE_MISMATCH_COUNT, LINSPACE_MISMATCHES, MIN_STEPS, SD_EXAMPLE,
                                               first_input_differences, pndm_final_coefficients)
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.conditioning import channels_first
from coreml_sd.runtime import contract
from coreml_sd.runtime.prompt import END_OF_TEXT, PromptEncoder
from coreml_sd.runtime.sampling import Sampling, draw_noise
from coreml_sd.runtime.schedulers import build_scheduler
from swift_reference import (LOWER_ORDER_BELOW, TRAIN_STEPS, RecordedUnet, ReplayedUnet, SwiftDPMSolver,
                             first_unet_samples, relative_error, runtime_scheduler, sampled_both_ways, swift_latents,
                             swift_timesteps)


@pytest.fixture(scope="module")
def sd(tiny_packages) -> Pipeline:
    return Pipeline.from_package(tiny_packages(), backend="reference")


def swift_conditioning(pipe: Pipeline, prompt: str, negative_prompt: str) -> dict[str, np.ndarray]:
    """The text encoder's last hidden states (prompts padded with the end token), negative prompt first, encoded
    whatever it is."""
    package = pipe.package
    encoder = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder"], END_OF_TEXT)
    hidden = [encoder(text)["last_hidden_state"] for text in (negative_prompt, prompt)]
    return {"encoder_hidden_states": channels_first(np.concatenate(hidden))}


def test_linspace_timesteps_are_swifts_for_odd_step_counts(sd):
    """Odd counts never put a timestep at a half; even ones always do (at 999 / 2), which float32 arithmetic and
    rounding halves away from zero (Swift) and float64 with halves to even (NumPy) may round apart."""
    differing = [steps for steps in range(1, TRAIN_STEPS)
                 if runtime_scheduler(sd, SD_EXAMPLE, steps).timesteps.tolist() != swift_timesteps("linspace", steps)]
    assert all(steps % 2 == 0 for steps in differing)
    # the rule packages/README.md states
    assert [steps for steps in differing if steps <= LINSPACE_MISMATCHES[-1]] == list(LINSPACE_MISMATCHES)
    assert len(differing) == LINSPACE_MISMATCH_COUNT
    assert SD_EXAMPLE.steps % 2 == 1 and SD_EXAMPLE.steps >= MIN_STEPS == LOWER_ORDER_BELOW


@pytest.mark.parametrize("config", [contract.SD.scheduler_config, PNDM_EPSILON, DDIM_V_PREDICTION],
                         ids=["sd-defaults", "sd1-and-sd2-base", "sd2-v"])
def test_sd_scheduler_configurations_leave_dpm_solver_at_linspace(config):
    """SD 1.x's and SD 2.x's scheduler configurations (the runtime's default for bundles without a manifest, and the
    converter's for single files) name no spacing, so DPM-Solver++ takes its own default, which `steps_offset`
    (set to 1 by the runtime, as diffusers' SD pipeline does) does not move."""
    scheduler = build_scheduler("dpm++", config, config.get("prediction_type", "epsilon"))
    assert "timestep_spacing" not in config and scheduler.config.timestep_spacing == "linspace"
    scheduler.set_timesteps(SD_EXAMPLE.steps)
    assert scheduler.timesteps.tolist() == swift_timesteps(SD_EXAMPLE.spacing, SD_EXAMPLE.steps)
    unshifted = DPMSolverMultistepScheduler.from_config(scheduler.config, steps_offset=0)
    unshifted.set_timesteps(SD_EXAMPLE.steps)
    assert unshifted.timesteps.tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [2, LOWER_ORDER_BELOW, SD_EXAMPLE.steps])
def test_noise_levels_are_swifts(sd, steps):
    scheduler = runtime_scheduler(sd, SD_EXAMPLE, steps)
    solver = SwiftDPMSolver(steps, SD_EXAMPLE.spacing)
    levels = solver.sigma[solver.timesteps] / solver.alpha[solver.timesteps]
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), levels, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0 and scheduler.init_noise_sigma == 1


def test_pndm_ends_short_of_the_denoised_prediction(sd):
    """diffusers' PNDM, coreml-generate's default, steps last to alphas_cumprod[0], not to 1: the coefficients
    packages/README.md gives for what it returns, where Swift decodes the denoised prediction."""
    scheduler = sd.sampler.scheduler(Sampling("pndm", SD_EXAMPLE.steps, SD_EXAMPLE.guidance_scale, 1.0))
    final = float(scheduler.final_alpha_cumprod)
    # the scheduler's tables are float32
    np.testing.assert_allclose((np.sqrt(final), np.sqrt(1 - final)), pndm_final_coefficients(), rtol=1e-4)


@pytest.mark.parametrize("steps", [LOWER_ORDER_BELOW, SD_EXAMPLE.steps])
def test_sampling_ends_with_the_latents_swift_decodes(sd, steps):
    ours, swift, orders = sampled_both_ways(sd, SD_EXAMPLE, steps)
    assert orders == [1] + [2] * (steps - 1)
    assert relative_error(ours, swift) < 1e-5  # float32 rounding, and the float16 inputs of the Unet it flips


def test_shorter_schedules_part_at_the_second_to_last_step(sd):
    ours, swift, orders = sampled_both_ways(sd, SD_EXAMPLE, 5)
    assert orders == [1, 2, 2, 1, 1]
    assert relative_error(ours, swift) > 1e-3


def test_first_unet_input_is_swifts_but_where_float32_rounding_moves_it():
    ours, swift = first_unet_samples(SD_EXAMPLE)
    assert (int(np.count_nonzero(ours != swift)), ours.size) == first_input_differences(SD_EXAMPLE)  # the README's


def test_generate_defaults_give_swifts_unet_inputs_and_latents(sd, monkeypatch):
    """coreml-generate's defaults (an empty negative prompt, encoded) with the snippet's prompt, seed, steps, guidance
    and scheduler, through the tiny Unet: each Unet call gets the inputs Swift builds with the snippet's settings,
    and the latents to decode are Swift's."""
    recorded = RecordedUnet(sd.sampler.unet)
    monkeypatch.setattr(sd.sampler, "unet", recorded)
    assert SD_EXAMPLE.negative_prompt == ""  # the snippet and the command line leave it at both sides' default
    ours = sd(SD_EXAMPLE.prompt, steps=SD_EXAMPLE.steps, scheduler="dpm++", seed=SD_EXAMPLE.seed,
              guidance_scale=SD_EXAMPLE.guidance_scale, output_type="latent", progress=False).images[0].numpy()
    conditioning = swift_conditioning(sd, SD_EXAMPLE.prompt, SD_EXAMPLE.negative_prompt)
    noise = draw_noise(np.random.RandomState(SD_EXAMPLE.seed), ours.shape)
    replayed = ReplayedUnet(recorded)
    swift, orders = swift_latents(replayed, conditioning, noise, SD_EXAMPLE.steps, SD_EXAMPLE.guidance_scale,
                                  SD_EXAMPLE.spacing)
    assert next(replayed.calls, None) is None  # as many Unet calls
    assert orders == [1] + [2] * (SD_EXAMPLE.steps - 1)
    assert relative_error(ours, swift) < 1e-5
