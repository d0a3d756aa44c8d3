"""Few-step sampling against diffusers, with the tiny model's own float32 modules as the models: the LCM and TCD
schedulers, Turbo's trailing Euler Ancestral at guidance 0, generation without guidance at Unet batch 1 and 2,
and the settings a package recommends."""
import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.recommended import Recommended
from coreml_sd.runtime.sampling import guidance_scale_embedding

from runtime_testing import diffusers_txt2img, pixels

LOGIC_PSNR_DB = 50.0  # float32 modules on both sides: measured 58.9-59.0 dB (8-bit rounding); batch 1 vs 2: 95 dB
PROMPT = "a photo of an astronaut riding a horse"
# SDXL-Turbo's scheduler_config.json, on the tiny model's schedule.
TURBO_SCHEDULE = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


class CountedModel:
    """A model that counts its calls and the rows it computes."""

    def __init__(self, model):
        self.model = model
        self.input_description = model.input_description
        self.calls = 0

    def predict(self, inputs):
        self.calls += 1
        return self.model.predict(inputs)


def pipeline(package, contract_models, unet_batch_size: int, **package_changes) -> Pipeline:
    models = contract_models(unet_batch_size=unet_batch_size)
    models["Unet"] = CountedModel(models["Unet"])
    return Pipeline(dataclasses.replace(package, **package_changes), models, backend="pytorch", compute_unit="ALL")


def turbo_config(package) -> dict:
    """The package's schedule with Turbo's scheduler; `_use_default_values` would put back the default spacing."""
    config = {**package.scheduler_config, **TURBO_SCHEDULE}
    config["_use_default_values"] = [key for key in config.get("_use_default_values", []) if key not in TURBO_SCHEDULE]
    return config


@pytest.mark.parametrize("unet_batch_size", [1, 2])
def test_turbo_one_step_without_guidance_matches_diffusers(package, contract_models, tiny_pipeline, unet_batch_size,
                                                          caplog):
    """Euler Ancestral with trailing spacing, 1 step at guidance 0 (diffusers: no classifier-free guidance);
    diffusers' ancestral noise comes from the same seeded torch generator."""
    config = turbo_config(package)
    pipe = pipeline(package, contract_models, unet_batch_size, scheduler_config=config,
                    recommended=Recommended(steps=1, guidance_scale=0.0))
    with caplog.at_level(logging.INFO, logger="coreml_sd.runtime"):
        ours = pipe(PROMPT, seed=3, progress=False)
    reference = diffusers_txt2img(tiny_pipeline, config, PROMPT, "", "euler-a", 1, seed=3, guidance_scale=0.0)
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB
    assert pipe.models["Unet"].calls == 1
    assert "sampling with euler-a, 1 steps, guidance 0: steps, guidance scale as the package recommends" in caplog.text
    assert "Steps: 1, Sampler: Euler a, CFG scale: 0.0" in ours.parameters[0]
    # at batch 2 the one window fills half a call: said, with what it costs
    assert ("1 of 2 per step are repeats" in caplog.text) == (unet_batch_size == 2)


def test_a_batch_1_and_a_batch_2_unet_make_the_same_unguided_image(package, contract_models):
    images = [pipeline(package, contract_models, batch)(PROMPT, steps=3, guidance_scale=1.0, scheduler="euler", seed=5,
                                                        progress=False).images[0] for batch in (1, 2)]
    assert psnr(pixels(images[0]), pixels(images[1])) >= LOGIC_PSNR_DB


@pytest.mark.parametrize(("scheduler", "guidance_scale"), [("lcm", 1.0), ("tcd", 0.5), ("lcm", 1.5)])
def test_lcm_and_tcd_match_diffusers(package, contract_models, tiny_pipeline, scheduler, guidance_scale):
    """Four steps; at guidance 1.5 diffusers guides (LCM-LoRA's 1-2), below it does not."""
    pipe = pipeline(package, contract_models, 1)
    ours = pipe(PROMPT, steps=4, guidance_scale=guidance_scale, scheduler=scheduler, seed=9, progress=False)
    reference = diffusers_txt2img(tiny_pipeline, package.scheduler_config, PROMPT, "", scheduler, 4, seed=9,
                                  guidance_scale=guidance_scale)
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB
    assert pipe.models["Unet"].calls == 4 * (2 if guidance_scale > 1 else 1)


def test_unguided_windows_fill_batch_2_calls(package, contract_models):
    """A 256x128 image is two 128x128 windows (no overlap): one batch-2 call per step without guidance, two with
    it."""
    pipe = pipeline(package, contract_models, 2)
    for guidance_scale, calls in ((0.0, 2), (7.5, 4)):
        pipe.models["Unet"].calls = 0
        pipe(PROMPT, steps=2, guidance_scale=guidance_scale, scheduler="euler", seed=1, width=256, overlap=0,
             progress=False)
        assert pipe.models["Unet"].calls == calls


def test_recommended_settings_yield_to_the_callers(package, contract_models, caplog):
    pipe = pipeline(package, contract_models, 1, recommended=Recommended("lcm", 2, 1.0))
    with caplog.at_level(logging.INFO, logger="coreml_sd.runtime"):
        result = pipe(PROMPT, steps=3, seed=2, progress=False)
    assert "Steps: 3, Sampler: LCM, CFG scale: 1.0" in result.parameters[0]
    assert "scheduler, guidance scale as the package recommends (override with --scheduler, --guidance-scale)" \
        in caplog.text
    assert "consistency-distilled" not in caplog.text  # the package says its model is one


def test_lcm_on_a_model_without_lcm_weights_warns_and_runs(package, contract_models, caplog):
    with caplog.at_level(logging.WARNING, logger="coreml_sd.runtime"):
        result = pipeline(package, contract_models, 1)(PROMPT, steps=2, guidance_scale=1.0, scheduler="lcm", seed=2,
                                                       progress=False)
    assert len(result.images) == 1
    assert "the lcm scheduler is for consistency-distilled models, and package 'tiny' records none" in caplog.text


def test_one_step_pndm_is_refused_in_one_line(package, contract_models):
    with pytest.raises(GenerationError, match=r"^the pndm scheduler needs at least 2 steps, not 1; raise --steps or "
                                              r"choose from ddim, euler, euler-a, dpm\+\+, lms, lcm, tcd$"):
        pipeline(package, contract_models, 1)(PROMPT, steps=1, scheduler="pndm", progress=False)


def test_more_lcm_steps_than_its_distillation_schedule_are_refused_in_one_line(package, contract_models):
    with pytest.raises(GenerationError, match=r"^the lcm scheduler samples at most 50 steps \(the schedule the model "
                                              r"was distilled on\), not 60; lower --steps \(LCM models need 2-8\)$"):
        pipeline(package, contract_models, 1)(PROMPT, steps=60, scheduler="lcm", progress=False)


@pytest.mark.parametrize(("w", "width"), [(7.0, 256), (0.0, 32), (1.5, 33)])
def test_guidance_embedding_matches_diffusers(w, width):
    from diffusers import LatentConsistencyModelPipeline

    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), width)
    np.testing.assert_array_equal(guidance_scale_embedding(w, width), expected.numpy())


def test_turbo_schedule_starts_at_the_last_training_timestep(package):
    """Trailing spacing: 1 step starts from pure noise at t=999 (leading spacing would start at t=1)."""
    from coreml_sd.runtime.schedulers import build_scheduler

    ours = build_scheduler("euler-a", turbo_config(package), "epsilon")
    ours.set_timesteps(1)
    reference = EulerAncestralDiscreteScheduler.from_config(turbo_config(package))
    reference.set_timesteps(1)
    assert ours.timesteps.tolist() == reference.timesteps.tolist() == [999.0]


def test_the_command_refuses_one_step_pndm_in_one_line_before_loading_a_model(tmp_path, capsys):
    from coreml_sd.runtime.cli import main

    code = main(["a cat", "--model", str(tmp_path / "absent"), "--scheduler", "pndm", "--steps", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "Error: the pndm scheduler needs at least 2 steps, not 1; raise --steps or choose from ddim, euler, euler-a, "
        "dpm++, lms, lcm, tcd (see coreml-generate --help)"]
