"""Clip skip: the TextEncoder packages' extra layers against transformers' `hidden_states`, compel's normed
penultimate layer, SDXL's clip skip against diffusers' `clip_skip`, the refusals and the PNG round trip (the web UI's
clip skip with weighting, end to end: test_prompt_weighting.py)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from coreml_sd.converter.conversion.clip_skip import text_encoder_record
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import build_tiny_pipeline
from coreml_sd.runtime import GenerationError, Pipeline
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.clip_skip import FinalLayerNorm
from coreml_sd.runtime.conditioning import SizeConditioning, TextConditioning
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.infotext import parse_infotext
from coreml_sd.runtime.sampling import draw_noise

from prompt_testing import with_tiny_unet_and_vae
from runtime_testing import PSNR_THRESHOLD_DB, pixels

EMBEDDING_PSNR_DB = 60.0  # measured: hidden_embeds 72.5 dB, compel 72.2-72.8 dB, SDXL 72.0-72.2 dB
PROMPT = "a (red:1.3) cat on a mat, [blurry]"
PROMPT_PIECES = [("a ", 1.0), ("red", 1.3), (" cat on a mat, ", 1.0), ("blurry", 1 / 1.1)]
NEGATIVE = "low quality"


def final_layer_norm(text_encoder) -> torch.nn.LayerNorm:
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers < 5 nests it


class NestedTextModel:
    """A transformers 5 CLIPTextModel as compel's PENULTIMATE_HIDDEN_STATES_NORMALIZED reaches into it, through
    `text_model.final_layer_norm` (transformers < 5's nesting)."""

    def __init__(self, text_encoder):
        self.encoder = text_encoder
        self.text_model = SimpleNamespace(final_layer_norm=final_layer_norm(text_encoder))

    def __call__(self, *args, **kwargs):
        return self.encoder(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def unet_rows(inputs: dict) -> np.ndarray:
    """(B, D, 1, 77) back to (B, 77, D)."""
    return inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)


@torch.no_grad()
def skipped_embeddings(text_encoder, tokenizer, pieces, layer: int, normed: bool) -> torch.Tensor:
    """The web UI's clip skip and emphasis on a transformers CLIP model: `hidden_states[layer]` (through the final
    layer norm when `normed`, as the web UI and diffusers' SD pipeline apply it), each token's vector times its
    weight, rescaled to the mean before weighting."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in pieces:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + tokens, weights + [weight] * len(tokens)
    ids += [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (76 - len(ids))
    weights += [1.0] * (77 - len(weights))
    hidden = text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
    if normed:
        hidden = final_layer_norm(text_encoder)(hidden)
    scaled = hidden * torch.tensor(weights)[None, :, None]
    return scaled * (hidden.mean() / scaled.mean())


@torch.no_grad()
def test_text_encoder_package_holds_the_penultimate_layer(tiny_package, tiny_pipeline):
    """`hidden_embeds` is transformers' hidden_states[-2]; the outputs Apple's Swift package reads are unchanged."""
    model = ReferenceModel(tiny_package / "TextEncoder.mlpackage")
    assert model.output_description == {
        "last_hidden_state": ((1, 77, 32), np.float32), "pooled_outputs": ((1, 32), np.float32),
        "hidden_embeds": ((1, 77, 32), np.float32)}
    ids = tiny_pipeline.tokenizer("a red cat on a mat", padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
    actual = model.predict({"input_ids": ids.numpy().astype(np.float32)})
    expected = tiny_pipeline.text_encoder(ids, output_hidden_states=True)
    assert psnr(expected.hidden_states[-2].numpy(), actual["hidden_embeds"]) >= EMBEDDING_PSNR_DB  # 72.5 dB
    assert psnr(expected.last_hidden_state.numpy(), actual["last_hidden_state"]) >= EMBEDDING_PSNR_DB
    assert psnr(expected.hidden_states[-2].numpy(), actual["last_hidden_state"]) < 20  # another layer: 6.6 dB


@torch.no_grad()
def test_recorded_final_layer_norm_is_the_models():
    """What the converter records of a text encoder's final layer norm (here with a trained-like weight and bias)
    computes what torch's LayerNorm computes."""
    text_encoder = build_tiny_pipeline().text_encoder
    norm = final_layer_norm(text_encoder)
    norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
    norm.bias.copy_(torch.linspace(-0.5, 1.5, norm.bias.numel()))
    record = json.loads(json.dumps(text_encoder_record(text_encoder, SD.component("TextEncoder"), 2)))
    assert record["hidden_layers"] == 2
    hidden = torch.randn(1, 77, norm.weight.numel()) * 3 + 1
    ours = FinalLayerNorm.from_manifest(record["final_layer_norm"])(hidden.numpy())
    np.testing.assert_allclose(ours, norm(hidden).numpy(), rtol=1e-5, atol=1e-5)
    assert "final_layer_norm" not in text_encoder_record(text_encoder, SD.component("TextEncoder"), 1)


@torch.no_grad()
def test_break_chunks_each_read_the_skipped_layer(tiny_runtime, tiny_pipeline):
    """Two 77-token chunks (as a Unet taking 154 tokens gets them), each the normed penultimate layer of its own
    start, tokens and end; the negative prompt padded with the empty prompt's chunk."""
    conditioning = TextConditioning(tiny_runtime.conditioning.encoders[0], max_chunks=2)
    ours = unet_rows(conditioning("a red cat BREAK on a mat", "blurry", SizeConditioning(), (128, 128), clip_skip=2))
    encoder, tokenizer = tiny_pipeline.text_encoder, tiny_pipeline.tokenizer

    def chunk(text: str) -> np.ndarray:
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return final_layer_norm(encoder)(encoder(ids, output_hidden_states=True).hidden_states[-2]).numpy()[0]

    assert ours.shape == (2, 154, 32)
    assert psnr(np.concatenate([chunk("blurry"), chunk("")]), ours[0]) >= EMBEDDING_PSNR_DB
    assert psnr(np.concatenate([chunk("a red cat"), chunk("on a mat")]), ours[1]) >= EMBEDDING_PSNR_DB


def test_compel_clip_skip_2_matches_compels_penultimate_layer(tiny_runtime, tiny_pipeline):
    compel = pytest.importorskip("compel")
    reference = compel.Compel(
        tokenizer=tiny_pipeline.tokenizer, text_encoder=NestedTextModel(tiny_pipeline.text_encoder),
        returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
        downweight_mode=compel.DownweightMode.REMOVE)
    prompt, negative = "a cat++ on a (red)1.3 mat, (blurry)0.5", "ugly--"
    ours = unet_rows(tiny_runtime.condition(prompt, negative, SizeConditioning(), (128, 128), "compel", clip_skip=2))
    with torch.no_grad():
        for row, text in enumerate((negative, prompt)):
            assert psnr(reference(text).numpy()[0], ours[row]) >= EMBEDDING_PSNR_DB


def test_sdxl_clip_skip_reads_one_layer_deeper_without_the_norm(xl_base, tiny_xl_pipeline):
    """SDXL's clip skip N is diffusers' clip_skip N - 1: hidden_states[-(N + 1)] of both encoders, no final layer
    norm; the pooled output stays the last layer's."""
    pipe = tiny_xl_pipeline
    inputs = xl_base.condition(PROMPT, NEGATIVE, SizeConditioning(), (128, 128), clip_skip=2)
    plain = xl_base.condition(PROMPT, NEGATIVE, SizeConditioning(), (128, 128))
    for row, pieces in ((0, [(NEGATIVE, 1.0)]), (1, PROMPT_PIECES)):
        first = skipped_embeddings(pipe.text_encoder, pipe.tokenizer, pieces, -3, normed=False)
        second = skipped_embeddings(pipe.text_encoder_2, pipe.tokenizer_2, pieces, -3, normed=False)
        assert psnr(torch.cat([first, second], dim=-1).numpy()[0], unet_rows(inputs)[row]) >= EMBEDDING_PSNR_DB
    np.testing.assert_array_equal(inputs["text_embeds"], plain["text_embeds"])


def test_sdxl_clip_skip_matches_diffusers_clip_skip(xl_base, tiny_xl_pipeline):
    """diffusers' SDXL pipeline applies clip_skip to the prompt only; an empty negative prompt is zeros in both."""
    steps, seed = 3, 5
    ours = xl_base("a photo of an astronaut", steps=steps, scheduler="euler", seed=seed, clip_skip=2, progress=False)
    pipe = tiny_xl_pipeline
    pipe.scheduler = type(pipe.scheduler).from_config(xl_base.package.scheduler_config)
    reference = pipe("a photo of an astronaut", num_inference_steps=steps, guidance_scale=7.5, clip_skip=1,
                     latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, 16, 16))),
                     height=128, width=128, output_type="np").images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB  # measured 57.9 dB


@pytest.fixture(scope="module")
def package_without_layers(tiny_package, tmp_path_factory):
    """A tiny package whose TextEncoder holds no clip skip layers (as packages converted before them): exactly
    the outputs of Apple's contract."""
    folder = with_tiny_unet_and_vae(tiny_package, "tiny", tmp_path_factory.mktemp("no-layers"), clip_skip_layers=1)
    assert list(ReferenceModel(folder / "TextEncoder.mlpackage").output_description) == [
        "last_hidden_state", "pooled_outputs"]
    return folder


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([*argv, "--backend", "reference", "--steps", "1", "--scheduler", "ddim"])
    return code, capsys.readouterr().err


def test_bad_clip_skip_is_one_line_and_no_file(tiny_package, package_without_layers, tmp_path, capsys):
    output = tmp_path / "out.png"
    cases = [
        (["--clip-skip", "0", "--model", str(tiny_package)], 2,
         "Error: --clip-skip must be at least 1 (1: the last layer, as without it; 2: the penultimate), not 0 (see "
         "coreml-generate --help)"),
        (["--clip-skip", "3", "--model", str(tiny_package)], 1,
         "Error: --clip-skip 3 is past the text encoder's depth: the TextEncoder of package 'tiny-split_einsum' has 2 "
         "layers, so clip skip goes up to 2"),
        (["--clip-skip", "2", "--model", str(package_without_layers)], 1,
         f"Error: --clip-skip 2: the TextEncoder of package '{package_without_layers.name}' holds no layers for clip "
         "skip (converted before it, or by another converter); convert it again with coreml-convert "
         "--clip-skip-layers 2"),
    ]
    for argv, code, message in cases:
        result, err = run(["a cat", *argv, "-o", str(output)], capsys)
        assert (result, err.strip()) == (code, message)
        assert not output.exists()


def test_package_without_a_recorded_norm_refuses(package_without_layers, tiny_package, tmp_path, capsys):
    """A TextEncoder with the layer but a manifest without the final layer norm (edited, or written by an older
    converter) cannot apply it."""
    import shutil

    folder = tmp_path / "no-norm"
    shutil.copytree(tiny_package, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["components"]["TextEncoder"]["final_layer_norm"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match="records no final layer norm of its TextEncoder"):
        Pipeline.from_package(folder, backend="reference")("a cat", steps=1, scheduler="ddim", clip_skip=2,
                                                           progress=False)
    # clip skip 1 needs nothing of it
    without = Pipeline.from_package(package_without_layers, backend="reference")
    assert without("a cat", steps=1, scheduler="ddim", progress=False).images


def test_from_png_round_trips_clip_skip(tiny_package, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, err = run(["a cat", "--clip-skip", "2", "--seed", "4", "--model", str(tiny_package), "-o", str(first)],
                    capsys)
    assert code == 0, err
    assert parse_infotext(Image.open(first).info["parameters"]).settings["Clip skip"] == "2"
    code, err = run(["--from-png", str(first), "--model", str(tiny_package), "-o", str(again)], capsys)
    assert code == 0, err
    assert parse_infotext(Image.open(again).info["parameters"]).settings["Clip skip"] == "2"
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
