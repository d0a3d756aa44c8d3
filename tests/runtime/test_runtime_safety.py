"""The safety checker, converted and run through the reference executor, against diffusers' decisions and scores.

The tiny checker's random concepts flag nothing; here one concept is set to the embedding of a known
generated image, with a threshold halfway to a second image's similarity, so that diffusers flags the first
image and not the second. The converted package must decide the same, with the same scores.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.validate import safety_concept_scores
from coreml_sd.converter.models.tiny import build_tiny_safety_checker
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.safety import SD_FEATURE_EXTRACTOR, ClipPreprocessing

PROMPT = "a photo of an astronaut riding a horse"
FLAGGED_SEED, CLEAN_SEED = 21, 22
CONCEPT = 5
SCORES_PSNR_DB = 35.0


def diffusers_features(images) -> torch.Tensor:
    return torch.from_numpy(
        CLIPImageProcessorPil.from_dict(SD_FEATURE_EXTRACTOR)(images, return_tensors="np").pixel_values
    )


@pytest.fixture(scope="module")
def generated(tiny_runtime):
    """The tiny package's images for the two seeds, unchecked."""
    result = tiny_runtime(PROMPT, steps=2, seed=FLAGGED_SEED, num_images=2, safety_checker=False, progress=False)
    return result.images


@pytest.fixture(scope="module")
def checker(generated, tmp_path_factory):
    """The tiny checker with one concept set to flag the first image (diffusers' float32 module) and its folder."""
    checker, _ = build_tiny_safety_checker()
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(diffusers_features(generated))[1])
        unit = torch.nn.functional.normalize(embeds)
        checker.concept_embeds[CONCEPT] = embeds[0]
        checker.concept_embeds_weights[CONCEPT] = (1 + float(unit[0] @ unit[1])) / 2
    folder = tmp_path_factory.mktemp("checker")
    checker.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(SD_FEATURE_EXTRACTOR))
    return checker, folder


@pytest.fixture(scope="module")
def flagging_package(tiny_package, checker, tmp_path_factory):
    """The tiny package with its SafetyChecker converted again from the test's checker (--safety-checker PATH)."""
    folder = tmp_path_factory.mktemp("flagging") / "tiny"
    shutil.copytree(tiny_package, folder)
    convert_model(
        ConversionOptions(model="tiny", output=folder, components=("SafetyChecker",), safety_checker=str(checker[1]))
    )
    return folder


def test_preprocessing_is_the_feature_extractors(start_image):
    wide = start_image.resize((160, 96))  # shortest edge resized up, then the long side cropped
    ours = ClipPreprocessing.from_config(SD_FEATURE_EXTRACTOR)(wide)
    np.testing.assert_allclose(ours, diffusers_features([wide]).numpy(), atol=1e-5)


def test_decisions_and_scores_match_diffusers(flagging_package, checker, generated):
    checker = checker[0]
    clip_input = diffusers_features(generated)
    pixels = np.stack([np.asarray(image, np.float32) / 255 for image in generated])
    _, diffusers_flags = checker(clip_input=clip_input, images=pixels.copy())
    assert diffusers_flags == [True, False]
    with torch.no_grad():
        diffusers_scores = safety_concept_scores(checker, clip_input, torch.zeros(1)).numpy()

    pipe = Pipeline.from_package(flagging_package, backend="reference")
    ours = pipe._safety_checker()
    for image, flagged, expected in zip(generated, diffusers_flags, diffusers_scores):
        outputs = ours.scores(image)
        assert psnr(expected[None], outputs["concept_scores"]) >= SCORES_PSNR_DB
        assert bool(outputs["has_nsfw_concepts"].item()) == flagged
        checked, decided = ours(image)
        assert decided == flagged
        expected_pixels = np.zeros_like(np.asarray(image)) if flagged else np.asarray(image)
        np.testing.assert_array_equal(np.asarray(checked), expected_pixels)


def test_generation_blackens_the_flagged_image(flagging_package, generated, tmp_path, capsys):
    code = main(
        [
            PROMPT,
            "--model",
            str(flagging_package),
            "--steps",
            "2",
            "--seed",
            str(FLAGGED_SEED),
            "--num-images",
            "2",
            "--backend",
            "reference",
            "-o",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"image 1 (seed {FLAGGED_SEED}) was flagged by the safety checker and saved black" in out
    assert "image 2" not in out
    flagged, clean = (tmp_path / f"a-photo-of-an-astronaut-riding-a-horse-{s}.png" for s in (FLAGGED_SEED, CLEAN_SEED))
    from PIL import Image

    assert not np.asarray(Image.open(flagged)).any()
    np.testing.assert_array_equal(np.asarray(Image.open(clean).convert("RGB")), np.asarray(generated[1]))

    pipe = Pipeline.from_package(flagging_package, backend="reference")
    result = pipe(PROMPT, steps=2, seed=FLAGGED_SEED, num_images=2, progress=False)
    assert result.nsfw_content_detected == [True, False]
    unchecked = pipe(PROMPT, steps=2, seed=FLAGGED_SEED, safety_checker=False, progress=False)
    assert unchecked.nsfw_content_detected is None
    assert "Safety checker: off" in unchecked.parameters[0] and "Safety checker" not in result.parameters[0]
    np.testing.assert_array_equal(np.asarray(unchecked.images[0]), np.asarray(generated[0]))


def test_package_without_a_checker_runs_as_before(tiny_package, generated, tmp_path):
    folder = tmp_path / "tiny"  # as converted without SafetyChecker in --components
    shutil.copytree(tiny_package, folder, ignore=shutil.ignore_patterns("SafetyChecker.mlpackage"))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["components"]["SafetyChecker"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = Pipeline.from_package(folder, backend="reference")(PROMPT, steps=2, seed=FLAGGED_SEED, progress=False)
    assert result.nsfw_content_detected is None and "Safety checker" not in result.parameters[0]
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(generated[0]))
