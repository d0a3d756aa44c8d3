"""Prompt to a text encoder's outputs: CLIP's tokenizer and one TextEncoder package.

`PromptEncoder.encode` reads AUTOMATIC1111's syntax (prompt_syntax.py), encodes the prompt in 77-token chunks
(prompt_chunks.py) and weights the hidden states (of the layer clip skip chooses, clip_skip.py) as the web UI
does: each token's vector times its weight, then the whole chunk rescaled to its mean before weighting.
"""
import logging
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from .backends import Model
from .clip_skip import ClipSkip
from .contract import TEXT_LENGTH
from .errors import GenerationError
from .prompt_chunks import CHUNK_LENGTH, COMMA_BACKTRACK, Chunk, prompt_chunks
from .prompt_syntax import parse_prompt

END_OF_TEXT = "<|endoftext|>"
logger = logging.getLogger("coreml_sd.runtime")


class PromptEncoder:
    """One tokenizer and text encoder. SD 1.x's (and SDXL's first) tokenizer pads with the end-of-text token,
    SD 2.x's and SDXL's second with "!" (as the tokenizer each model ships says)."""

    def __init__(self, vocab_file: Path, merges_file: Path, text_encoder: Model, pad_token: str = END_OF_TEXT,
                 embeddings: dict[str, list[str]] | None = None, layers: ClipSkip | None = None):
        try:
            self.tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TEXT_LENGTH,
                                           pad_token=pad_token)
        except Exception as error:  # the tokenizers library reports damaged files with its bare Exception
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GenerationError(f"cannot read the tokenizer files {vocab_file.name} and {merges_file.name} in "
                                  f"{vocab_file.parent} ({reason}): the package is damaged; convert again or copy it "
                                  "again") from None
        self.text_encoder = text_encoder
        self.layers = layers or ClipSkip(text_encoder)  # which output clip skip reads (default: SD's)
        # TOKEN -> its tokens, and its first token id -> the other tokens' ids (a k-vector embedding is k tokens)
        self.embeddings = {first: tokens for first, tokens in (embeddings or {}).items() if len(tokens) > 1}
        self.expansions = {self._token_id(first): [self._token_id(token) for token in rest]
                           for first, (_, *rest) in self.embeddings.items()}
        self.comma_id = self._token_id(",")

    def _token_id(self, word: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(word + "</w>")

    def token_ids(self, prompt: str) -> np.ndarray:
        """(1, 77) token ids; longer prompts lose their end, as in diffusers, with a warning saying how much."""
        full = self.tokenizer(prompt, verbose=False).input_ids
        if len(full) > TEXT_LENGTH:
            dropped = full[TEXT_LENGTH - 1 : -1]  # what falls between the kept tokens and the end-of-text token
            logger.warning(
                "the prompt is %d tokens long but CLIP reads %d; the last %d tokens were dropped (%r)",
                len(full), TEXT_LENGTH, len(dropped), self.tokenizer.decode(dropped),
            )
        return self.tokenizer(
            prompt, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="np"
        ).input_ids

    def __call__(self, prompt: str) -> dict[str, np.ndarray]:
        """The text encoder's outputs by their contract names: hidden states (1, 77, D) as `last_hidden_state`
        (SD) or `hidden_embeds` (SDXL), and `pooled_outputs` (1, P)."""
        ids = self.token_ids(prompt).astype(self.text_encoder.input_description["input_ids"][1])
        return self.text_encoder.predict({"input_ids": ids})

    def chunks(self, prompt: str, max_chunks: int = 1) -> list[Chunk]:
        """The prompt's weighted token chunks, at most `max_chunks`; what does not fit is dropped with a warning.
        With one chunk the prompt is cut after its first 75 tokens, as diffusers cuts it."""
        chunks = prompt_chunks(parse_prompt(prompt), self._tokenize, self.expansions, self.comma_id,
                               COMMA_BACKTRACK if max_chunks > 1 else 0)
        if len(chunks) > max_chunks:
            dropped = [token for chunk in chunks[max_chunks:] for token in chunk.ids]
            length = sum(len(chunk.ids) for chunk in chunks) + 2
            logger.warning("the prompt is %d tokens long but CLIP reads %d; the last %d tokens were dropped (%r); a "
                           "package converted with coreml-convert --max-prompt-chunks %d would keep them",
                           length, max_chunks * TEXT_LENGTH, len(dropped), self.tokenizer.decode(dropped), len(chunks))
        return chunks[:max_chunks]

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text else []

    def chunk_ids(self, chunk: Chunk) -> np.ndarray:
        """(1, 77): the start token, the chunk's tokens, the end token, then padding."""
        tokenizer = self.tokenizer
        padding = [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(chunk.ids))
        return np.array([[tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id, *padding]])

    def encode(self, chunks: list[Chunk], clip_skip: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The weighted hidden states of the chunks side by side (the layer `clip_skip` chooses; 1: the one the
        family conditions with), (1, 77 * chunks, D) in float32, and the text encoder's outputs for the first chunk
        (its pooled output is the prompt's)."""
        dtype = self.text_encoder.input_description["input_ids"][1]
        hidden, first = [], None
        for chunk in chunks:
            outputs = self.text_encoder.predict({"input_ids": self.chunk_ids(chunk).astype(dtype)})
            first = outputs if first is None else first
            hidden.append(weighted(self.layers.hidden(outputs, clip_skip), chunk.weights))
        return np.concatenate(hidden, axis=1), first


def weighted(hidden: np.ndarray, weights: list[float]) -> np.ndarray:
    """(1, 77, D) hidden states with each prompt token's vector times its weight (start, end and padding keep
    theirs), rescaled to the mean they had before."""
    if all(weight == 1.0 for weight in weights):
        return hidden
    factors = np.ones(hidden.shape[1], np.float32)
    factors[1 : 1 + len(weights)] = weights
    scaled = hidden * factors[None, :, None]
    return scaled * (hidden.mean() / scaled.mean())
