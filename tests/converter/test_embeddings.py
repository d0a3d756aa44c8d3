"""Textual-inversion embeddings: the tokens are one id each for this runtime's tokenizer, transformers'
CLIPTokenizer and the Swift package's BPE algorithm (re-implemented here), other words keep their ids, and
the TextEncoder computes what diffusers' `load_textual_inversion` computes."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from coreml_sd.converter.adapters.embeddings import read_embedding
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.models.tiny import clip_vocabulary_files
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.prompt import PromptEncoder

EMBEDDING_PSNR_DB = 64.0  # the text encoder with the embedding measures 67.7 dB against diffusers

TOKEN = "xyzcat"
PROMPT = f"a photo of {TOKEN} {TOKEN}b on a beach"
ORDINARY_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "portrait of a cat wearing a tiny hat, studio lighting, highly detailed",
    "xyzcats catxyz xyz xyzca cat dogcat xyzdog",  # words that share pieces with the token
    "a watercolor painting of a lighthouse at dusk, trending on artstation",
    "cyberpunk city street at night rain neon signs reflections 8k",
    "an oil painting of a bowl of fruit by cezanne",
]


def swift_bpe_ids(prompt: str, vocab: dict, merges_text: str) -> list[int]:
    """Apple's Swift BPETokenizer, written out: lowercase, split on spaces, then per word merge the adjacent
    pair of lowest rank in merges.txt until none has one, then look each piece up in vocab.json."""
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(merges_text.splitlines()[1:]) if line}
    ids = [vocab["<|startoftext|>"]]
    for word in prompt.strip().lower().split(" "):
        if not word:
            continue
        tokens = list(word[:-1]) + [word[-1] + "</w>"]
        while True:
            candidates = [pair for pair in zip(tokens, tokens[1:]) if pair in ranks]
            if not candidates:
                break
            first, second = min(candidates, key=ranks.__getitem__)
            merged, index = [], 0
            while index < len(tokens):
                if index + 1 < len(tokens) and tokens[index] == first and tokens[index + 1] == second:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(tokens[index])
                    index += 1
            tokens = merged
        ids += [vocab.get(token, vocab["<|endoftext|>"]) for token in tokens]
    return ids + [vocab["<|endoftext|>"]]


@pytest.fixture(scope="module")
def vectors():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def package(tmp_path_factory, vectors):
    folder = tmp_path_factory.mktemp("embedding")
    path = folder / "xyzcat.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": TOKEN, "step": 3000}, path)
    output = folder / "package"
    convert_model(ConversionOptions(model="tiny", output=output, embeddings=(str(path),), components=("TextEncoder",),
                                    validate=False))
    return path, output


def runtime_ids(folder, prompt):
    encoder = PromptEncoder(folder / "vocab.json", folder / "merges.txt", text_encoder=None)
    ids = encoder.token_ids(prompt)[0].tolist()
    return ids[: ids.index(49407) + 1]


def test_tokens_are_one_id_each_for_all_three_tokenizers(package):
    _, folder = package
    vocab = json.loads((folder / "vocab.json").read_text())
    swift = swift_bpe_ids(PROMPT, vocab, (folder / "merges.txt").read_text())
    transformers_ids = CLIPTokenizer.from_pretrained(folder)(PROMPT).input_ids
    assert swift == transformers_ids == runtime_ids(folder, PROMPT)
    assert swift.count(49408) == 1 and swift.count(49409) == 1 and len(swift) == 2 + len(PROMPT.split())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["adapters"][0]["tokens"] == [TOKEN, TOKEN + "b"] and manifest["adapters"][0]["ids"] == [
        49408,
        49409,
    ]


def test_other_words_keep_their_ids(package):
    _, folder = package
    original_vocab, original_merges = clip_vocabulary_files()
    original = json.loads(open(original_vocab).read()), open(original_merges).read()
    extended = json.loads((folder / "vocab.json").read_text()), (folder / "merges.txt").read_text()
    plain = CLIPTokenizer(original_vocab, original_merges)
    for prompt in ORDINARY_PROMPTS:
        assert swift_bpe_ids(prompt, *extended) == swift_bpe_ids(prompt, *original), prompt
        assert runtime_ids(folder, prompt) == plain(prompt).input_ids, prompt


def test_only_words_ending_in_the_tokens_last_two_pieces_change(package):
    """The limit of any BPE-only scheme: xyzcat is `xy z cat</w>`, its first added merge is `z cat</w>`, so a
    word whose own pieces end in `z cat</w>` (zcat, bxyzcat) now ends in the token."""
    _, folder = package
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text()
    assert swift_bpe_ids("zcat", vocab, merges)[1:-1] == [49408]
    assert swift_bpe_ids("bxyzcat", vocab, merges)[-2] == 49408


def test_text_encoder_matches_diffusers_load_textual_inversion(package, tiny_pipeline):
    path, folder = package
    reference = copy.deepcopy(tiny_pipeline)
    reference.load_textual_inversion(str(path), token=TOKEN)
    # diffusers expands a multi-vector token itself ("xyzcat" -> "xyzcat xyzcat_1"); the package spells it out.
    diffusers_prompt = reference.maybe_convert_prompt(f"a photo of {TOKEN} on a beach", reference.tokenizer)
    expected_ids = reference.tokenizer(
        diffusers_prompt, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    ours = PromptEncoder(folder / "vocab.json", folder / "merges.txt", text_encoder=None).token_ids(PROMPT)
    np.testing.assert_array_equal(ours, expected_ids.numpy())
    with torch.no_grad():
        expected = reference.text_encoder(expected_ids).last_hidden_state.numpy()
    actual = ReferenceModel(folder / "TextEncoder.mlpackage").predict({"input_ids": ours.astype(np.float32)})
    assert psnr(expected, actual["last_hidden_state"]) >= EMBEDDING_PSNR_DB


def test_kohya_and_diffusers_files_read_as_a1111(tmp_path, vectors):
    save_file({"emb_params": vectors}, str(tmp_path / "kohya.safetensors"))
    save_file({"<xyzcat>": vectors[0]}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"string_to_param": {"*": vectors}, "name": TOKEN}, tmp_path / "a1111.pt")
    assert torch.equal(read_embedding(tmp_path / "kohya.safetensors")[1], vectors)
    assert read_embedding(tmp_path / "learned_embeds.safetensors")[0] == TOKEN
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.safetensors")[1], vectors[:1])
    token, loaded = read_embedding(tmp_path / "a1111.pt")
    assert token == TOKEN and torch.equal(loaded, vectors)


@pytest.mark.parametrize(
    ("token", "vector_width", "message"),
    [
        ("style2", 32, "must be letters only"),
        ("cat", 32, "already a word of the vocabulary"),
        ("newstyle", 64, "width 64 but the model's text encoder has width 32"),
    ],
)
def test_bad_embeddings_are_refused_in_one_line(tmp_path, token, vector_width, message):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(1, vector_width)}, str(path))
    with pytest.raises(ConversionError, match=message):
        convert_model(
            ConversionOptions(
                model="tiny", output=tmp_path / "out", embeddings=(f"{path}:{token}",), components=("TextEncoder",)
            )
        )
    assert not (tmp_path / "out").exists()
