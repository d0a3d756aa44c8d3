"""The package contract's names and sizes: the files a package folder or Swift bundle holds.

The component names (`<Name>.mlpackage`, `.mlmodelc` in a Swift app's Resources/) and the tokenizer and manifest
files beside them, where ControlNets lie, the chunks a split Unet comes in, the names Apple's Python converter gives
its outputs, the functions of a multifunction Unet, the fixed sizes every package shares (77 tokens, 4 latent
channels, a VAE factor of 8) and the minimum OS versions the packages load on.
"""
from dataclasses import dataclass

TEXT_LENGTH = 77
LATENT_CHANNELS = 4
VAE_FACTOR = 8
CLIP_IMAGE_SIZE = 224  # the safety checker's CLIP input
SAFETY_CONCEPTS = 17  # diffusers' StableDiffusionSafetyChecker holds 17 concept embeddings


TOKENIZER_FILES = ("vocab.json", "merges.txt")  # beside the models, in package folders and Swift bundles
COMPILED_SUFFIX = ".mlmodelc"  # what the Swift package loads: a compiled model
PACKAGE_SUFFIX = ".mlpackage"
MODEL_SUFFIXES = (PACKAGE_SUFFIX, COMPILED_SUFFIX)  # in this order of preference: both backends run a .mlpackage
MANIFEST_FILE = "manifest.json"  # what coreml-convert writes beside the models
BUNDLE_FOLDER = "Resources"  # where a Swift app's (and the Diffusers app's) models lie

# The components, by the names their files have (<Name>.mlpackage / <Name>.mlmodelc).
TEXT_ENCODER = "TextEncoder"
TEXT_ENCODER_2 = "TextEncoder2"
UNET = "Unet"
UNET_REFINER = "UnetRefiner"  # the SDXL refiner's Unet, beside a base's
VAE_DECODER = "VAEDecoder"
VAE_ENCODER = "VAEEncoder"
SAFETY_CHECKER = "SafetyChecker"
CONTROLLED_UNET = "ControlledUnet"  # the Unet taking ControlNet residuals, beside the Unet (Apple's Swift package)
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_REFINER, VAE_DECODER, VAE_ENCODER, SAFETY_CHECKER,
              CONTROLLED_UNET)
# ControlNets: <CONTROLNET_FOLDER>/<Name>.mlpackage (.mlmodelc in Resources/), each a component named
# "controlnet/<Name>"; <Name> is Apple's bundler's (converter.controlnets.controlnet_name).
CONTROLNET_FOLDER = "controlnet"
CONTROLNET_PREFIX = CONTROLNET_FOLDER + "/"

# A Unet split in two for iPhones: <Name>Chunk1 and <Name>Chunk2 (Apple's names), run one after the other.
CHUNK_COUNT = 2
CHUNKED_COMPONENTS = (UNET, UNET_REFINER, CONTROLLED_UNET)


def chunk_names(component: str) -> tuple[str, ...]:
    """The packages a chunked component is installed as, in run order."""
    return tuple(f"{component}Chunk{index}" for index in range(1, CHUNK_COUNT + 1))


# Apple's Python converter (torch2coreml) names its outputs Stable_Diffusion_version_<model id>_<name>.mlpackage.
APPLE_CONVERTER_PREFIX = "Stable_Diffusion_version_"
APPLE_CONVERTER_NAMES = {
    "text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2, "unet": UNET, "refiner": UNET_REFINER,
    "vae_decoder": VAE_DECODER, "vae_encoder": VAE_ENCODER, "safety_checker": SAFETY_CHECKER,
    **{f"{python}_chunk{index}": chunk for python, name in (("unet", UNET), ("refiner", UNET_REFINER))
       for index, chunk in enumerate(chunk_names(name), start=1)},
}


@dataclass(frozen=True)
class MinimumOS:
    macos: str
    ios: str

    def __str__(self) -> str:
        return f"macOS {self.macos} / iOS {self.ios}"


# The packages' format: ML Programs of Core ML specification 7, with float16 inputs and palettes.
PACKAGE_MINIMUM_OS = MinimumOS(macos="13", ios="16")
# A multifunction model (several functions sharing one copy of the weights) loads from these versions on.
MULTIFUNCTION_MINIMUM_OS = MinimumOS(macos="15", ios="18")

# A multifunction Unet's (and ControlNet's) functions, one per Unet batch and prompt length: `main` takes the batch
# of guided sampling (2) and 77 tokens, as Apple's Swift package loads it; `unguided` takes batch 1; a prompt of k
# 77-token chunks runs `tokens_<77k>` / `unguided_tokens_<77k>`. A Unet package may also hold the ControlledUnet
# (--shared-controlled-unet): `controlled`, `controlled_tokens_<77k>`, the same weights stored once. The manifest
# lists each function's batch and chunks, and the component it computes when that is not the package's own.
MAIN_FUNCTION = "main"
UNGUIDED_FUNCTION = "unguided"
CONTROLLED_FUNCTION = "controlled"


def function_name(unguided: bool, prompt_chunks: int, controlled: bool = False) -> str:
    """The name of the function that takes batch 1 (`unguided`) or the guided batch, and `prompt_chunks` chunks;
    `controlled`: of the ControlledUnet held in the Unet's package."""
    tokens = f"tokens_{prompt_chunks * TEXT_LENGTH}" if prompt_chunks > 1 else ""
    prefix = UNGUIDED_FUNCTION if unguided else CONTROLLED_FUNCTION if controlled else ""
    if prefix:
        return f"{prefix}_{tokens}" if tokens else prefix
    return tokens or MAIN_FUNCTION
