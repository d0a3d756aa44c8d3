"""What a conversion is asked for: the command's options, the checks that need no model, the components and the
dimensions they imply. Converting one component depends only on `ComponentOptions`, the part of them it reads."""
import sys
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.runtime.contract import VAE_FACTOR, ModelDimensions

from ..ane import ATTENTION_IMPLEMENTATIONS
from ..compression import NBITS_CHOICES
from ..errors import ConversionError
from ..sources import ModelSource

RESOLUTION_STEP = 64


@dataclass(frozen=True)
class ComponentOptions:
    """The options that converting (and validating) one component reads."""

    attention_implementation: str = "split_einsum"
    quantize_nbits: int | None = None  # palettize the TextEncoder's and Unet's weights to this many bits
    chunk_unet: bool = False  # the Unet as two packages, UnetChunk1 and UnetChunk2 (see chunks.py)
    vae_swapped: bool = False  # --vae: a VAE made for float16 in place of the model's own
    validate: bool = True
    validation_seed: int = 0
    verbose: bool = False  # show coremltools' own progress bars


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
    components: tuple[str, ...] | None = None  # None: the model family's default components
    attention_implementation: str = "split_einsum"
    height: int | None = None
    width: int | None = None
    unet_batch_size: int = 2
    quantize_nbits: int | None = None  # palettize the TextEncoder's and Unet's weights to this many bits
    safety_checker: str | None = None  # the SafetyChecker from this folder or id instead of the model's own
    vae: str | None = None  # another VAE (folder or Hugging Face id) in place of the model's own
    force: bool = False
    validate: bool = True
    validation_seed: int = 0
    chunk_unet: bool = False  # the Unet as two packages, UnetChunk1 and UnetChunk2 (see chunks.py)
    bundle_resources: bool = False  # also write Resources/ as the Swift package loads it (see bundle.py)
    verbose: bool = False  # show coremltools' own progress bars

    def component_options(self) -> ComponentOptions:
        return ComponentOptions(self.attention_implementation, self.quantize_nbits, self.chunk_unet, bool(self.vae),
                                self.validate, self.validation_seed, self.verbose)


def check_options(options: ConversionOptions) -> None:
    """The checks that need no model, so that bad options fail before anything loads."""
    if options.components is not None and not options.components:
        raise ConversionError("no components given: pass --components with at least one")
    if options.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConversionError(f"unknown attention implementation {options.attention_implementation!r}: choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    for side in ("height", "width"):
        value = getattr(options, side)
        if value is not None and (value <= 0 or value % RESOLUTION_STEP):
            raise ConversionError(f"--{side} {value} is not a positive multiple of {RESOLUTION_STEP}")
    if options.unet_batch_size not in (1, 2):
        raise ConversionError(f"--unet-batch-size must be 1 or 2 (got {options.unet_batch_size})")
    if options.quantize_nbits is not None and options.quantize_nbits not in NBITS_CHOICES:
        raise ConversionError(f"--quantize-nbits must be one of {', '.join(map(str, NBITS_CHOICES))} (got {options.quantize_nbits})")


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
        raise ConversionError(f"{source.name} holds no weights for {', '.join(absent)}: leave {'it' if len(absent) == 1 else 'them'} "
                              "out of --components")
    return requested


def model_dimensions(source: ModelSource, height: int | None, width: int | None, unet_batch_size: int) -> ModelDimensions:
    """The package's dimensions: the asked size or the model's own, and the Unet's batch."""
    default = source.sample_size * VAE_FACTOR
    return ModelDimensions(height=height or default, width=width or default, unet_batch_size=unet_batch_size,
                           **source.conditioning)
