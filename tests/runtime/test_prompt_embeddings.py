"""A textual-inversion embedding typed once stands for all its vectors, as in the web UI and in diffusers'
`load_textual_inversion`: end to end against diffusers with the same embedding."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from coreml_sd.converter.bundle import write_bundle
from coreml_sd.converter.families import family_by_name
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.conditioning import SizeConditioning
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.sampling import draw_noise

from prompt_testing import with_tiny_unet_and_vae
from runtime_testing import PSNR_THRESHOLD_DB, latent_shape, pixels

TOKEN = "xyzstyle"
STEPS, SEED = 4, 7


def embedding_file(folder, vectors: torch.Tensor):
    path = folder / f"{TOKEN}-{len(vectors)}.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": TOKEN}, path)
    return path


@pytest.fixture(scope="module")
def vectors():
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory, vectors):
    """The 3-vector embedding, and its first vector alone."""
    folder = tmp_path_factory.mktemp("embedding")
    return embedding_file(folder, vectors), embedding_file(folder, vectors[:1])


@pytest.fixture(scope="module")
def embedding_runtime(tiny_package, embedding_files, tmp_path_factory) -> Pipeline:
    folder = with_tiny_unet_and_vae(tiny_package, "tiny", tmp_path_factory.mktemp("embedding-package"),
                                    embeddings=(f"{embedding_files[0]}:{TOKEN}",))
    return Pipeline.from_package(folder, backend="reference")


def generate(pipe: Pipeline, prompt: str, negative_prompt: str = "") -> np.ndarray:
    result = pipe(prompt, negative_prompt=negative_prompt, steps=STEPS, scheduler="pndm", seed=SEED, progress=False)
    return pixels(result.images[0])


def diffusers_image(tiny_pipeline, embedding, config: dict, prompt: str, negative_prompt: str) -> np.ndarray:
    reference = copy.deepcopy(tiny_pipeline)
    reference.load_textual_inversion(str(embedding), token=TOKEN)
    reference.scheduler = PNDMScheduler.from_config(config)
    return reference(
        prompt, negative_prompt=negative_prompt, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(draw_noise(np.random.RandomState(SEED), latent_shape(reference))),
    ).images[0]


def test_embedding_typed_once_matches_diffusers_load_textual_inversion(embedding_runtime, embedding_files,
                                                                      tiny_pipeline):
    prompt, negative = f"a photo of {TOKEN} on a beach", f"blurry, {TOKEN}"
    config = embedding_runtime.package.scheduler_config
    expected = diffusers_image(tiny_pipeline, embedding_files[0], config, prompt, negative)
    typed_once = generate(embedding_runtime, prompt, negative)
    assert psnr(expected, typed_once) >= PSNR_THRESHOLD_DB  # measured 58.4 dB
    written_out = generate(embedding_runtime, f"a photo of {TOKEN} {TOKEN}b {TOKEN}c on a beach",
                           f"blurry, {TOKEN} {TOKEN}b {TOKEN}c")
    np.testing.assert_array_equal(written_out, typed_once)
    # the comparison tells the embedding's first vector alone (what the name typed once used to give) from all
    first_vector_only = diffusers_image(tiny_pipeline, embedding_files[1], config, prompt, negative)
    assert psnr(first_vector_only, typed_once) < 50  # measured 44.7 dB


def test_manifest_expansions_reach_the_encoder(embedding_runtime):
    assert embedding_runtime.package.embeddings == {TOKEN: [TOKEN, TOKEN + "b", TOKEN + "c"]}


def test_bundle_lists_the_expansions_for_swift_apps(embedding_runtime, tmp_path, capsys):
    folder = shutil.copytree(embedding_runtime.package.path, tmp_path / "package")
    resources = write_bundle(folder, family_by_name("sd"))
    expansions = json.loads((resources / "embeddings.json").read_text())
    assert expansions == {TOKEN: f"{TOKEN} {TOKEN}b {TOKEN}c"}
    # the text an app writes out tokenizes to the ids the runtime gives the name typed once
    encoder = embedding_runtime.conditioning.encoders[0]
    typed_once = encoder.chunk_ids(encoder.chunks(f"a photo of {TOKEN}")[0])
    written_out = encoder.token_ids(f"a photo of {expansions[TOKEN]}")
    np.testing.assert_array_equal(typed_once, written_out)


def test_compel_mode_writes_the_name_typed_once_out(embedding_runtime):
    def conditioning(prompt: str) -> np.ndarray:
        return embedding_runtime.condition(prompt, "", SizeConditioning(), (128, 128),
                                               "compel")["encoder_hidden_states"]

    written_out = conditioning(f"a photo of ({TOKEN} {TOKEN}b {TOKEN}c)++")
    np.testing.assert_array_equal(conditioning(f"a photo of {TOKEN}++"), written_out)
    assert not np.array_equal(conditioning(f"a photo of {TOKEN} {TOKEN}b {TOKEN}c++"), written_out)
