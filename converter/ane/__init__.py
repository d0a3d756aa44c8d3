"""The PyTorch modules traced for each package, rewritten for Apple's Neural Engine.

`component_module(parts, component, attention_implementation)` builds a new module that shares the
pipeline's weights (nothing of the pipeline is modified) and whose `forward` takes the component's
contract inputs (`coreml_sd.converter.families`) positionally and returns its outputs as a tuple.
Every tensor in them stays at rank <= 4, so Core ML never needs its slower rank-5 paths.
"""
from torch import nn

from coreml_sd.runtime.contract import clip_skip_layer

from ..families import Component
from .attention import IMPLEMENTATIONS, implementation_by_name
from .controlnet import ControlledUnet, ControlNet
from .safety_checker import SafetyChecker
from .text_encoder import TextEncoder
from .unet import Unet
from .vae import VAEDecoder, VAEEncoder

ATTENTION_IMPLEMENTATIONS = tuple(IMPLEMENTATIONS)  # the first is the Neural Engine default


def component_module(parts, component: Component, attention_implementation: str,
                     clip_skip_layers: int = 1) -> nn.Module:
    """The module to export for a family's `component`, built from its module in `parts` (a text encoder with the
    layers clip skip 2 to `clip_skip_layers` reads as further outputs)."""
    implementation = implementation_by_name(attention_implementation)
    module = getattr(parts, component.module)
    skipped = tuple(clip_skip_layer(component.hidden_layer, n) for n in range(2, clip_skip_layers + 1))
    builders = {
        "text_encoder": lambda: TextEncoder(module, component.hidden_layer, component.projected, skipped),
        "unet": lambda: Unet(module, implementation),
        "controlled_unet": lambda: ControlledUnet(module, implementation),
        "controlnet": lambda: ControlNet(module, implementation),
        "vae_decoder": lambda: VAEDecoder(module, implementation),
        "vae_encoder": lambda: VAEEncoder(module, implementation),
        "safety_checker": lambda: SafetyChecker(module),  # tokens-last whatever the attention
    }
    return builders[component.kind]().eval()
