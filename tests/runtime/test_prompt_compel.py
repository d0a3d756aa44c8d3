"""`--prompt-syntax compel`: the compel library over the converted text encoders against compel over diffusers'
float32 CLIP models, with the same settings (downweighting by removing words: a package's encoder has no
attention mask)."""
import pytest
import torch

from coreml_sd.runtime.cli import main
from coreml_sd.runtime.conditioning import SizeConditioning
from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.executor import psnr

compel = pytest.importorskip("compel")

EMBEDDING_PSNR_DB = 60.0  # measured: SD 69.0-70.7 dB; SDXL hidden 71.3-71.9 dB, pooled 68.8-71.9 dB
PROMPTS = [
    ("a cat++ on a (red)1.3 mat, (blurry)0.5", "ugly--, (text)1.2"),
    ('("a red cat", "a blue dog").blend(0.7, 0.3)', ""),
]


def unet_rows(inputs: dict) -> torch.Tensor:
    """(B, D, 1, 77) back to compel's (B, 77, D)."""
    return inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)


@pytest.mark.parametrize(("prompt", "negative"), PROMPTS)
def test_sd_compel_matches_compel_on_diffusers(tiny_runtime, tiny_pipeline, prompt, negative):
    reference = compel.Compel(tokenizer=tiny_pipeline.tokenizer, text_encoder=tiny_pipeline.text_encoder,
                              downweight_mode=compel.DownweightMode.REMOVE)
    ours = unet_rows(tiny_runtime.condition(prompt, negative, SizeConditioning(), (128, 128), "compel"))
    with torch.no_grad():
        for row, text in enumerate((negative, prompt)):
            assert psnr(reference(text).numpy()[0], ours[row]) >= EMBEDDING_PSNR_DB


def test_sdxl_compel_matches_compel_on_diffusers_with_pooled(xl_base, tiny_xl_pipeline):
    pipe = tiny_xl_pipeline
    reference = compel.Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True], downweight_mode=compel.DownweightMode.REMOVE,
    )
    prompt, negative = PROMPTS[0]
    inputs = xl_base.condition(prompt, negative, SizeConditioning(), (128, 128), "compel")
    with torch.no_grad():
        for row, text in enumerate((negative, prompt)):
            hidden, pooled = reference(text)
            assert psnr(hidden.numpy()[0], unet_rows(inputs)[row]) >= EMBEDDING_PSNR_DB
            assert psnr(pooled.numpy(), inputs["text_embeds"][row : row + 1]) >= EMBEDDING_PSNR_DB


def test_malformed_compel_prompt_is_one_line(tiny_runtime, tiny_package, tmp_path, capsys):
    with pytest.raises(GenerationError, match="the prompt is not a valid compel expression"):
        tiny_runtime('("a", "b").blend(0.7)', prompt_syntax="compel", steps=2, progress=False)
    code = main(['a cat', "--negative-prompt", '("a", "b").blend(x, y)', "--prompt-syntax", "compel", "--model",
                 str(tiny_package), "--backend", "reference", "--steps", "2", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Error: the negative prompt is not a valid compel expression (")
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_compel_prompt_is_recorded(tiny_runtime):
    result = tiny_runtime("a cat++", prompt_syntax="compel", steps=1, scheduler="ddim", seed=1, progress=False)
    assert result.parameters[0].startswith("a cat++\nSteps: 1, Sampler: DDIM,")
    assert ", Prompt syntax: compel" in result.parameters[0]
