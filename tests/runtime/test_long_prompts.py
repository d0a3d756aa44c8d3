"""Prompts past 77 tokens on a package converted with --max-prompt-chunks 2: the Unet's function for two chunks
against diffusers' Unet, and whole generations against diffusers' pipelines given the web UI's long-prompt
embeddings (75-token chunks, each with its start and end token, encoded alone and concatenated)."""
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPanoramaPipeline, StableDiffusionPipeline

from coreml_sd.converter.cli import main as convert_command
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.runtime import Pipeline, tiling
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.sampling import draw_noise

from runtime_testing import PSNR_THRESHOLD_DB, _with_scheduler, diffusers_img2img, latent_shape, pixels

FUNCTION_PSNR_DB = 60.0  # float16 functions against diffusers' float32 Unet: measured 69.3 (main), 69.2 dB (154)
# 31 words, 1 token each in CLIP's vocabulary, no commas (no chunk boundary moves): 4 times over, 124 tokens
WORDS = ("a photo of an astronaut riding a horse on the moon with stars and a blue planet in the sky above "
         "red rocks and white dust under his feet at night").split()
LONG_PROMPT = " ".join(WORDS * 4)
SHORT_PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def two_chunk_package(tiny_package, converted_once) -> Path:
    """The tiny package with its Unet converted again with --max-prompt-chunks 2 (no validation: the tests here
    compare it with diffusers themselves)."""
    def build(folder: Path) -> None:
        shutil.copytree(tiny_package, folder)
        report = convert_model(ConversionOptions(model="tiny", output=folder, components=("Unet",), validate=False,
                                                 max_prompt_chunks=2))
        assert report.converted == ["Unet"]

    return converted_once("tiny-2-prompt-chunks", build)


@pytest.fixture(scope="module")
def two_chunk_runtime(two_chunk_package) -> Pipeline:
    return Pipeline.from_package(two_chunk_package, backend="reference")


@torch.no_grad()
def web_ui_embeddings(reference, prompt: str, chunks: int) -> torch.Tensor:
    """(1, 77 chunks, D): the prompt's tokens in 75-token chunks, each read as start token, tokens, end token and
    padding, encoded alone by diffusers' CLIP text model; chunks past the prompt's are the empty prompt's."""
    tokenizer = reference.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    pieces = [ids[start : start + 75] for start in range(0, len(ids), 75)]
    pieces += [[]] * (chunks - len(pieces))
    rows = [[tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(piece))
            for piece in pieces]
    return torch.cat([reference.text_encoder(torch.tensor([row])).last_hidden_state for row in rows], dim=1)


def test_the_manifest_records_the_functions_and_their_minimum_os(two_chunk_package, tiny_pipeline):
    entry = json.loads((two_chunk_package / "manifest.json").read_text())["components"]["Unet"]
    assert entry["max_prompt_chunks"] == 2 and entry["minimum_os"] == "macOS 15 / iOS 18"
    assert entry["inputs"]["encoder_hidden_states"]["shape"] == [2, 32, 1, 77]  # main, as Apple's Swift package
    assert list(entry["functions"]) == ["tokens_154"]
    function = entry["functions"]["tokens_154"]
    assert (function["unet_batch_size"], function["prompt_chunks"]) == (2, 2)
    assert function["inputs"]["encoder_hidden_states"]["shape"] == [2, 32, 1, 154]
    assert len(tiny_pipeline.tokenizer(LONG_PROMPT).input_ids) == 126  # two chunks: 75 + 49 tokens


@torch.no_grad()
@pytest.mark.parametrize("function, tokens", [("main", 77), ("tokens_154", 154)])
def test_each_function_matches_the_diffusers_unet(two_chunk_package, tiny_pipeline, function, tokens):
    model = ReferenceModel(two_chunk_package / "Unet.mlpackage", function_name=function)
    rng = np.random.RandomState(7)
    inputs = {"sample": rng.randn(2, 4, 16, 16).astype(np.float16),
              "timestep": np.array([981, 981], np.float16),
              "encoder_hidden_states": rng.randn(2, 32, 1, tokens).astype(np.float16)}
    ours = model.predict(inputs)["noise_pred"]
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    context = x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
    expected = tiny_pipeline.unet(x["sample"], x["timestep"], context).sample.numpy()
    assert psnr(expected, ours) >= FUNCTION_PSNR_DB


def test_the_converters_validation_runs_each_recorded_function(two_chunk_package):
    """What conversion (and --validate-only) checks of each further function: the function read back from the
    manifest, run on inputs of its own shapes against diffusers' Unet."""
    from coreml_sd.converter.conversion.multifunction import recorded_functions
    from coreml_sd.converter.conversion.validate import validate
    from coreml_sd.converter.sources import resolve
    from coreml_sd.runtime.contract import ModelDimensions

    manifest = json.loads((two_chunk_package / "manifest.json").read_text())
    [function] = recorded_functions(manifest["components"]["Unet"], ModelDimensions.from_manifest(manifest))
    assert (function.name, function.dims.unet_batch_size, function.dims.prompt_chunks) == ("tokens_154", 2, 2)
    source = resolve("tiny")
    result = validate(two_chunk_package / "Unet.mlpackage", source.family.component("Unet"),
                      function.spec(source, "Unet"), lambda: source.load("Unet", torch.float32), 0,
                      source.latent_scaling_factor, function_name=function.name)
    assert result["psnr_db"] >= FUNCTION_PSNR_DB  # measured 65.7 dB


def test_a_two_chunk_prompt_matches_diffusers_given_the_web_uis_embeddings(two_chunk_runtime, tiny_pipeline):
    steps, seed = 4, 3
    ours = two_chunk_runtime(LONG_PROMPT, negative_prompt="blurry", steps=steps, scheduler="pndm", seed=seed,
                             progress=False)
    pipe = StableDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": PNDMScheduler.from_config(
        two_chunk_runtime.package.scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=web_ui_embeddings(tiny_pipeline, LONG_PROMPT, 2),
        negative_prompt_embeds=web_ui_embeddings(tiny_pipeline, "blurry", 2),  # padded with the empty prompt
        num_inference_steps=steps, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(tiny_pipeline))),
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB  # measured 58.4 dB
    truncated = pipe(prompt=LONG_PROMPT, negative_prompt="blurry", num_inference_steps=steps, output_type="np",
                     latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(tiny_pipeline))),
                     ).images[0]
    assert psnr(truncated, pixels(ours.images[0])) < 40  # the second chunk matters: measured 37.5 dB


def test_a_short_prompt_gives_the_one_chunk_packages_image(two_chunk_runtime, tiny_runtime):
    settings = {"negative_prompt": "blurry", "steps": 3, "seed": 2, "progress": False}
    ours = two_chunk_runtime(SHORT_PROMPT, **settings).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(tiny_runtime(SHORT_PROMPT, **settings).images[0]))


def test_image_to_image_with_a_long_negative_prompt_matches_diffusers(two_chunk_runtime, tiny_pipeline, start_image,
                                                                       monkeypatch):
    """A short prompt padded to the long negative prompt's two chunks, as the web UI pads it."""
    steps, seed, strength = 4, 5, 0.6
    ours = two_chunk_runtime(SHORT_PROMPT, negative_prompt=LONG_PROMPT, image=start_image, strength=strength,
                             steps=steps, scheduler="pndm", seed=seed, progress=False).images[0]
    reference = diffusers_img2img(tiny_pipeline, two_chunk_runtime.package.scheduler_config, None, "", "pndm",
                                  steps, seed, start_image, strength, monkeypatch,
                                  prompt_embeds=web_ui_embeddings(tiny_pipeline, SHORT_PROMPT, 2),
                                  negative_prompt_embeds=web_ui_embeddings(tiny_pipeline, LONG_PROMPT, 2))
    assert psnr(reference, pixels(ours)) >= PSNR_THRESHOLD_DB  # measured 58.3 dB


def test_wide_images_run_the_long_prompt_in_every_window_as_diffusers_panorama(two_chunk_runtime, tiny_pipeline,
                                                                               monkeypatch):
    """Tiles of the package's size, each through the two-chunk function, against diffusers' MultiDiffusion given
    the same embeddings (its uniform window weights, DDIM, the same initial latents)."""
    steps, seed, width = 3, 5, 256
    monkeypatch.setattr(two_chunk_runtime.sampler, "window_weights", tiling.uniform_weights)
    ours = two_chunk_runtime(LONG_PROMPT, steps=steps, scheduler="ddim", seed=seed, width=width, height=128,
                             overlap=64, output_type="latent", progress=False).images[0]
    panorama = _with_scheduler(StableDiffusionPanoramaPipeline, tiny_pipeline, "ddim",
                               two_chunk_runtime.package.scheduler_config)
    panorama.scheduler = DDIMScheduler.from_config(panorama.scheduler.config, clip_sample=False, steps_offset=1)
    panorama.get_views = partial(panorama.get_views, window_size=16, stride=8)
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, 16, width // 8)))
    reference = panorama(prompt_embeds=web_ui_embeddings(tiny_pipeline, LONG_PROMPT, 2),
                         negative_prompt_embeds=web_ui_embeddings(tiny_pipeline, "", 2), height=128, width=width,
                         num_inference_steps=steps, latents=latents, output_type="latent").images
    assert psnr(reference.numpy(), ours.numpy()) >= PSNR_THRESHOLD_DB  # measured 63.7 dB (latents)


def test_a_prompt_past_the_packages_chunks_is_cut_with_a_warning_and_runs(two_chunk_runtime, caplog):
    with caplog.at_level("WARNING", logger="coreml_sd.runtime"):
        result = two_chunk_runtime(" ".join(WORDS * 6), steps=2, seed=1, progress=False)
    assert result.images[0].size == (128, 128)
    assert ("the prompt is 188 tokens long but CLIP reads 154; the last 36 tokens were dropped" in caplog.text
            and "a package converted with coreml-convert --max-prompt-chunks 3 would keep them" in caplog.text)


def test_the_core_ml_backend_runs_the_two_chunk_function_by_name(two_chunk_package, monkeypatch, tmp_path):
    """Through the Core ML adapter (coremltools' CompiledMLModel stood in for by the executor), as the executor."""
    from coreml_sd.runtime import backends

    from coreml_standin import Compiler, core_ml_standin

    monkeypatch.setattr(backends, "core_ml_functions", core_ml_standin(Compiler()))
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    settings = {"seed": 4, "steps": 2, "progress": False}
    image = Pipeline.from_package(two_chunk_package, backend="reference")(LONG_PROMPT, **settings).images[0]
    core_ml = Pipeline.from_package(two_chunk_package, backend="coreml")
    assert np.array_equal(np.asarray(core_ml(LONG_PROMPT, **settings).images[0]), np.asarray(image))
    assert core_ml.sampler.unet.models[2]._model._model.function_name == "tokens_154"


@pytest.mark.parametrize("argv, line", [
    (["--max-prompt-chunks", "0"],
     "Error: --max-prompt-chunks must be at least 1 (got 0): 1 is 77 tokens, each more another 77"),
    (["--max-prompt-chunks", "2", "--min-target", "iOS17"],
     "Error: --min-target iOS17 is lower than --max-prompt-chunks 2 (a multifunction Unet) needs (iOS18 / "
     "macOS15): raise --min-target to iOS18 or leave it out"),
    (["--unguided-function", "--min-target", "macOS14"],
     "Error: --min-target macOS14 is lower than --unguided-function (a multifunction Unet) needs (iOS18 / macOS15): "
     "raise --min-target to iOS18 or leave it out"),
    (["--max-prompt-chunks", "2", "--chunk-unet"],
     "Error: --max-prompt-chunks adds functions to a Unet in one package: drop --chunk-unet"),
])
def test_bad_multifunction_options_are_one_line(capsys, tmp_path, argv, line):
    code = convert_command(["--model", "tiny", "-o", str(tmp_path / "out"), *argv])
    lines = [text for text in capsys.readouterr().err.splitlines() if text.strip()]
    assert (code, lines) == (1, [line])
    assert not (tmp_path / "out").exists()


def test_both_options_give_a_function_per_batch_and_length():
    from coreml_sd.converter.conversion.multifunction import component_functions
    from coreml_sd.runtime.contract import ModelDimensions

    dims = ModelDimensions(text_width=32, height=128, width=128)
    unet = component_functions("unet", dims, unguided_function=True, max_prompt_chunks=3)
    assert [(f.name, f.dims.unet_batch_size, f.dims.prompt_chunks) for f in unet] == [
        ("unguided", 1, 1), ("tokens_154", 2, 2), ("unguided_tokens_154", 1, 2), ("tokens_231", 2, 3),
        ("unguided_tokens_231", 1, 3)]
    controlnet = component_functions("controlnet", dims, unguided_function=True, max_prompt_chunks=2)
    assert [f.name for f in controlnet] == ["tokens_154"]  # the unguided function is the Unet's alone
    assert component_functions("text_encoder", dims, unguided_function=True, max_prompt_chunks=2) == []
    assert component_functions("unet", dims, unguided_function=False, max_prompt_chunks=1) == []
