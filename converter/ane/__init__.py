"""The PyTorch modules traced for each package, rewritten for Apple's Neural Engine.

`component_module(pipeline, component, attention_implementation)` builds a new module that shares the
pipeline's weights (nothing of the pipeline is modified) and whose `forward` takes the component's
contract inputs (`coreml_sd.converter.components`) positionally and returns its outputs as a tuple.
Every tensor in them stays at rank <= 4, so Core ML never needs its slower rank-5 paths.
"""
from torch import nn

from .attention import IMPLEMENTATIONS, implementation_by_name
from .text_encoder import TextEncoder
from .unet import Unet
from .vae import VAEDecoder, VAEEncoder

ATTENTION_IMPLEMENTATIONS = tuple(IMPLEMENTATIONS)  # the first is the Neural Engine default


def component_module(pipeline, component: str, attention_implementation: str) -> nn.Module:
    """The module to export for `component` ("TextEncoder", "Unet", "VAEDecoder" or "VAEEncoder")."""
    implementation = implementation_by_name(attention_implementation)
    builders = {
        "TextEncoder": lambda: TextEncoder(pipeline.text_encoder),
        "Unet": lambda: Unet(pipeline.unet, implementation),
        "VAEDecoder": lambda: VAEDecoder(pipeline.vae, implementation),
        "VAEEncoder": lambda: VAEEncoder(pipeline.vae, implementation),
    }
    if component not in builders:
        raise ValueError(f"unknown component {component!r}; choose from {', '.join(builders)}")
    return builders[component]().eval()
