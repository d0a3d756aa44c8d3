"""packages/README.md's Swift pairs (SD 1.x and SDXL), each a Swift snippet and a `coreml-generate` line, against the
Swift package's text-to-image written out in NumPy (swift_reference.py).

Besides the shared loop, from Apple's ml-stable-diffusion at commit e12202c (swift/StableDiffusion/): the
conditioning of pipeline/StableDiffusionPipeline.swift (the negative prompt encoded whatever it is, first; the text
encoder's `last_hidden_state`, channels first) and of pipeline/StableDiffusionXLPipeline.swift (both encoders, the
pooled output, the size conditioning), tokenizer/BPETokenizer.swift (pads with the end-of-text token; SDXL's second
tokenizer pads with "!", StableDiffusionXL+Resources.swift), and the settings of
pipeline/StableDiffusionPipeline.Configuration.swift (`.linspace` is the default spacing), written from what those
files do, in this project's words.
"""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler

from coreml_sd.converter.docgen.swift_example import (
    LINSPACE_MISMATCH_COUNT,
    LINSPACE_MISMATCHES,
    MIN_STEPS,
    SD_EXAMPLE,
    XL_EXAMPLE,
    Example,
    first_input_differences,
    leading_mismatches,
    pndm_final_coefficients,
)
from coreml_sd.converter.sources.checkpoint_configs import DDIM_V_PREDICTION, PNDM_EPSILON
from coreml_sd.runtime import Pipeline, contract
from coreml_sd.runtime.conditioning import channels_first
from coreml_sd.runtime.prompt import END_OF_TEXT, PromptEncoder
from coreml_sd.runtime.sampling import Sampling, draw_noise
from coreml_sd.runtime.schedulers import build_scheduler

from swift_reference import (
    LOWER_ORDER_BELOW,
    TRAIN_STEPS,
    RecordedUnet,
    ReplayedUnet,
    SwiftDPMSolver,
    first_unet_samples,
    relative_error,
    runtime_scheduler,
    sampled_both_ways,
    swift_latents,
    swift_timesteps,
)


def sd_conditioning(pipe: Pipeline, example: Example) -> dict[str, np.ndarray]:
    """The text encoder's last hidden states (prompts padded with the end token), negative prompt first, encoded
    whatever it is."""
    package = pipe.package
    encoder = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder"], END_OF_TEXT)
    hidden = [encoder(text)["last_hidden_state"] for text in (example.negative_prompt, example.prompt)]
    return {"encoder_hidden_states": channels_first(np.concatenate(hidden))}


def xl_conditioning(pipe: Pipeline, example: Example) -> dict[str, np.ndarray]:
    """Both encoders' hidden states side by side (first encoder's padded with the end token, the second's with
    "!"), the second's pooled output; negative prompt first, encoded whatever it is. The base's time_ids: each size
    setting twice (height and width; Swift's are one number each), the same row for both halves of the batch, at the
    package's size with crop (0, 0) (coreml-generate's defaults)."""
    package = pipe.package
    first = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder"], END_OF_TEXT)
    second = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder2"], "!")
    hidden, pooled = [], []
    for text in (example.negative_prompt, example.prompt):
        outputs = second(text)
        hidden.append(np.concatenate([first(text)["hidden_embeds"], outputs["hidden_embeds"]], axis=2))
        pooled.append(outputs["pooled_outputs"])
    assert pipe.width == pipe.height
    row = [pipe.height, pipe.height, 0, 0, pipe.height, pipe.height]
    return {"encoder_hidden_states": channels_first(np.concatenate(hidden)), "text_embeds": np.concatenate(pooled),
            "time_ids": np.array([row, row], dtype=np.float32)}


@dataclass(frozen=True)
class Family:
    example: Example
    conditioning: Callable[[Pipeline, Example], dict[str, np.ndarray]]
    generate_steps: int  # the tiny-xl Unet is slow here: two first-order steps, taken alike in both
    noise_level_steps: tuple[int, ...]
    sampling_steps: tuple[int, ...]  # from 15 steps on, all steps after the first are second order


FAMILIES = {
    "sd": Family(SD_EXAMPLE, sd_conditioning, SD_EXAMPLE.steps, (2, LOWER_ORDER_BELOW, SD_EXAMPLE.steps),
                 (LOWER_ORDER_BELOW, SD_EXAMPLE.steps)),
    "xl": Family(XL_EXAMPLE, xl_conditioning, 2, (2, LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps),
                 (LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps)),
}


@pytest.fixture(scope="module")
def pipes(request) -> Callable[[str], Pipeline]:
    """`pipes(family)` -> the runtime on the tiny (sd) or tiny-xl (xl) package, loaded once for the module."""
    loaded: dict[str, Pipeline] = {}

    def pipe(family: str) -> Pipeline:
        if family not in loaded:
            folder = (request.getfixturevalue("tiny_packages")() if family == "sd"
                      else request.getfixturevalue("tiny_xl_packages")("tiny-xl"))
            loaded[family] = Pipeline.from_package(folder, backend="reference")
        return loaded[family]

    return pipe


def by_family(field: str) -> list:
    return [pytest.param(name, steps, id=f"{name}-{steps}") for name, family in FAMILIES.items()
            for steps in getattr(family, field)]


def test_linspace_timesteps_are_swifts_for_odd_step_counts(pipes):
    """SD 1.x: odd counts never put a timestep at a half; even ones always do (at 999 / 2), which float32 arithmetic
    and rounding halves away from zero (Swift) and float64 with halves to even (NumPy) may round apart."""
    differing = [steps for steps in range(1, TRAIN_STEPS)
                 if runtime_scheduler(pipes("sd"), SD_EXAMPLE, steps).timesteps.tolist()
                 != swift_timesteps("linspace", steps)]
    assert all(steps % 2 == 0 for steps in differing)
    # the rule packages/README.md states
    assert [steps for steps in differing if steps <= LINSPACE_MISMATCHES[-1]] == list(LINSPACE_MISMATCHES)
    assert len(differing) == LINSPACE_MISMATCH_COUNT
    assert SD_EXAMPLE.steps % 2 == 1


def test_leading_timesteps_are_swifts_unless_steps_plus_one_divides_1000(pipes):
    """SDXL's `leading` spacing."""
    differing = [steps for steps in range(1, TRAIN_STEPS)
                 if runtime_scheduler(pipes("xl"), XL_EXAMPLE, steps).timesteps.tolist()
                 != swift_timesteps("leading", steps)]
    assert differing == leading_mismatches(TRAIN_STEPS)  # the rule packages/README.md states
    assert XL_EXAMPLE.steps not in differing


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


@pytest.mark.parametrize(("family", "steps"), by_family("noise_level_steps"))
def test_noise_levels_are_swifts(pipes, family, steps):
    """The noise level at each timestep is Swift's sigma / alpha; diffusers' last one is zero where Swift steps to
    timestep 0, and what Swift decodes instead is the denoised prediction that a step to zero returns."""
    scheduler = runtime_scheduler(pipes(family), FAMILIES[family].example, steps)
    solver = SwiftDPMSolver(steps, FAMILIES[family].example.spacing)
    levels = solver.sigma[solver.timesteps] / solver.alpha[solver.timesteps]
    # float32 tables on both sides: a few of float32's 6e-8 relative steps apart
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), levels, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    assert scheduler.init_noise_sigma == 1  # Swift's initial noise is NumPy's draws, unscaled


def test_pndm_ends_short_of_the_denoised_prediction(pipes):
    """diffusers' PNDM, coreml-generate's default for SD 1.x, steps last to alphas_cumprod[0], not to 1: the
    coefficients packages/README.md gives for what it returns, where Swift decodes the denoised prediction."""
    scheduler = pipes("sd").sampler.scheduler(Sampling("pndm", SD_EXAMPLE.steps, SD_EXAMPLE.guidance_scale, 1.0))
    final = float(scheduler.final_alpha_cumprod)
    # the scheduler's tables are float32
    np.testing.assert_allclose((np.sqrt(final), np.sqrt(1 - final)), pndm_final_coefficients(), rtol=1e-4)


@pytest.mark.parametrize(("family", "steps"), by_family("sampling_steps"))
def test_sampling_ends_with_the_latents_swift_decodes(pipes, family, steps):
    """From 15 steps on, Swift's steps after the first are all second order; diffusers' too but the last, which goes
    to noise level zero at first order and so returns the denoised prediction that Swift decodes."""
    ours, swift, orders = sampled_both_ways(pipes(family), FAMILIES[family].example, steps)
    assert orders == [1] + [2] * (steps - 1)
    assert relative_error(ours, swift) < 1e-5  # float32 rounding, and the float16 inputs of the Unet it flips


@pytest.mark.parametrize("family", FAMILIES)
def test_shorter_schedules_part_at_the_second_to_last_step(pipes, family):
    """Under 15 steps Swift takes its second-to-last step at first order, where diffusers (solver order 2) takes it
    at second order: the reason packages/README.md asks for 15 steps or more."""
    example = FAMILIES[family].example
    assert example.steps >= LOWER_ORDER_BELOW == MIN_STEPS  # the rule packages/README.md states
    ours, swift, orders = sampled_both_ways(pipes(family), example, 5)
    assert orders == [1, 2, 2, 1, 1]
    assert relative_error(ours, swift) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_first_unet_input_is_swifts_but_where_float32_rounding_moves_it(family):
    example = FAMILIES[family].example
    ours, swift = first_unet_samples(example)
    assert (int(np.count_nonzero(ours != swift)), ours.size) == first_input_differences(example)  # the README's


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_defaults_give_swifts_unet_inputs_and_latents(pipes, family, monkeypatch):
    """coreml-generate's defaults with the snippet's prompts, seed, guidance and scheduler, through the tiny Unet:
    each Unet call gets the inputs Swift builds with the snippet's settings (at the package's size), and the latents
    to decode are Swift's."""
    pipe, example, steps = pipes(family), FAMILIES[family].example, FAMILIES[family].generate_steps
    recorded = RecordedUnet(pipe.sampler.unet)
    monkeypatch.setattr(pipe.sampler, "unet", recorded)
    # SD's snippet and command line leave the negative prompt at both sides' default (empty, encoded)
    negative = {"negative_prompt": example.negative_prompt} if example.negative_prompt else {}
    ours = pipe(example.prompt, steps=steps, scheduler="dpm++", seed=example.seed,
                guidance_scale=example.guidance_scale, output_type="latent", progress=False, **negative)
    ours = ours.images[0].numpy()
    noise = draw_noise(np.random.RandomState(example.seed), ours.shape)
    replayed = ReplayedUnet(recorded)
    swift, orders = swift_latents(
        replayed, FAMILIES[family].conditioning(pipe, example), noise, steps, example.guidance_scale, example.spacing
    )
    assert next(replayed.calls, None) is None  # as many Unet calls
    if steps >= LOWER_ORDER_BELOW:
        assert orders == [1] + [2] * (steps - 1)
    assert relative_error(ours, swift) < 1e-5
