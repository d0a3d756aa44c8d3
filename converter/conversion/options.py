"""What a conversion is asked for: the command's options, the checks that need no model, the components and the
dimensions they imply. Converting one component depends only on `ComponentOptions`, the part of them it reads."""
import sys
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.runtime.contract import MULTIFUNCTION_MINIMUM_OS, VAE_FACTOR, ModelDimensions

from ..ane import ATTENTION_IMPLEMENTATIONS
from ..compression import (
    BASE_TARGET,
    GROUPED_TARGET,
    NBITS_CHOICES,
    CompressionArgumentError,
    LinearQuantization,
    parse_granularity,
    parse_linear,
    parse_target,
    target_name,
)
from ..compression.mixed_bit import parse_bits
from ..compression.recipe import Recipe, read_recipe
from ..errors import ConversionError
from ..sources import ModelSource

RESOLUTION_STEP = 64
MULTIFUNCTION_TARGET = int(MULTIFUNCTION_MINIMUM_OS.ios)


@dataclass(frozen=True)
class ComponentOptions:
    """The options that converting (and validating) one component reads."""

    attention_implementation: str = "split_einsum"
    quantize_nbits: int | None = None  # palettize the TextEncoder's and Unet's weights to this many bits
    chunk_unet: bool = False  # the Unet as two packages, UnetChunk1 and UnetChunk2 (see chunks.py)
    quantize_recipe: Recipe | None = None  # palettize the Unet's layers each at its own bits
    quantize_bits: float | None = None  # the Unet's recipe from the mixed-bit analysis, at this average
    quantize_group: int | None = None  # with quantize_nbits: a palette per this many output channels
    quantize_linear: LinearQuantization | None = None  # int8/int4 weights instead of palettes
    min_target: int = BASE_TARGET  # the packages' minimum deployment target asked for (iOS major version)
    vae_swapped: bool = False  # --vae: a VAE made for float16 in place of the model's own
    validate: bool = True
    validation_seed: int = 0
    verbose: bool = False  # show coremltools' own progress bars
    unguided_function: bool = False  # the Unet also as a batch-1 function `unguided` (see multifunction.py)
    max_prompt_chunks: int = 1  # the Unet and ControlNets also take 2..K 77-token chunks (see multifunction.py)
    shared_controlled_unet: bool = False  # the ControlledUnet as functions of the Unet's package (multifunction.py)


@dataclass
class ConversionOptions:
    model: str
    output: Path | None = None
    revision: str | None = None
    model_type: str | None = None  # single files: what the checkpoint is (default: inferred from its tensors)
    prediction_type: str | None = None  # single files: epsilon or v_prediction (default: the checkpoint's hints)
    config: Path | None = None  # single files: a diffusers folder whose configs to use instead of the shipped ones
    loras: tuple[str, ...] = ()  # PATH[:SCALE], merged into the Unet and text encoder
    embeddings: tuple[str, ...] = ()  # PATH[:TOKEN], textual-inversion embeddings
    controlnets: tuple[str, ...] = ()  # folders or Hugging Face ids: controlnet/<Name> packages and a ControlledUnet
    shared_controlled_unet: bool = False  # the ControlledUnet as functions of the Unet's package (multifunction.py)
    components: tuple[str, ...] | None = None  # None: the model family's default components
    attention_implementation: str = "split_einsum"
    height: int | None = None
    width: int | None = None
    unet_batch_size: int | None = None  # None: 1 for a model recommended without guidance (Turbo), else 2
    recommend: tuple[str, ...] = ()  # NAME=VALUE: sampling settings to record, over the model's own
    unguided_function: bool = False  # the Unet also as a batch-1 function `unguided` (see multifunction.py)
    max_prompt_chunks: int = 1  # the Unet and ControlNets also take 2..K 77-token chunks (see multifunction.py)
    guidance_embedding: bool = False  # an LCM Unet's guidance embedding as the input `timestep_cond`
    clip_skip_layers: int | None = None  # the deepest clip skip the TextEncoder holds the layers of (default: 2)
    quantize_nbits: int | None = None  # palettize the TextEncoder's and Unet's weights to this many bits
    quantize_recipe: str | None = None  # FILE.json[:NAME]: an Apple mixed-bit recipe for the Unet's layers
    quantize_bits: float | None = None  # a recipe at this average bits per weight from the mixed-bit analysis
    quantize_granularity: str | None = None  # per-tensor | per-grouped-channel[:GROUP], with quantize_nbits
    quantize_linear: str | None = None  # int8|int4[:BLOCK]: linear quantization instead of palettes
    min_target: str | None = None  # iOS16..iOS18 / macOS13..macOS15 (default: the lowest the compression allows)
    safety_checker: str | None = None  # the SafetyChecker from this folder or id instead of the model's own
    vae: str | None = None  # another VAE (folder or Hugging Face id) in place of the model's own
    force: bool = False
    validate: bool = True
    validation_seed: int = 0
    chunk_unet: bool = False  # the Unet as two packages, UnetChunk1 and UnetChunk2 (see chunks.py)
    bundle_resources: bool = False  # also write Resources/ as the Swift package loads it (see bundle.py)
    verbose: bool = False  # show coremltools' own progress bars

    def component_options(self) -> ComponentOptions:
        recipe = read_recipe(self.quantize_recipe) if self.quantize_recipe else None
        group, linear, target = compression_modes(self)
        return ComponentOptions(
            attention_implementation=self.attention_implementation, quantize_nbits=self.quantize_nbits,
            chunk_unet=self.chunk_unet, quantize_recipe=recipe, quantize_bits=self.quantize_bits, quantize_group=group,
            quantize_linear=linear,
            min_target=target, vae_swapped=bool(self.vae), validate=self.validate,
            validation_seed=self.validation_seed, verbose=self.verbose, unguided_function=self.unguided_function,
            max_prompt_chunks=self.max_prompt_chunks, shared_controlled_unet=self.shared_controlled_unet)


def compression_modes(options: ConversionOptions) -> tuple[int | None, LinearQuantization | None, int]:
    """The palettes' group, the linear quantization and the minimum deployment target the options ask for, which
    must be at least what the compression needs (the compressed components' packages are raised to that anyway)."""
    try:
        group = parse_granularity(options.quantize_granularity) if options.quantize_granularity else None
        linear = parse_linear(options.quantize_linear) if options.quantize_linear else None
        asked = parse_target(options.min_target) if options.min_target else None
    except CompressionArgumentError as error:
        raise ConversionError(str(error)) from None
    if group and options.quantize_nbits is None:
        raise ConversionError("--quantize-granularity sets how --quantize-nbits palettes are shared: pass "
                              "--quantize-nbits too")
    if linear and (options.quantize_nbits is not None or options.quantize_recipe or options.quantize_bits):
        raise ConversionError("--quantize-linear stores integers and scales, --quantize-nbits, --quantize-recipe and "
                              "--quantize-bits palettes: pass one of them")
    needs = [(GROUPED_TARGET, f"--quantize-granularity {options.quantize_granularity}")] if group else []
    if options.max_prompt_chunks > 1:
        needs.append((MULTIFUNCTION_TARGET, f"--max-prompt-chunks {options.max_prompt_chunks} (a multifunction Unet)"))
    if options.unguided_function:
        needs.append((MULTIFUNCTION_TARGET, "--unguided-function (a multifunction Unet)"))
    if options.shared_controlled_unet:
        needs.append((MULTIFUNCTION_TARGET, "--shared-controlled-unet (a multifunction Unet)"))
    if linear and linear.minimum_target() > BASE_TARGET:
        needs.append((linear.minimum_target(), f"--quantize-linear {options.quantize_linear}"))
    required, reason = max(needs, default=(BASE_TARGET, ""))
    if asked is not None and asked < required:
        raise ConversionError(f"--min-target {options.min_target} is lower than {reason} needs "
                              f"({target_name(required)}): raise --min-target to iOS{required} or leave it out")
    return group, linear, asked or BASE_TARGET


def check_options(options: ConversionOptions) -> None:
    """The checks that need no model, so that bad options fail before anything loads."""
    if options.components is not None and not options.components:
        raise ConversionError("no components given: pass --components with at least one")
    if options.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConversionError(f"unknown attention implementation {options.attention_implementation!r}: choose from "
                              f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    for side in ("height", "width"):
        value = getattr(options, side)
        if value is not None and (value <= 0 or value % RESOLUTION_STEP):
            raise ConversionError(f"--{side} {value} is not a positive multiple of {RESOLUTION_STEP}")
    if options.unet_batch_size not in (None, 1, 2):
        raise ConversionError(f"--unet-batch-size must be 1 or 2 (got {options.unet_batch_size})")
    if options.max_prompt_chunks < 1:
        raise ConversionError(f"--max-prompt-chunks must be at least 1 (got {options.max_prompt_chunks}): 1 is "
                              "77 tokens, each more another 77")
    if options.shared_controlled_unet and not options.controlnets:
        raise ConversionError("--shared-controlled-unet stores the ControlledUnet that ControlNets need in the Unet's "
                              "package: pass --controlnet ID_OR_PATH too, or drop it")
    if options.shared_controlled_unet and options.bundle_resources:
        raise ConversionError("--bundle-resources writes Apple's layout, whose Swift package loads "
                              "ControlledUnet.mlmodelc by its file name: drop --shared-controlled-unet for a Swift "
                              "bundle (apps that load function 'controlled' of the Unet by name use the package as is)")
    multifunction = [flag for flag, given in (("--unguided-function", options.unguided_function),
                                              ("--max-prompt-chunks", options.max_prompt_chunks > 1),
                                              ("--shared-controlled-unet", options.shared_controlled_unet)) if given]
    if multifunction and options.chunk_unet:
        raise ConversionError(f"{multifunction[0]} adds functions to a Unet in one package: drop --chunk-unet")
    if options.unguided_function and options.unet_batch_size == 1:
        raise ConversionError("--unguided-function adds a batch-1 function to a batch-2 Unet in one package: drop "
                              "--unet-batch-size 1")
    per_layer = [flag for flag, given in (("--quantize-recipe", options.quantize_recipe),
                                          ("--quantize-bits", options.quantize_bits is not None),
                                          ("--quantize-granularity", options.quantize_granularity),
                                          ("--quantize-linear", options.quantize_linear)) if given]
    if multifunction and per_layer:
        # further functions are converted with uniform palettes only: their weights would not be the main function's
        raise ConversionError(f"{multifunction[0]} cannot be combined with {per_layer[0]} yet: drop one of them")
    if options.quantize_nbits is not None and options.quantize_nbits not in NBITS_CHOICES:
        raise ConversionError(f"--quantize-nbits must be one of {', '.join(map(str, NBITS_CHOICES))} (got "
                              f"{options.quantize_nbits})")
    if options.quantize_recipe:
        if options.quantize_nbits is not None:
            raise ConversionError("--quantize-recipe gives each layer its bits, --quantize-nbits all of them the same: "
                                  "pass one of the two")
        read_recipe(options.quantize_recipe)
    if options.quantize_bits is not None:
        other = "--quantize-nbits" if options.quantize_nbits is not None else \
            "--quantize-recipe" if options.quantize_recipe else None
        if other:
            raise ConversionError(f"--quantize-bits makes the recipe that {other} would give: pass one of the two")
        try:
            parse_bits(options.quantize_bits)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    compression_modes(options)


def chosen_components(source: ModelSource, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The components asked for, or the family's defaults that the source holds weights for."""
    family = source.family
    if requested is None:
        present = tuple(c for c in family.default_components if family.component(c).module not in source.absent_modules)
        for component in sorted(set(family.default_components) - set(present)):
            print(f"{component:<11} left out: {source.name} holds no {family.component(component).module} weights",
                  file=sys.stderr)
        if not present:
            raise ConversionError(f"{source.name} holds none of the weights of {', '.join(family.default_components)}")
        return present
    unknown = [c for c in requested if c not in family.components]
    if unknown:
        raise ConversionError(f"unknown component(s) {', '.join(unknown)} for {family.description}: "
                              f"choose from {', '.join(family.components)}")
    absent = [c for c in requested if family.component(c).module in source.absent_modules]
    if absent:
        raise ConversionError(f"{source.name} holds no weights for {', '.join(absent)}: leave "
                              f"{'it' if len(absent) == 1 else 'them'} out of --components")
    return requested


def model_dimensions(source: ModelSource, height: int | None, width: int | None, unet_batch_size: int | None,
                     unguided: bool = False) -> ModelDimensions:
    """The package's dimensions: the asked size or the model's own, and the Unet's batch (without one asked, 1
    for a model that samples `unguided`, else 2)."""
    default = source.sample_size * VAE_FACTOR
    if unet_batch_size is None and unguided:
        print(f"{'Unet':<11} batch 1: the model samples without guidance (--unet-batch-size 2 for guided sampling)",
              file=sys.stderr)
    return ModelDimensions(height=height or default, width=width or default,
                           unet_batch_size=unet_batch_size or (1 if unguided else 2),
                           **source.conditioning)


def check_guidance_embedding(source: ModelSource, asked: bool) -> None:
    """An LCM Unet's guidance embedding becomes an input only when asked: Apple's Swift package does not feed it."""
    has_one = bool(source.conditioning.get("guidance_embedding_width"))
    if has_one and not asked:
        raise ConversionError(f"{source.name}'s Unet takes LCM's guidance embedding (time_cond_proj_dim): pass "
                              "--guidance-embedding to convert it as the input timestep_cond (coreml-generate feeds "
                              "it; Apple's Swift package does not)")
    if asked and not has_one:
        raise ConversionError(f"--guidance-embedding: {source.name}'s Unet takes no guidance embedding (it has no "
                              "time_cond_proj_dim); drop the option")
