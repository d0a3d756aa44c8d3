import json

import pytest
import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler, StableDiffusionPipeline

from coreml_sd.converter.models.tiny import SCHEDULER_CONFIG
from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.schedulers import SCHEDULERS, build_scheduler, default_scheduler_name

CONFIG = {"_class_name": "PNDMScheduler", **SCHEDULER_CONFIG}


@pytest.mark.parametrize("steps", [4, 50])
def test_lms_coefficients_match_diffusers_quadrature(steps):
    ours, reference = build_scheduler("lms", CONFIG, "epsilon"), LMSDiscreteScheduler.from_config(CONFIG)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    for order in range(1, 5):
        for t in range(order - 1, steps):
            for current in range(order):
                expected = reference.get_lms_coefficient(order, t, current)
                # diffusers evaluates the integrand in float32 and asks scipy for 1e-4 relative accuracy
                assert ours.get_lms_coefficient(order, t, current) == pytest.approx(expected, rel=1e-5, abs=1e-7)


# The model outputs are random, so the inputs the model would see need no scaling.
@pytest.mark.filterwarnings("ignore:The `scale_model_input` function should be called")
def test_lms_trajectory_matches_diffusers():
    ours, reference = build_scheduler("lms", CONFIG, "epsilon"), LMSDiscreteScheduler.from_config(CONFIG)
    generator = torch.Generator().manual_seed(0)
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    a = b = torch.randn(1, 4, 8, 8, generator=generator) * reference.init_noise_sigma
    for t in reference.timesteps:
        model_output = torch.randn(1, 4, 8, 8, generator=generator)
        a = ours.step(model_output, t, a).prev_sample
        b = reference.step(model_output, t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_scheduler_takes_the_package_config_and_prediction_type():
    for name, cls in SCHEDULERS.items():
        scheduler = build_scheduler(name, CONFIG, "v_prediction")
        assert isinstance(scheduler, cls)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


def test_default_is_the_package_scheduler_when_known():
    assert default_scheduler_name(CONFIG) == "pndm"
    assert default_scheduler_name(json.loads(DDIMScheduler().to_json_string())) == "ddim"
    assert default_scheduler_name({"_class_name": "LMSDiscreteScheduler"}) == "lms"
    assert default_scheduler_name({"_class_name": "UniPCMultistepScheduler"}) == "pndm"


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(GenerationError, match="unknown scheduler 'dpm-fast'; choose from pndm, ddim, euler"):
        build_scheduler("dpm-fast", CONFIG, "epsilon")


def test_old_sd_configs_are_corrected_as_diffusers_pipeline_does(tiny_pipeline):
    old_config = {
        key: value for key, value in CONFIG.items() if key != "steps_offset"
    }  # DDIM's clip_sample defaults on
    ddim = DDIMScheduler.from_config(old_config)
    assert ddim.config.clip_sample and ddim.config.steps_offset == 0
    reference = StableDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": ddim}).scheduler.config
    ours = build_scheduler("ddim", old_config, "epsilon").config
    assert (ours.clip_sample, ours.steps_offset) == (reference.clip_sample, reference.steps_offset) == (False, 1)


def test_a_zero_terminal_snr_schedule_refuses_the_schedulers_that_cannot_follow_it():
    config = {**CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    for name in ("pndm", "lms"):
        with pytest.raises(
            GenerationError,
            match=f"the {name} scheduler cannot follow this model's schedule "
            r"\(rescale_betas_zero_snr\); choose from ddim, euler, euler-a, dpm\+\+",
        ):
            build_scheduler(name, config, "v_prediction")
    scheduler = build_scheduler("dpm++", config, "v_prediction")
    scheduler.set_timesteps(4)
    # the first step starts from pure noise: diffusers clips the terminal alpha-bar of 0 to 2**-24
    assert scheduler.timesteps[0] == 999 and scheduler.alphas_cumprod[-1] == pytest.approx(2.0**-24)
