"""`--mixed-bit-analysis OUT.json`: the model's Unet analysed (compression/mixed_bit.py), its recipes written in
Apple's format, and nothing converted."""
import os
from pathlib import Path

from ..compression.mixed_bit import analyse, to_text
from ..errors import ConversionError
from ..sources import resolve
from .options import ConversionOptions, check_options
from .run import load_adapters

CONVERSION_ONLY = (("--quantize-nbits", "quantize_nbits"), ("--quantize-recipe", "quantize_recipe"),
                   ("--quantize-bits", "quantize_bits"), ("--quantize-linear", "quantize_linear"),
                   ("--quantize-granularity", "quantize_granularity"), ("-o", "output"), ("--components", "components"),
                   ("--controlnet", "controlnets"), ("--bundle-resources", "bundle_resources"),
                   ("--chunk-unet", "chunk_unet"))


def write_mixed_bit_analysis(options: ConversionOptions, destination: Path) -> str:
    """Analyse the model's Unet and write the recipes to `destination`; the summary line."""
    given = [flag for flag, name in CONVERSION_ONLY if getattr(options, name) is not None
             and getattr(options, name) is not False and getattr(options, name) != ()]
    if given:
        raise ConversionError(f"--mixed-bit-analysis writes recipes and converts nothing: drop {given[0]} (then "
                              f"convert with --quantize-recipe {destination}:NAME, or analyse and convert in one "
                              "command with --quantize-bits AVERAGE)")
    if destination.is_dir() or not destination.parent.is_dir():
        raise ConversionError(f"--mixed-bit-analysis {destination}: give a file in an existing folder, e.g. "
                              "recipes.json")
    check_options(options)
    source = resolve(options.model, options.revision, options.model_type, options.prediction_type, options.config)
    source.adapters = load_adapters(options.loras, options.embeddings)
    contract = source.family.contract
    source.check_adapters([*contract.text_encoders, contract.unet])
    analysis = analyse(source, options.height, options.width)
    document = analysis.document()
    temporary = destination.with_name(f".partial-{destination.name}")
    try:
        temporary.write_text(to_text(document))
        os.replace(temporary, destination)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {destination} ({error.strerror or error}): choose another file") from None
    averages = [entry["average_bits"] for entry in document["analysis"]["recipes"].values()]
    return (f"{destination}: {len(averages)} recipes of {min(averages):.2f} to {max(averages):.2f} bits per weight "
            f"for the {len(analysis.sizes)} layers ({sum(analysis.sizes.values()) / 1e6:.1f}M parameters) of "
            f"{source.name}'s Unet, from {len(analysis.estimate.peaks)} recorded calls in {analysis.seconds:.0f} s; "
            f"convert with --quantize-recipe {destination}:NAME")
