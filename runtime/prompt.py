"""Prompt to a text encoder's outputs: CLIP's tokenizer and one TextEncoder package."""
import logging
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from .backends import Model
from .contract import TEXT_LENGTH
from .errors import GenerationError

END_OF_TEXT = "<|endoftext|>"
logger = logging.getLogger("coreml_sd.runtime")


class PromptEncoder:
    """One tokenizer and text encoder. SD 1.x's (and SDXL's first) tokenizer pads with the end-of-text token,
    SD 2.x's and SDXL's second with "!" (as the tokenizer each model ships says)."""

    def __init__(self, vocab_file: Path, merges_file: Path, text_encoder: Model, pad_token: str = END_OF_TEXT):
        try:
            self.tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TEXT_LENGTH,
                                           pad_token=pad_token)
        except Exception as error:  # the tokenizers library reports damaged files with its bare Exception
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GenerationError(f"cannot read the tokenizer files {vocab_file.name} and {merges_file.name} in "
                                  f"{vocab_file.parent} ({reason}): the package is damaged; convert again or copy it "
                                  "again") from None
        self.text_encoder = text_encoder

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
