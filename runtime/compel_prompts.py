"""`--prompt-syntax compel`: prompts read and weighted by the compel library (`word++`, `(word)1.3`,
`("a", "b").blend(0.7, 0.3)`, `.and()`), given the package's text encoders behind the small interface compel
calls on transformers' CLIP models.

Compel lowers a weight below 1 by blending with the prompt's embedding without the words; a package's text
encoder has no attention-mask input, so the words are removed from the tokens (compel's REMOVE mode) rather
than masked out (its default MASK mode). SDXL: both encoders' penultimate hidden states and the second's
pooled output, as compel's SDXL recipe asks; an empty negative prompt is zeros where the model says so. With
clip skip, the layer clip skip chooses stands in for the one compel reads (compel's own clip skip, its
PENULTIMATE_HIDDEN_STATES_NORMALIZED, is clip skip 2 of SD: the penultimate layer through the final layer norm). A
textual-inversion embedding's name typed once is written out as all its tokens, in brackets, before compel
reads the prompt.
"""
import re
from types import SimpleNamespace

import numpy as np
import torch

from .conditioning import SizeConditioning, TextConditioning, XLConditioning, channels_first
from .errors import GenerationError
from .prompt import TEXT_LENGTH, PromptEncoder


class CompelTextEncoder:
    """One TextEncoder package as compel calls transformers' CLIPTextModel(WithProjection): token ids in, the
    hidden states of clip skip N as `last_hidden_state` (SD) or `hidden_states[-2]` (SDXL's `hidden_embeds`),
    and the pooled `text_embeds` out."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, encoder: PromptEncoder, xl: bool, clip_skip: int):
        self.model = encoder.text_encoder
        self.layers, self.xl, self.clip_skip = encoder.layers, xl, clip_skip

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 output_hidden_states: bool = False, return_dict: bool = True) -> SimpleNamespace:
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise GenerationError("compel asked to mask tokens, which a Core ML text encoder cannot; this is a bug")
        dtype = self.model.input_description["input_ids"][1]
        outputs = [self.model.predict({"input_ids": row[None].numpy().astype(dtype)}) for row in input_ids]
        hidden = torch.from_numpy(np.concatenate([self.layers.hidden(output, self.clip_skip) for output in outputs]))
        result = SimpleNamespace(text_embeds=torch.from_numpy(
            np.concatenate([output["pooled_outputs"] for output in outputs]).astype(np.float32)))
        if self.xl:
            result.hidden_states = (hidden, None)  # [-2]: the penultimate layer, or clip skip's
        else:
            result.last_hidden_state = hidden
        return result


def _compel_module():
    try:
        import compel
    except ImportError:
        raise GenerationError("--prompt-syntax compel needs the compel library: pip install 'coreml-sd[compel]'") \
            from None
    return compel


class CompelConditioning:
    """The Unet's conditioning from prompts in compel's syntax, for the encoders of an SD or SDXL conditioning, at
    one clip skip."""

    def __init__(self, base: TextConditioning | XLConditioning, clip_skip: int = 1):
        compel = _compel_module()
        self.base = base
        xl = isinstance(base, XLConditioning)
        encoders = base.encoders
        tokenizers = [encoder.tokenizer for encoder in encoders]
        text_encoders = [CompelTextEncoder(encoder, xl, clip_skip) for encoder in encoders]
        options = {
            "tokenizer": tokenizers if xl else tokenizers[0],
            "text_encoder": text_encoders if xl else text_encoders[0],
            "downweight_mode": compel.DownweightMode.REMOVE,
            "truncate_long_prompts": True,
        }
        if xl:
            options.update(returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                           requires_pooled=[False] * (len(encoders) - 1) + [True])
        self.compel = compel.Compel(**options)
        self.embeddings = encoders[0].embeddings
        from compel.prompt_parser import PromptParser

        self.errors = (PromptParser.ParsingException, ValueError)

    def _written_out(self, prompt: str) -> str:
        for first, (_, *rest) in self.embeddings.items():
            # in brackets, so that a weight after the name (`name++`) weighs all of its tokens
            prompt = re.sub(rf"\b{first}\b(?!\s+{rest[0]}\b)", f"({' '.join([first, *rest])})", prompt,
                            flags=re.IGNORECASE)
        return prompt

    def _encode(self, prompt: str, which: str) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            encoded = self.compel(self._written_out(prompt))
        except self.errors as error:
            raise GenerationError(f"the {which} is not a valid compel expression ({error}); correct it, or write it "
                                  "in AUTOMATIC1111's syntax without --prompt-syntax compel") from None
        hidden, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
        if hidden.shape[1] != TEXT_LENGTH:
            raise GenerationError(f"the {which} makes {hidden.shape[1]} tokens of conditioning (.and() joins "
                                  f"prompts side by side); this package's Unet reads {TEXT_LENGTH}")
        return hidden.numpy(), None if pooled is None else pooled.numpy()

    def __call__(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int]) -> dict:
        hidden, pooled = self._encode(prompt, "prompt")
        negative_hidden, negative_pooled = self._encode(negative_prompt, "negative prompt")
        inputs = {"encoder_hidden_states": None}
        if isinstance(self.base, XLConditioning):
            if not negative_prompt and self.base.force_zeros_for_empty_prompt:
                negative_hidden, negative_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
            inputs["time_ids"] = np.concatenate([self.base.time_ids(size, image_size, negative)
                                                 for negative in (True, False)])
            inputs["text_embeds"] = np.concatenate([negative_pooled, pooled])
        inputs["encoder_hidden_states"] = channels_first(np.concatenate([negative_hidden, hidden]))
        return inputs
