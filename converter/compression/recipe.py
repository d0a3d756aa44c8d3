"""Mixed-bit palettization (`--quantize-recipe FILE.json[:NAME]`): each Unet layer palettized at its own size, as
Apple's ml-stable-diffusion recipes give them.

A recipe file is what Apple's mixed-bit pre-analysis writes: a JSON object whose `recipes` maps each recipe's name
to `{module name: bits}`, the names those of diffusers' `UNet2DConditionModel` modules (`named_modules()`), the
bits one of 1, 2, 4, 6, 8, or 16 for a layer left in float16; layers the recipe does not name stay float16 too, as
Apple's pre-analysis simulates them. The other keys of the file (measurements, baselines) are not read.

The converter's rewritten Unet (converter/ane/) holds the very Linear and Conv2d modules of diffusers' Unet under
other paths (`attentions.0.blocks.0.attn1`, `ff.proj_in` where diffusers has `attentions.0.transformer_blocks.0
.attn1`, `ff.net.0.proj`), so the recipe is applied to diffusers' Unet by its own names before the rewrite, and the
converted program then stores each weight in the palette size its distinct values need (palettize_program).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from . import NBITS_CHOICES
from .palettize import WEIGHT_THRESHOLD, palettize_layer

FLOAT16_BITS = 16
RECIPE_BITS = (*NBITS_CHOICES, FLOAT16_BITS)
BLOB_RECORD = BLOB_ALIGNMENT = 64
SHOWN_NAMES = 3  # of the modules a recipe names and the model lacks, in the refusal


class RecipeError(ConversionError):
    """A recipe file or name that cannot be applied; the message is one line for the user."""


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: dict[str, int]  # diffusers module name -> palette bits (16: float16)
    file_sha256: str
    origin: dict | None = None  # made by the mixed-bit analysis (mixed_bit.py): its file and target average

    def settings(self) -> dict:
        """What a package converted with the recipe depends on."""
        return {"file_sha256": self.file_sha256, "name": self.name}


def split_argument(argument: str) -> tuple[Path, str | None]:
    """FILE.json[:NAME] -> (file, name or None). A name follows the last colon when what precedes it is a file."""
    path, _, name = argument.rpartition(":")
    if path and name and Path(path).is_file():
        return Path(path), name
    return Path(argument), None


def read_recipe(argument: str) -> Recipe:
    file, name = split_argument(argument)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise RecipeError(f"cannot read the recipe file {file} ({error.strerror or error}): pass a recipe JSON "
                          "written by Apple's mixed-bit pre-analysis") from None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(f"{file} is not JSON ({error}): pass a recipe JSON written by Apple's mixed-bit "
                          "pre-analysis") from None
    recipes = document.get("recipes") if isinstance(document, dict) else None
    if not isinstance(recipes, dict) or not recipes or not all(isinstance(recipe, dict) for recipe in recipes.values()):
        raise RecipeError(f"{file} is not in Apple's recipe format: expected " + '{"recipes": {NAME: {MODULE: BITS, '
                          '...}, ...}, ...}, as Apple\'s mixed-bit pre-analysis writes it')
    if name is None:
        if len(recipes) > 1:
            raise RecipeError(f"{file} holds {len(recipes)} recipes: choose one with --quantize-recipe {file}:NAME, "
                              f"NAME one of {', '.join(recipes)}")
        name = next(iter(recipes))
    if name not in recipes:
        raise RecipeError(f"{file} has no recipe {name!r}: choose one of {', '.join(recipes)}")
    bits = recipes[name]
    wrong = {module: value for module, value in bits.items()
             if isinstance(value, bool) or not isinstance(value, int) or value not in RECIPE_BITS}
    if wrong:
        module, value = next(iter(wrong.items()))
        raise RecipeError(f"recipe {name!r} of {file} gives {module} {json.dumps(value)} bits ({len(wrong)} such "
                          f"layer(s)): bits must be one of {', '.join(map(str, RECIPE_BITS))} (16 = float16)")
    return Recipe(name, dict(bits), hashlib.sha256(data).hexdigest())


def recipe_layers(unet: torch.nn.Module, recipe: Recipe) -> dict[str, torch.nn.Module]:
    """The Linear and Conv2d layers of `unet` (diffusers' module tree, meta device or not) the recipe names; a recipe
    naming anything else is refused."""
    modules = dict(unet.named_modules())
    missing = [name for name in recipe.bits
               if not isinstance(modules.get(name), (torch.nn.Linear, torch.nn.Conv2d))]
    if missing:
        shown = ", ".join(missing[:SHOWN_NAMES]) + (", ..." if len(missing) > SHOWN_NAMES else "")
        raise RecipeError(f"recipe {recipe.name!r} names {len(missing)} layer(s) this model's Unet lacks ({shown}): "
                          "it was made for another architecture; make one for this model")
    return {name: modules[name] for name in recipe.bits}


def apply_recipe(unet: torch.nn.Module, recipe: Recipe) -> int:
    """Palettize, in place, each layer the recipe names at its bits (16: left as it is); the parameters palettized."""
    return sum(palettize_layer(layer, recipe.bits[name]) for name, layer in recipe_layers(unet, recipe).items()
               if recipe.bits[name] != FLOAT16_BITS)


def average_bits(unet: torch.nn.Module, recipe: Recipe) -> float:
    """The recipe's bits per weight over the layers it names, weighted by their sizes (as Apple reports it)."""
    layers = recipe_layers(unet, recipe)
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    return sum(sizes[name] * recipe.bits[name] for name in sizes) / max(sum(sizes.values()), 1)


def predicted_weight_bytes(unet: torch.nn.Module, recipe: Recipe) -> int:
    """The size of the weight file of the Unet's package converted with the recipe: each palettized weight as its
    bits per element plus a palette of 2^bits float16 values, every other parameter (and a weight too small to
    palettize) in float16; each such tensor stored as Core ML's weight file stores it."""
    layers = recipe_layers(unet, recipe)
    palettized = {id(layer.weight): recipe.bits[name] for name, layer in layers.items()
                  if recipe.bits[name] != FLOAT16_BITS and layer.weight.numel() > WEIGHT_THRESHOLD}
    total = 0
    for parameter in unet.parameters():
        nbits = palettized.get(id(parameter))
        if nbits is None:
            total += stored_bytes(2 * parameter.numel())
        else:
            total += stored_bytes(-(-parameter.numel() * nbits // 8)) + stored_bytes(2 * (1 << nbits))
    return total


def stored_bytes(size: int) -> int:
    """A tensor of `size` bytes in Core ML's weight file: a 64-byte record, then its data padded to 64 bytes (which
    matters for small models only: 0.7% of the tiny Unet's float16 weights)."""
    return BLOB_RECORD + -(-size // BLOB_ALIGNMENT) * BLOB_ALIGNMENT


def describe(unet: torch.nn.Module, recipe: Recipe) -> dict:
    """What the manifest records of a recipe applied to `unet`."""
    return {**recipe.settings(), "average_bits": round(average_bits(unet, recipe), 3),
            "predicted_weight_bytes": predicted_weight_bytes(unet, recipe), "bits": recipe.bits,
            **({"analysis": recipe.origin} if recipe.origin else {})}
