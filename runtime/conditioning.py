"""Prompt to the Unet's conditioning, one small piece per model family.

Each piece turns a prompt and a negative prompt into the Unet's conditioning inputs for classifier-free
guidance, keyed by the contract's names, row 0 unconditional and row 1 conditional, as diffusers' pipelines
condition: `TextConditioning` for SD 1/2, `XLConditioning` for SDXL base and refiner. Prompts are read in
AUTOMATIC1111's syntax and weighted as it weights them (prompt.py); a prompt and its negative prompt are
padded to the same number of 77-token chunks with the empty prompt's chunk, as the web UI pads them; a package
converted with --max-prompt-chunks K takes up to K chunks, the Unet's function for their count running them.
`conditioning_for(package, models)` picks the piece a package needs.
"""
from dataclasses import dataclass

import numpy as np

from . import contract
from .backends import Model
from .clip_skip import ClipSkip, EncoderRecord
from .contract import TEXT_ENCODER, TEXT_ENCODER_2
from .package import Package
from .prompt import END_OF_TEXT, PromptEncoder
from .prompt_chunks import Chunk

# diffusers' defaults for SDXL's micro-conditioning that has no image size in it.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, (height, width) pairs as diffusers takes them; None: the image's size."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE


def channels_first(hidden: np.ndarray) -> np.ndarray:
    """(B, 77 * chunks, D) → (B, D, 1, 77 * chunks), the layout the Unet takes."""
    return np.ascontiguousarray(hidden.transpose(0, 2, 1)[:, :, None, :])


def chunk_pairs(encoder: PromptEncoder, prompt: str, negative_prompt: str,
                max_chunks: int) -> tuple[list[Chunk], list[Chunk]]:
    """The prompt's and the negative prompt's chunks, the shorter list padded with the empty prompt's chunk."""
    chunks = [encoder.chunks(text, max_chunks) for text in (prompt, negative_prompt)]
    count = max(map(len, chunks))
    return tuple(found + [Chunk()] * (count - len(found)) for found in chunks)


class TextConditioning:
    """SD 1/2: the text encoder's last hidden states; the negative prompt (empty or not) is encoded too."""

    def __init__(self, encoder: PromptEncoder, max_chunks: int = 1):
        self.encoders = [encoder]
        self.max_chunks = max_chunks

    def __call__(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int],
                 clip_skip: int = 1) -> dict:
        encoder = self.encoders[0]
        positive, negative = chunk_pairs(encoder, prompt, negative_prompt, self.max_chunks)
        hidden = [encoder.encode(chunks, clip_skip)[0] for chunks in (negative, positive)]
        return {"encoder_hidden_states": channels_first(np.concatenate(hidden))}


class XLConditioning:
    """SDXL: each encoder's penultimate hidden states, concatenated along the channels; the last encoder's
    projected pooled output as `text_embeds`; and `time_ids`, original size + crop top-left + target size
    (6 numbers) or, for the refiner, + aesthetic score (5). With `force_zeros_for_empty_prompt` an empty
    negative prompt is zeros, not the encoded empty string."""

    def __init__(self, encoders: list[PromptEncoder], time_ids_length: int, force_zeros_for_empty_prompt: bool,
                 max_chunks: int = 1):
        self.encoders = encoders
        self.time_ids_length = time_ids_length
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.max_chunks = max_chunks

    def _encode(self, prompt: str, negative_prompt: str, clip_skip: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(hidden states, pooled output) of the prompt and of the negative prompt. The encoders tokenize alike
        (they differ in padding only), so both take the first encoder's chunks."""
        pairs = chunk_pairs(self.encoders[0], prompt, negative_prompt, self.max_chunks)
        encoded = []
        for chunks in pairs:
            outputs = [encoder.encode(chunks, clip_skip) for encoder in self.encoders]
            hidden = np.concatenate([hidden for hidden, _ in outputs], axis=-1)
            encoded.append((hidden, outputs[-1][1]["pooled_outputs"]))
        return encoded

    def time_ids(self, size: SizeConditioning, image_size: tuple[int, int], negative: bool) -> np.ndarray:
        original = size.original_size or image_size
        if self.time_ids_length == 5:
            last = (size.negative_aesthetic_score if negative else size.aesthetic_score,)
        else:
            last = size.target_size or image_size
        return np.array([[*original, *size.crop_top_left, *last]], dtype=np.float32)

    def __call__(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int],
                 clip_skip: int = 1) -> dict:
        (hidden, pooled), (negative_hidden, negative_pooled) = self._encode(prompt, negative_prompt, clip_skip)
        if not negative_prompt and self.force_zeros_for_empty_prompt:
            negative_hidden, negative_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
        return {
            "encoder_hidden_states": channels_first(np.concatenate([negative_hidden, hidden])),
            "time_ids": np.concatenate([self.time_ids(size, image_size, negative) for negative in (True, False)]),
            "text_embeds": np.concatenate([negative_pooled, pooled]),
        }


def conditioning_for(package: Package, models: dict[str, Model]):
    """The conditioning piece for a package's family, over its text encoder models."""
    def encoder(name: str, pad_token: str = END_OF_TEXT) -> PromptEncoder:
        record = package.text_encoder_records.get(name, EncoderRecord())
        layers = ClipSkip(models[name], name, package.contract.hidden_layer, record, f"package {package.name!r}")
        return PromptEncoder(package.vocab_file, package.merges_file, models[name], pad_token, package.embeddings,
                             layers)

    unet_inputs = models[package.unet_name].input_description
    max_chunks = package.max_prompt_chunks  # the Unet's functions take 1 ... K chunks (see backends.py)
    if package.family == contract.SD.name:
        return TextConditioning(encoder(TEXT_ENCODER, package.pad_token), max_chunks)  # SD 2.x pads with "!"
    # SDXL's second tokenizer pads with "!"; the refiner has only that encoder.
    encoders = [encoder(name, "!" if name == TEXT_ENCODER_2 else END_OF_TEXT)
                for name in package.contract.text_encoders]
    time_ids_length = unet_inputs["time_ids"][0][1]
    return XLConditioning(encoders, time_ids_length, package.force_zeros_for_empty_prompt, max_chunks)
