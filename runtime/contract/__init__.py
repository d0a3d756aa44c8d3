"""The package contract, as data: the one home of what a package is.

These are the names and layouts of Apple's StableDiffusion Swift package, so that a Swift app can load the packages
as they are: the component names and their files, each component's inputs and outputs (names, shapes, dtypes), the
chunks a split Unet comes in, the tokenizer files, and per family which components generating needs and the settings
that apply when a package carries no manifest (Apple's published bundles). The same table gives each tensor the
description Xcode shows, the rule a chunked Unet's two packages follow, and the minimum OS versions.

The runtime reads it to find and run packages; the converter's families (`coreml_sd.converter.families`) extend it
with how each component is built; the bundle writer, the tests and packages/README.md read it from here. A new
component is a row here. Its parts:

- `names`: the fixed sizes, the files of a package folder or bundle, the component and chunk names, Apple's
  converter's names, a multifunction Unet's functions and the minimum OS versions;
- `tensors`: what each tensor is (the description Xcode shows), `TensorSpec` and `ComponentSpec`;
- `specs`: `ModelDimensions` and each component's spec built from it, and the rule a split Unet's chunks follow;
- `families`: `FamilyContract`, the default scheduler configurations and the SD, SDXL and refiner contracts.

Everything is imported from here (`from coreml_sd.runtime.contract import UNET`), not from the parts.
"""
from .families import (
    FAMILY_CONTRACTS,
    SD,
    SD_V1_SCHEDULER_CONFIG,
    SDXL,
    SDXL_REFINER,
    SDXL_SCHEDULER_CONFIG,
    FamilyContract,
)
from .names import (
    APPLE_CONVERTER_NAMES,
    APPLE_CONVERTER_PREFIX,
    BUNDLE_FOLDER,
    CHUNK_COUNT,
    CHUNKED_COMPONENTS,
    CLIP_IMAGE_SIZE,
    COMPILED_SUFFIX,
    COMPONENTS,
    CONTROLLED_FUNCTION,
    CONTROLLED_UNET,
    CONTROLNET_FOLDER,
    CONTROLNET_PREFIX,
    LATENT_CHANNELS,
    MAIN_FUNCTION,
    MANIFEST_FILE,
    MODEL_SUFFIXES,
    MULTIFUNCTION_MINIMUM_OS,
    PACKAGE_MINIMUM_OS,
    PACKAGE_SUFFIX,
    SAFETY_CHECKER,
    SAFETY_CONCEPTS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_LENGTH,
    TOKENIZER_FILES,
    UNET,
    UNET_REFINER,
    UNGUIDED_FUNCTION,
    VAE_DECODER,
    VAE_ENCODER,
    VAE_FACTOR,
    MinimumOS,
    chunk_names,
    function_name,
)
from .specs import (
    ModelDimensions,
    chunk_contract_problems,
    clip_skip_layer,
    controlled_unet_spec,
    controlnet_spec,
    hidden_output,
    residual_layout,
    residual_specs,
    safety_checker_spec,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from .tensors import (
    CHUNK_INTERMEDIATE,
    COMPONENT_SUMMARIES,
    DEEPER_HIDDEN_PREFIX,
    RESIDUAL_MEANING,
    RESIDUAL_PREFIX,
    TENSOR_MEANINGS,
    ComponentSpec,
    TensorSpec,
    tensor_meaning,
)

__all__ = [
    # names
    "APPLE_CONVERTER_NAMES", "APPLE_CONVERTER_PREFIX", "BUNDLE_FOLDER", "CHUNK_COUNT", "CHUNKED_COMPONENTS",
    "CLIP_IMAGE_SIZE", "COMPILED_SUFFIX", "COMPONENTS", "CONTROLLED_FUNCTION", "CONTROLLED_UNET", "CONTROLNET_FOLDER",
    "CONTROLNET_PREFIX", "LATENT_CHANNELS", "MAIN_FUNCTION", "MANIFEST_FILE", "MODEL_SUFFIXES",
    "MULTIFUNCTION_MINIMUM_OS", "PACKAGE_MINIMUM_OS", "PACKAGE_SUFFIX", "SAFETY_CHECKER", "SAFETY_CONCEPTS",
    "TEXT_ENCODER", "TEXT_ENCODER_2", "TEXT_LENGTH", "TOKENIZER_FILES", "UNET", "UNET_REFINER", "UNGUIDED_FUNCTION",
    "VAE_DECODER", "VAE_ENCODER", "VAE_FACTOR", "MinimumOS", "chunk_names", "function_name",
    # tensors
    "CHUNK_INTERMEDIATE", "COMPONENT_SUMMARIES", "DEEPER_HIDDEN_PREFIX", "RESIDUAL_MEANING", "RESIDUAL_PREFIX",
    "TENSOR_MEANINGS", "ComponentSpec", "TensorSpec", "tensor_meaning",
    # specs
    "ModelDimensions", "chunk_contract_problems", "clip_skip_layer", "controlled_unet_spec", "controlnet_spec",
    "hidden_output", "residual_layout", "residual_specs", "safety_checker_spec", "text_encoder_spec", "unet_spec",
    "vae_decoder_spec", "vae_encoder_spec",
    # families
    "FAMILY_CONTRACTS", "SD", "SD_V1_SCHEDULER_CONFIG", "SDXL", "SDXL_REFINER", "SDXL_SCHEDULER_CONFIG",
    "FamilyContract",
]
