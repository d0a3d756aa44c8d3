"""Smaller weights: palettes (palettize.py), mixed-bit recipes (recipe.py, made by analysis.py), linear int8/int4
(linear.py). What the command line offers is here, without the libraries."""
from dataclasses import dataclass

# the text encoders', Unets' and ControlNets' weights; the VAE's stay float16
QUANTIZED_KINDS = ("text_encoder", "unet", "controlled_unet", "controlnet")
NBITS_CHOICES = (1, 2, 4, 6, 8)  # what constexpr_lut_to_dense supports on macOS 13 / iOS 16
LINEAR_DTYPES = {"int8": 8, "int4": 4}
GROUPED = "per-grouped-channel"
DEFAULT_GROUP = 16  # coremltools' default group size

# The deployment targets a package can ask for, by iOS major version, with the macOS version of the same Core ML.
TARGETS = {16: 13, 17: 14, 18: 15}
BASE_TARGET = 16  # palettes of one table per weight, int8 per output channel
GROUPED_TARGET = 18  # palettes per group of output channels, int4, scales per block (constexpr_blockwise_*)


class CompressionArgumentError(ValueError):
    """An option value that cannot be parsed; the message is one line for the user."""


@dataclass(frozen=True)
class LinearQuantization:
    """Symmetric linear quantization: signed `bits`-bit integers times a float16 scale per output channel, or per
    block of `block` input channels (of a convolution: the block spans its kernel too)."""

    bits: int
    block: int | None = None

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"

    def minimum_target(self) -> int:
        return GROUPED_TARGET if self.bits < 8 or self.block else BASE_TARGET

    def settings(self) -> dict:
        return {"dtype": self.dtype, **({"block": self.block} if self.block else {})}


def positive_suffix(argument: str, option: str, usage: str) -> tuple[str, int | None]:
    head, _, tail = argument.partition(":")
    if not tail:
        return head, None
    if not tail.isdigit() or int(tail) == 0:
        raise CompressionArgumentError(f"{option} {argument}: {tail!r} is not a positive integer ({usage})")
    return head, int(tail)


def parse_linear(argument: str) -> LinearQuantization:
    """int8|int4[:BLOCK]."""
    usage = "int8 or int4, then :BLOCK for a scale per block of input channels, e.g. int4:32"
    dtype, block = positive_suffix(argument, "--quantize-linear", usage)
    if dtype not in LINEAR_DTYPES:
        raise CompressionArgumentError(f"--quantize-linear {argument}: {dtype!r} is not a supported type ({usage})")
    return LinearQuantization(LINEAR_DTYPES[dtype], block)


def parse_granularity(argument: str) -> int | None:
    """per-tensor | per-grouped-channel[:GROUP]: None, or the number of output channels sharing a palette."""
    usage = f"per-tensor, or {GROUPED}[:GROUP] for a palette per GROUP output channels (default {DEFAULT_GROUP})"
    name, group = positive_suffix(argument, "--quantize-granularity", usage)
    if name == "per-tensor" and group is None:
        return None
    if name != GROUPED:
        raise CompressionArgumentError(f"--quantize-granularity {argument} is not supported ({usage})")
    return group or DEFAULT_GROUP


def parse_target(argument: str) -> int:
    """iOS16..iOS18 or macOS13..macOS15: the iOS major version."""
    for ios, macos in TARGETS.items():
        if argument.lower() in (f"ios{ios}", f"macos{macos}"):
            return ios
    choices = ", ".join(f"iOS{ios} (macOS{macos})" for ios, macos in TARGETS.items())
    raise CompressionArgumentError(f"--min-target {argument} is not a deployment target: choose one of {choices}")


def target_name(ios: int) -> str:
    return f"iOS{ios} / macOS{TARGETS[ios]}"
