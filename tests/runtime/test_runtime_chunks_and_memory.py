"""A Unet split in two (Apple's UnetChunk1/UnetChunk2) runs as one; `reduce_memory` holds one model at a time."""
import shutil

import coremltools as ct
import numpy as np
import pytest

from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.backends import ChunkedModel, ManagedModel
from coreml_sd.runtime.executor import ReferenceModel, psnr

PROMPT = "a photo of an astronaut riding a horse"
SETTINGS = dict(steps=1, scheduler="ddim", seed=5, progress=False)
CHUNK_PSNR_DB = 60.0


@pytest.fixture(scope="session")
def chunked_package(tiny_package, tmp_path_factory):
    """The tiny package with its Unet split by coremltools' bisect_model (its own check needs macOS) into
    Apple's chunk names."""
    folder = tmp_path_factory.mktemp("tiny-chunked") / "tiny"
    shutil.copytree(tiny_package, folder, ignore=shutil.ignore_patterns("Unet.mlpackage"))
    ct.models.utils.bisect_model(str(tiny_package / "Unet.mlpackage"), str(folder), check_output_correctness=False)
    for index in (1, 2):
        (folder / f"Unet_chunk{index}.mlpackage").rename(folder / f"UnetChunk{index}.mlpackage")
    return folder


def test_chunk_1_then_chunk_2_is_the_whole_unet(chunked_package, tiny_package):
    whole = ReferenceModel(tiny_package / "Unet.mlpackage")
    chunks = ChunkedModel(ReferenceModel(chunked_package / "UnetChunk1.mlpackage"),
                          ReferenceModel(chunked_package / "UnetChunk2.mlpackage"))
    # chunk 2 takes chunk 1's outputs and some of the original inputs; the pair takes what the Unet takes
    assert set(chunks.second.input_description) - set(whole.input_description)
    assert chunks.input_description == whole.input_description
    assert chunks.output_description == whole.output_description
    rng = np.random.default_rng(0)
    inputs = {name: (rng.standard_normal(shape) * (500 if name == "timestep" else 1)).astype(dtype)
              for name, (shape, dtype) in whole.input_description.items()}
    expected = whole.predict(inputs)["noise_pred"]
    assert psnr(expected, chunks.predict(inputs)["noise_pred"]) >= CHUNK_PSNR_DB


def test_a_chunked_package_generates_the_whole_unets_image(chunked_package, tiny_runtime):
    pipe = Pipeline.from_package(chunked_package, backend="reference")
    assert pipe.package.components["Unet"] == (chunked_package / "UnetChunk1.mlpackage",
                                               chunked_package / "UnetChunk2.mlpackage")
    image = np.asarray(pipe(PROMPT, **SETTINGS).images[0], np.float64) / 255
    expected = np.asarray(tiny_runtime(PROMPT, **SETTINGS).images[0], np.float64) / 255
    assert psnr(expected, image) >= CHUNK_PSNR_DB


def test_reduce_memory_holds_one_model_at_a_time(chunked_package, tiny_runtime):
    """Each model is loaded when its stage runs and unloaded after it, for every image; the images do not change."""
    pipe = Pipeline.from_package(chunked_package, backend="reference", reduce_memory=True)
    events = []

    def watch(model: ManagedModel, name: str) -> None:
        load = model._load

        def watched_load():
            held = [other for other, managed in pipe.models.items() if managed.loaded]
            events.append((name, held))
            return load()

        model._load = watched_load

    pipe.model("SafetyChecker")  # made now (not loaded: it loads when its stage runs), so that it is watched too
    assert all(isinstance(model, ManagedModel) and not model.loaded for model in pipe.models.values())
    for name, model in pipe.models.items():
        watch(model, name)
    result = pipe(PROMPT, **{**SETTINGS, "num_images": 2})
    stages = ["TextEncoder"] + ["Unet", "VAEDecoder", "SafetyChecker"] * 2
    assert events == [(name, []) for name in stages]  # nothing else held when a model loads
    assert not any(model.loaded for model in pipe.models.values())
    expected = tiny_runtime(PROMPT, **{**SETTINGS, "num_images": 2})
    for ours, theirs in zip(result.images, expected.images):
        assert psnr(np.asarray(theirs, np.float64) / 255, np.asarray(ours, np.float64) / 255) >= CHUNK_PSNR_DB
