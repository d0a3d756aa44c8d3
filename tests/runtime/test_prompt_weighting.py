"""Weighted prompts through the converted text encoders against the web UI's math done on diffusers' float32
CLIP models, and end to end against diffusers' pipelines given those reference embeddings.

The web UI rescales weighted hidden states to their mean before weighting. The tiny model's final layer norm
has a zero bias, which makes that mean zero up to rounding and the rescaling noise; trained CLIP models'
biases make it clearly non-zero, and so does the bias given to the tiny text encoder here.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from coreml_sd.converter.models.tiny import build_tiny_pipeline
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.conditioning import SizeConditioning, TextConditioning
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.sampling import draw_noise

from prompt_testing import with_tiny_unet_and_vae
from runtime_testing import PSNR_THRESHOLD_DB, latent_shape, pixels

EMBEDDING_PSNR_DB = 60.0  # measured: SD 71.5-72.9 dB; SDXL hidden 65.9-71.0 dB, pooled 63.2-67.9 dB

WEIGHTED = "a (red:1.3) cat, [blurry] ((sky))"
# The same prompt as the web UI's parser splits it (test_prompt_syntax.py checks the parser against its examples).
WEIGHTED_PIECES = [("a ", 1.0), ("red", 1.3), (" cat, ", 1.0), ("blurry", 1 / 1.1), (" ", 1.0), ("sky", 1.21)]
NEGATIVE = "(low quality:0.8), text"
NEGATIVE_PIECES = [("low quality", 0.8), (", text", 1.0)]


@torch.no_grad()
def a1111_embeddings(text_encoder, tokenizer, pieces, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The web UI's emphasis on a diffusers CLIP model: the pieces' tokens in one 77-token chunk, hidden states of
    `layer` times each token's weight, rescaled to their mean before weighting; and the pooled output, if any."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in pieces:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    ids.append(tokenizer.eos_token_id)
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    output = text_encoder(torch.tensor([ids]), output_hidden_states=True)
    hidden = output.hidden_states[layer] if layer != -1 else output.last_hidden_state
    scaled = hidden * torch.tensor(weights)[None, :, None]
    return scaled * (hidden.mean() / scaled.mean()), getattr(output, "text_embeds", None)


@pytest.fixture(scope="module")
def biased_pipeline():
    """The tiny pipeline with a final layer norm bias of mean 0.5 in its text encoder."""
    pipeline = build_tiny_pipeline()
    with torch.no_grad():
        bias = pipeline.text_encoder.final_layer_norm.bias
        bias.copy_(torch.linspace(-0.5, 1.5, bias.numel()))
    return pipeline


@pytest.fixture(scope="module")
def biased_runtime(biased_pipeline, tiny_package, tmp_path_factory) -> Pipeline:
    """The tiny package with the biased text encoder converted in place of its own."""
    source = tmp_path_factory.mktemp("biased-source")
    biased_pipeline.save_pretrained(source)
    folder = with_tiny_unet_and_vae(tiny_package, str(source), tmp_path_factory.mktemp("biased"))
    return Pipeline.from_package(folder, backend="reference")


def test_weighted_embeddings_match_the_web_uis_math(biased_runtime, biased_pipeline):
    tiny_runtime, tiny_pipeline = biased_runtime, biased_pipeline
    inputs = tiny_runtime.conditioning(WEIGHTED, NEGATIVE, SizeConditioning(), (128, 128))
    ours = inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)
    for row, pieces in ((0, NEGATIVE_PIECES), (1, WEIGHTED_PIECES)):
        reference, _ = a1111_embeddings(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, pieces)
        assert psnr(reference.numpy()[0], ours[row]) >= EMBEDDING_PSNR_DB
    unweighted, _ = a1111_embeddings(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer,
                                     [("a red cat, blurry sky", 1)])
    assert psnr(unweighted.numpy()[0], ours[1]) < 40  # the weights matter: measured 35.2 dB


def test_weighted_prompt_image_matches_diffusers_given_the_embeddings(biased_runtime, biased_pipeline):
    tiny_runtime, tiny_pipeline = biased_runtime, biased_pipeline
    steps, seed = 4, 3
    ours = tiny_runtime(WEIGHTED, negative_prompt=NEGATIVE, steps=steps, scheduler="pndm", seed=seed, progress=False)
    encoder, tokenizer = tiny_pipeline.text_encoder, tiny_pipeline.tokenizer
    pipe = StableDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": PNDMScheduler.from_config(
        tiny_runtime.package.scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=a1111_embeddings(encoder, tokenizer, WEIGHTED_PIECES)[0],
        negative_prompt_embeds=a1111_embeddings(encoder, tokenizer, NEGATIVE_PIECES)[0],
        num_inference_steps=steps, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(tiny_pipeline))),
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB  # measured 58.5 dB
    assert ours.parameters[0].startswith(f"{WEIGHTED}\nNegative prompt: {NEGATIVE}\n")  # as typed


@torch.no_grad()
def clip_skip_2_embeddings(text_encoder, tokenizer, pieces) -> torch.Tensor:
    """The web UI's clip skip 2: the penultimate layer through the final layer norm, then weighted."""
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers < 5 nests it

    class Normed:
        def __call__(self, ids, output_hidden_states):
            output = text_encoder(ids, output_hidden_states=True)
            return SimpleNamespace(last_hidden_state=norm(output.hidden_states[-2]))

    return a1111_embeddings(Normed(), tokenizer, pieces)[0]


def test_weighted_clip_skip_matches_the_web_uis_math(biased_runtime, biased_pipeline):
    """The weights apply to the clip-skipped embeddings, as the web UI applies them; the recorded final layer norm
    (with the biased encoder's bias) is the model's."""
    inputs = biased_runtime.condition(WEIGHTED, NEGATIVE, SizeConditioning(), (128, 128), clip_skip=2)
    ours = inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)
    encoder, tokenizer = biased_pipeline.text_encoder, biased_pipeline.tokenizer
    for row, pieces in ((0, NEGATIVE_PIECES), (1, WEIGHTED_PIECES)):
        reference = clip_skip_2_embeddings(encoder, tokenizer, pieces)
        assert psnr(reference.numpy()[0], ours[row]) >= EMBEDDING_PSNR_DB  # measured 73.4-74.8 dB
    last, _ = a1111_embeddings(encoder, tokenizer, WEIGHTED_PIECES)
    assert psnr(last.numpy()[0], ours[1]) < 30  # another layer: 16.2 dB


def test_clip_skip_2_image_matches_diffusers_given_the_embeddings(biased_runtime, biased_pipeline):
    steps, seed = 4, 3
    ours = biased_runtime(WEIGHTED, negative_prompt=NEGATIVE, steps=steps, scheduler="pndm", seed=seed, clip_skip=2,
                          progress=False)
    encoder, tokenizer = biased_pipeline.text_encoder, biased_pipeline.tokenizer
    pipe = StableDiffusionPipeline(**{**biased_pipeline.components, "scheduler": PNDMScheduler.from_config(
        biased_runtime.package.scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=clip_skip_2_embeddings(encoder, tokenizer, WEIGHTED_PIECES),
        negative_prompt_embeds=clip_skip_2_embeddings(encoder, tokenizer, NEGATIVE_PIECES),
        num_inference_steps=steps, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(biased_pipeline))),
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB  # measured 58.4 dB
    assert ours.parameters[0].endswith(", Clip skip: 2")


def test_sdxl_weights_both_encoders_and_keeps_the_pooled_output(xl_base, tiny_xl_pipeline):
    inputs = xl_base.conditioning(WEIGHTED, NEGATIVE, SizeConditioning(), (128, 128))
    hidden = inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)
    reference = tiny_xl_pipeline
    for row, pieces in ((0, NEGATIVE_PIECES), (1, WEIGHTED_PIECES)):
        first, _ = a1111_embeddings(reference.text_encoder, reference.tokenizer, pieces, layer=-2)
        second, pooled = a1111_embeddings(reference.text_encoder_2, reference.tokenizer_2, pieces, layer=-2)
        assert psnr(torch.cat([first, second], dim=-1).numpy()[0], hidden[row]) >= EMBEDDING_PSNR_DB
        assert psnr(pooled.numpy(), inputs["text_embeds"][row : row + 1]) >= EMBEDDING_PSNR_DB


@torch.no_grad()
def test_long_prompts_encode_in_chunks_padded_to_the_same_count(tiny_runtime, tiny_pipeline, caplog):
    """Two 77-token chunks, as a Unet taking 154 tokens would get them: the prompt's 100 tokens as 75 + 25, each
    chunk with its start and end token; the short negative prompt padded with the empty prompt's chunk."""
    conditioning = TextConditioning(tiny_runtime.conditioning.encoders[0], max_chunks=2)
    inputs = conditioning("a " * 100, "blurry", SizeConditioning(), (128, 128))
    ours = inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)
    assert ours.shape == (2, 154, 32)
    encoder, tokenizer = tiny_pipeline.text_encoder, tiny_pipeline.tokenizer

    def chunk(text: str) -> np.ndarray:
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return encoder(ids).last_hidden_state.numpy()[0]

    positive = np.concatenate([chunk("a " * 75), chunk("a " * 25)])
    negative = np.concatenate([chunk("blurry"), chunk("")])
    assert psnr(negative, ours[0]) >= EMBEDDING_PSNR_DB and psnr(positive, ours[1]) >= EMBEDDING_PSNR_DB
    with caplog.at_level("WARNING", logger="coreml_sd.runtime"):
        conditioning("a " * 160, "", SizeConditioning(), (128, 128))
    assert "the prompt is 162 tokens long but CLIP reads 154; the last 10 tokens were dropped" in caplog.text
