"""`--clip-skip-layers K`: the layers clip skip 2 to K reads, as further outputs of each TextEncoder package, and
what the runtime needs beside them (coreml_sd.runtime.clip_skip): the encoder's depth and, where the family
conditions with the normed last layer (SD), the final layer norm, recorded in the manifest."""
from torch import nn

from coreml_sd.runtime.clip_skip import FINAL_LAYER_NORM, HIDDEN_LAYERS, FinalLayerNorm

from ..errors import ConversionError
from ..families import Component
from ..sources import ModelSource

# Clip skip 2 (the penultimate layer) is what anime-style fine-tunes are made for; the web UI goes up to 12.
DEFAULT_CLIP_SKIP_LAYERS = 2


def deepest_clip_skip(component: Component, depth: int) -> int:
    """The deepest clip skip an encoder of `depth` layers has: down to its first layer's output."""
    return depth + component.hidden_layer + 1


def clip_skip_layers(source: ModelSource, components: tuple[str, ...], asked: int | None) -> int:
    """The clip skip depth the packages get: as asked, which the text encoders must be deep enough for, or by
    default 2 (where each encoder is that deep)."""
    if asked is not None and asked < 1:
        raise ConversionError(f"--clip-skip-layers must be at least 1 (1: no layers beyond the family's own), not "
                              f"{asked}")
    deepest = {}
    for name in components:
        component = source.family.component(name)
        if component.kind == "text_encoder" and component.module not in source.absent_modules:
            depth = source.reader.empty(component.module).config.num_hidden_layers
            deepest[name] = (deepest_clip_skip(component, depth), depth)
    if asked is None:
        return min([DEFAULT_CLIP_SKIP_LAYERS, *(most for most, _ in deepest.values())])
    for name, (most, depth) in deepest.items():
        if asked > most:
            raise ConversionError(f"--clip-skip-layers {asked} is past the text encoder's depth: {name} has {depth} "
                                  f"layers, so clip skip goes up to {most}")
    return asked


def text_encoder_record(text_encoder: nn.Module, component: Component, clip_skip_layers: int) -> dict:
    """The TextEncoder's manifest fields for clip skip: its depth, and its final layer norm where clip skip applies
    it (the family conditions with the normed last layer)."""
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests it
    record = {HIDDEN_LAYERS: len(text_model.encoder.layers)}
    if component.hidden_layer == -1 and clip_skip_layers > 1:
        norm = text_model.final_layer_norm
        record[FINAL_LAYER_NORM] = FinalLayerNorm(norm.weight.detach().float().numpy(),
                                                  norm.bias.detach().float().numpy(), float(norm.eps)).to_manifest()
    return record
