"""Clip skip: the prompt read from an earlier layer of the text encoder, as AUTOMATIC1111's "Clip skip" and
diffusers' `clip_skip` read it.

Clip skip N (1: the layer the family conditions with) reads transformers' `hidden_states` N - 1 layers earlier; a
TextEncoder package converted with `coreml-convert --clip-skip-layers K` holds those layers as further outputs for N
up to K (`contract.hidden_output` names them). SD 1.x/2.x condition with the last layer after the final layer norm,
so the earlier layer gets that norm too, as the web UI and diffusers apply it; the manifest's TextEncoder entry
records the norm (`final_layer_norm`) and the encoder's depth (`hidden_layers`). SDXL conditions with the
penultimate layer without the norm, and so does its clip skip (diffusers' `clip_skip` = N - 1 reads
`hidden_states[-(clip_skip + 2)]`).
"""
import base64
from dataclasses import dataclass

import numpy as np

from .contract import TEXT_ENCODER, clip_skip_layer, hidden_output
from .errors import GenerationError

FINAL_LAYER_NORM = "final_layer_norm"  # the manifest's TextEncoder entry: the norm's eps, weight and bias
HIDDEN_LAYERS = "hidden_layers"  # ... and the encoder's depth


def _encoded(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode("ascii")


def _decoded(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), "<f4").astype(np.float32)


@dataclass(frozen=True)
class FinalLayerNorm:
    """The text model's final layer norm, in NumPy: what clip skip applies to an earlier layer of SD's encoder."""

    weight: np.ndarray
    bias: np.ndarray
    eps: float

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        hidden = hidden.astype(np.float32)
        mean = hidden.mean(axis=-1, keepdims=True)
        variance = np.square(hidden - mean).mean(axis=-1, keepdims=True)
        return (hidden - mean) / np.sqrt(variance + self.eps) * self.weight + self.bias

    def to_manifest(self) -> dict:
        """The weights as base64 of little-endian float32: a few kilobytes on one line of the manifest."""
        return {"eps": self.eps, "weight": _encoded(self.weight), "bias": _encoded(self.bias)}

    @classmethod
    def from_manifest(cls, entry: dict) -> "FinalLayerNorm":
        norm = cls(_decoded(entry["weight"]), _decoded(entry["bias"]), float(entry["eps"]))
        if norm.weight.shape != norm.bias.shape:
            raise ValueError("weight and bias differ in length")
        return norm


def check_clip_skip(clip_skip: int) -> None:
    """The check that needs no package."""
    if clip_skip < 1:
        raise GenerationError(f"--clip-skip must be at least 1 (1: the last layer, as without it; 2: the "
                              f"penultimate), not {clip_skip}")


@dataclass(frozen=True)
class EncoderRecord:
    """What a manifest records of a TextEncoder package for clip skip (None: nothing, as in Apple's bundles)."""

    depth: int | None = None
    final_layer_norm: FinalLayerNorm | None = None

    @classmethod
    def from_manifest(cls, entry: dict) -> "EncoderRecord":
        norm = entry.get(FINAL_LAYER_NORM)
        depth = entry.get(HIDDEN_LAYERS)
        return cls(int(depth) if depth is not None else None,
                   FinalLayerNorm.from_manifest(norm) if norm is not None else None)


class ClipSkip:
    """One TextEncoder package's hidden states for clip skip N: the output of `model` that holds them, normed where
    the family's own conditioning is (`hidden_layer` -1)."""

    def __init__(self, model, component: str = TEXT_ENCODER, hidden_layer: int = -1,
                 record: EncoderRecord = EncoderRecord(), package: str = "the package"):
        """`package`: how messages name the package ("package 'name'")."""
        self.model, self.component, self.hidden_layer, self.record = model, component, hidden_layer, record
        self.package = package

    def deepest(self, outputs) -> int:
        """The deepest clip skip the package's `outputs` hold."""
        deepest = 1
        while hidden_output(clip_skip_layer(self.hidden_layer, deepest + 1)) in outputs:
            deepest += 1
        return deepest

    def output(self, clip_skip: int) -> str:
        """The output clip skip N reads; GenerationError when the encoder or the package has no such layer."""
        check_clip_skip(clip_skip)
        name = hidden_output(clip_skip_layer(self.hidden_layer, clip_skip))
        if clip_skip == 1:
            return name
        depth = self.record.depth
        if depth is not None and clip_skip > depth + self.hidden_layer + 1:
            raise GenerationError(f"--clip-skip {clip_skip} is past the text encoder's depth: the {self.component} of "
                                  f"{self.package} has {depth} layers, so clip skip goes up to "
                                  f"{depth + self.hidden_layer + 1}")
        outputs = self.model.output_description
        if name not in outputs:
            deepest = self.deepest(outputs)
            held = (f"holds the layers of clip skip up to {deepest}" if deepest > 1 else
                    "holds no layers for clip skip (converted before it, or by another converter)")
            raise GenerationError(f"--clip-skip {clip_skip}: the {self.component} of {self.package} {held}; convert "
                                  f"it again with coreml-convert --clip-skip-layers {clip_skip}")
        if self.hidden_layer == -1 and self.record.final_layer_norm is None:
            raise GenerationError(f"--clip-skip {clip_skip}: the manifest of {self.package} records no final layer "
                                  f"norm of its {self.component}, which clip skip applies; convert it again with "
                                  "coreml-convert")
        return name

    def hidden(self, outputs: dict[str, np.ndarray], clip_skip: int = 1) -> np.ndarray:
        """The hidden states (1, 77, D) of clip skip N from the encoder's outputs, in float32."""
        hidden = outputs[self.output(clip_skip)].astype(np.float32)
        if clip_skip > 1 and self.hidden_layer == -1:
            hidden = self.record.final_layer_norm(hidden)
        return hidden
