"""The converted tiny packages, run by the reference executor, against diffusers on the same weights."""
import json
import shutil

import numpy as np
import pytest

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.backends import describe_model
from coreml_sd.runtime.components import compute_unit_of
from coreml_sd.runtime.executor import psnr

from runtime_testing import PSNR_THRESHOLD_DB, diffusers_img2img, diffusers_txt2img, pixels

PROMPT = "a photo of an astronaut riding a horse"
STEPS = 4


@pytest.mark.parametrize(
    ("scheduler", "negative_prompt"),
    [("pndm", ""), ("pndm", "blurry, low quality"), ("euler-a", "blurry, low quality"), ("dpm++", "")],
)
def test_txt2img_matches_diffusers(tiny_runtime, tiny_pipeline, scheduler, negative_prompt):
    ours = tiny_runtime(PROMPT, negative_prompt=negative_prompt, steps=STEPS, scheduler=scheduler, seed=11,
                        progress=False)
    config = tiny_runtime.package.scheduler_config
    reference = diffusers_txt2img(tiny_pipeline, config, PROMPT, negative_prompt, scheduler, STEPS, seed=11)
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB


@pytest.mark.parametrize(
    ("scheduler", "strength", "negative_prompt"), [("pndm", 0.7, ""), ("euler", 0.9, "blurry, low quality")]
)
def test_img2img_matches_diffusers(
    tiny_runtime, tiny_pipeline, start_image, scheduler, strength, negative_prompt, monkeypatch
):
    steps = 2 * STEPS
    ours = tiny_runtime(PROMPT, negative_prompt=negative_prompt, steps=steps, scheduler=scheduler, seed=5,
                        image=start_image, strength=strength, progress=False)
    config = tiny_runtime.package.scheduler_config
    reference = diffusers_img2img(
        tiny_pipeline, config, PROMPT, negative_prompt, scheduler, steps, 5, start_image, strength, monkeypatch
    )
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB


def test_a_seed_gives_the_same_image_and_another_seed_another(tiny_runtime):
    def generate(seed):
        return np.asarray(tiny_runtime(PROMPT, steps=1, scheduler="ddim", seed=seed, progress=False).images[0])

    first, again, other = generate(1), generate(1), generate(2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1


@pytest.fixture(scope="module")
def unet_batch_1_folder(tiny_package, tmp_path_factory):
    """The package with its Unet converted again for batch 1 (the other components are kept)."""
    folder = tmp_path_factory.mktemp("tiny-unet-batch-1") / "tiny"
    shutil.copytree(tiny_package, folder)
    convert_model(ConversionOptions(model="tiny", output=folder, components=("Unet",), unet_batch_size=1))
    return folder


def test_unet_batch_1_package_matches_diffusers(unet_batch_1_folder, tiny_pipeline):
    pipe = Pipeline.from_package(unet_batch_1_folder, backend="reference")
    assert pipe.unet_batch_size == 1
    ours = pipe(PROMPT, negative_prompt="blurry", steps=STEPS, scheduler="ddim", seed=4, progress=False)
    config = pipe.package.scheduler_config
    reference = diffusers_txt2img(tiny_pipeline, config, PROMPT, "blurry", "ddim", STEPS, seed=4)
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB


def test_a_bundle_without_manifest_runs_with_sd_v1_settings(tiny_runtime, tiny_package, tmp_path):
    """Apple's Resources bundles hold models and BPE files only; tiny has SD v1.4's settings, so the image
    must not change."""
    bundle = tmp_path / "Resources"
    shutil.copytree(tiny_package, bundle, ignore=shutil.ignore_patterns("manifest.json"))
    bare = Pipeline.from_package(bundle, backend="reference")
    # the Unet's own metadata says what its attention is (split_einsum has no einsum op to tell it by)
    assert bare.package.attention_implementation == "split_einsum"
    assert compute_unit_of(bare.package, "Unet", bare.compute_unit) == "CPU_AND_NE"
    settings = dict(steps=2, scheduler="pndm", seed=9, progress=False)
    np.testing.assert_array_equal(np.asarray(bare(PROMPT, **settings).images[0]),
                                  np.asarray(tiny_runtime(PROMPT, **settings).images[0]))


def test_compute_unit_follows_the_attention_implementation(tiny_runtime):
    assert tiny_runtime.package.attention_implementation == "split_einsum"
    assert compute_unit_of(tiny_runtime.package, "Unet", tiny_runtime.compute_unit) == "CPU_AND_NE"


@pytest.mark.parametrize("component", ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"])
def test_core_ml_adapter_reads_the_inputs_the_manifest_lists(tiny_package, component):
    manifest = json.loads((tiny_package / "manifest.json").read_text())["components"][component]["inputs"]
    assert describe_model(tiny_package / f"{component}.mlpackage")[0] == {
        name: (tuple(entry["shape"]), np.dtype(entry["dtype"])) for name, entry in manifest.items()
    }
