"""The pipeline's logic against diffusers' pipelines, with the tiny model's own float32 modules as the models.

With no float16 model numerics in the way, the images must agree to 8-bit rounding (~59 dB); the packages
through the reference executor are compared in test_runtime_packages.py.
"""
import logging

import numpy as np
import pytest

from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.schedulers import SCHEDULERS

from runtime_testing import diffusers_img2img, diffusers_txt2img, pixels

LOGIC_PSNR_DB = 56.0  # measured 58.9-59.0 dB in all 17 cases: the rounding to 8 bits alone
PROMPT = "a photo of an astronaut riding a horse"
STEPS = 5


@pytest.fixture(scope="module")
def pipe(package, contract_models) -> Pipeline:
    return Pipeline(package, contract_models(unet_batch_size=2), backend="pytorch", compute_unit="ALL")


@pytest.fixture(scope="module")
def pipe_unet_batch_1(package, contract_models) -> Pipeline:
    """Guidance through two batch-1 Unet calls, for Unets converted with batch 1."""
    return Pipeline(package, contract_models(unet_batch_size=1), backend="pytorch", compute_unit="ALL")


@pytest.mark.parametrize(
    ("scheduler", "negative_prompt"),
    [(name, "") for name in SCHEDULERS] + [("pndm", "blurry, low quality"), ("euler-a", "blurry, low quality")],
)
def test_txt2img_matches_diffusers(pipe, package, tiny_pipeline, scheduler, negative_prompt):
    ours = pipe(PROMPT, negative_prompt=negative_prompt, steps=STEPS, scheduler=scheduler, seed=7, progress=False)
    reference = diffusers_txt2img(
        tiny_pipeline, package.scheduler_config, PROMPT, negative_prompt, scheduler, STEPS, seed=7
    )
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB


@pytest.mark.parametrize("scheduler", ["pndm", "euler-a"])
def test_txt2img_with_batch_1_unet_matches_diffusers(pipe_unet_batch_1, package, tiny_pipeline, scheduler):
    ours = pipe_unet_batch_1(PROMPT, negative_prompt="blurry", steps=STEPS, scheduler=scheduler, seed=2, progress=False)
    reference = diffusers_txt2img(tiny_pipeline, package.scheduler_config, PROMPT, "blurry", scheduler, STEPS, seed=2)
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB


@pytest.mark.parametrize(("scheduler", "strength"), [("pndm", 0.6), ("euler-a", 0.8), ("dpm++", 1.0), ("lms", 0.3)])
def test_img2img_matches_diffusers(pipe, package, tiny_pipeline, start_image, scheduler, strength, monkeypatch):
    ours = pipe(
        PROMPT, steps=STEPS * 2, scheduler=scheduler, seed=3, image=start_image, strength=strength, progress=False
    )
    reference = diffusers_img2img(
        tiny_pipeline, package.scheduler_config, PROMPT, "", scheduler, STEPS * 2, 3, start_image, strength, monkeypatch
    )
    assert psnr(reference, pixels(ours.images[0])) >= LOGIC_PSNR_DB


def test_stochastic_sampler_repeats_for_a_seed(pipe):
    first, again, other = (
        pipe(PROMPT, steps=3, scheduler="euler-a", seed=s, progress=False).images[0] for s in (6, 6, 8)
    )
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert np.abs(np.asarray(first, int) - np.asarray(other, int)).mean() > 1


def test_num_images_are_consecutive_seeds(pipe):
    batch = pipe(PROMPT, steps=2, seed=10, num_images=2, progress=False)
    assert batch.seeds == [10, 11]
    for seed, image in zip(batch.seeds, batch.images):
        single = pipe(PROMPT, steps=2, seed=seed, progress=False).images[0]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(single))
    assert "Seed: 11" in batch.parameters[1] and "Model: tiny" in batch.parameters[1]


def test_parameters_text(pipe):
    result = pipe(
        "a cat", negative_prompt="dogs", steps=2, guidance_scale=5.0, scheduler="ddim", seed=4, progress=False
    )
    assert result.parameters[0] == (
        "a cat\nNegative prompt: dogs\nSteps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 4, Size: 128x128, Model: tiny"
    )


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    words = 100  # "a" is one token; with the start and end tokens, 102 tokens of which 77 are kept
    with caplog.at_level(logging.WARNING, logger="coreml_sd.runtime"):
        ids = pipe.conditioning.encoders[0].token_ids("a " * words)
    assert ids.shape == (1, 77) and ids[0, -1] == pipe.conditioning.encoders[0].tokenizer.eos_token_id
    assert "the last 25 tokens were dropped" in caplog.text


def test_start_image_of_another_size_is_resized_with_a_warning(pipe, start_image, caplog):
    small = start_image.resize((64, 64))
    with caplog.at_level(logging.WARNING, logger="coreml_sd.runtime"):
        result = pipe(PROMPT, steps=2, scheduler="ddim", seed=1, image=small, strength=0.5, progress=False)
    assert result.images[0].size == (128, 128)
    assert "resized the input image from 64x64 to 128x128" in caplog.text
