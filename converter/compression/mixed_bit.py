"""Recipes made from a model's own sensitivity (`--mixed-bit-analysis OUT.json`, `--quantize-bits AVERAGE`), in the
format of Apple's mixed-bit pre-analysis, so that `--quantize-recipe OUT.json:NAME` (and Apple's own
mixed_bit_compression_apply) read them.

The file holds what Apple's holds where it means the same: `model_version`; `recipes`, name -> {diffusers Unet module
name: bits}, named after their average bits per weight as Apple names them (recipe_4.48_bit_mixedpalette), here for
every palettizable layer (Linear and Conv2d weights of over 2048 elements); and `single_layer`, per bit width
each layer's PSNR per prompt when it alone is palettized, where Apple measures the final latents and this analysis
estimates the Unet's output (analysis.py). Apple's `cumulative` and `baselines` are pipeline runs this analysis does
not make; its own figures are under `analysis`."""
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass

import torch

from ..sources import ModelSource
from . import NBITS_CHOICES
from .analysis import Estimate, build_recipe, estimate_errors, palettizable_layers
from .recipe import FLOAT16_BITS, Recipe
from .unet_inputs import PROMPTS, STEPS, record_unet_calls

AVERAGES = tuple(step / 2 for step in range(5, 14))  # 2.5, 3, ... 6.5 bits per weight
PROBES = 1  # random probes per recorded call
ANALYSIS_FILE = "mixed_bit_recipes.json"  # what --quantize-bits writes into the package folder
MINIMUM_BITS, MAXIMUM_BITS = 1.0, float(FLOAT16_BITS)
PROGRESS_LINES = 10  # per stage


def recipe_name(average: float) -> str:
    return f"recipe_{average:.2f}_bit_mixedpalette"


def parse_bits(argument: float) -> float:
    """--quantize-bits: an average within what the recipes' bits allow."""
    if not MINIMUM_BITS <= argument <= MAXIMUM_BITS or math.isnan(argument):
        raise ValueError(f"--quantize-bits {argument:g} is outside {MINIMUM_BITS:g} to {MAXIMUM_BITS:g}: give the "
                         "average bits per weight, e.g. 4.5")
    return argument


def progress_printer(label: str):
    start = time.perf_counter()

    def show(what: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // PROGRESS_LINES) == 0:
            print(f"{label:<11} {what} {done}/{total} {time.perf_counter() - start:6.1f} s", file=sys.stderr,
                  flush=True)
    return show


def _psnr(peak: float, energy: float, size: int) -> float:
    """As runtime.executor.psnr: 20 log10((peak + 1e-5) / (rmse + 1e-10))."""
    return 20 * math.log10((peak + 1e-5) / (math.sqrt(energy / size) + 1e-10))


@dataclass
class Analysis:
    model_version: str
    sizes: dict[str, int]  # palettizable layer -> parameters
    estimate: Estimate
    calls_per_prompt: int
    settings: dict  # how the inputs were recorded
    seconds: float

    def prompt_psnrs(self, energy_of_call) -> list[float]:
        """Per prompt, the PSNR of the Unet's output over its calls for the error energy `energy_of_call(call)`."""
        psnrs = []
        for first in range(0, len(self.estimate.peaks), self.calls_per_prompt):
            calls = range(first, first + self.calls_per_prompt)
            psnrs.append(_psnr(max(self.estimate.peaks[c] for c in calls), sum(energy_of_call(c) for c in calls),
                               sum(self.estimate.sizes[c] for c in calls)))
        return psnrs

    def recipe(self, average: float) -> dict[str, int]:
        return build_recipe(self.sizes, self.estimate.totals(), average)

    def average_bits(self, recipe: dict[str, int]) -> float:
        return sum(self.sizes[name] * bits for name, bits in recipe.items()) / sum(self.sizes.values())

    def document(self, averages: tuple[float, ...] = AVERAGES) -> dict:
        """Apple's recipe file, with recipes at (at most) each of `averages` bits per weight."""
        errors = self.estimate.errors
        recipes, described = {}, {}
        for target in sorted(averages):
            recipe = self.recipe(target)
            name = recipe_name(self.average_bits(recipe))
            if name in recipes:
                continue
            recipes[name] = recipe
            psnrs = self.prompt_psnrs(lambda call, r=recipe: sum(errors[bits][layer][call] for layer, bits in r.items()
                                                                 if bits != FLOAT16_BITS))
            described[name] = {"target_bits": target, "average_bits": round(self.average_bits(recipe), 4),
                               "estimated_psnr_db": round(sum(psnrs) / len(psnrs), 1)}
        single_layer = {}
        for nbits, layers in errors.items():
            entry = {"metadata": {"nbits": nbits, "out_ngroups": 1, "in_ngroups": 1, "cumulative": False}}
            for name in self.sizes:
                entry[name] = [round(value, 1) for value in self.prompt_psnrs(lambda call, e=layers[name]: e[call])]
            single_layer[str(nbits)] = entry
        return {
            "model_version": self.model_version,
            "single_layer": single_layer,
            "recipes": recipes,
            "analysis": {
                "method": "first-order estimate of each layer's effect on the Unet's output (coreml-sd)",
                "single_layer": "estimated PSNR (dB) of the Unet's output per prompt with that layer alone palettized",
                **self.settings, "probes_per_call": PROBES, "layers": len(self.sizes),
                "parameters": sum(self.sizes.values()), "sizes": self.sizes, "seconds": round(self.seconds, 1),
                "recipes": described,
            },
        }


def analyse(source: ModelSource, height: int | None = None, width: int | None = None,
            prompts: tuple[str, ...] = PROMPTS, steps: int = STEPS, probes: int = PROBES) -> Analysis:
    """The sensitivity of `source`'s Unet (its diffusers module, float32, adapters applied), printing progress."""
    start = time.perf_counter()
    unet_component = source.family.contract.unet
    label = unet_component
    unet = getattr(source.load(unet_component, torch.float32), source.family.component(unet_component).module)
    calls = record_unet_calls(source, unet, height, width, prompts, steps)
    print(f"{label:<11} inputs {len(prompts)} prompts x {steps} steps {time.perf_counter() - start:6.1f} s",
          file=sys.stderr, flush=True)
    estimate = estimate_errors(unet, calls, probes, NBITS_CHOICES, progress=progress_printer(label))
    sizes = {name: layer.weight.numel() for name, layer in palettizable_layers(unet).items()}
    settings = {"prompts": list(prompts), "steps": steps,
                "timesteps": sorted({int(call.timestep[0]) for call in calls}, reverse=True),
                "height": height or source.sample_size * 8, "width": width or source.sample_size * 8}
    return Analysis(source.description.get("id") or source.name, sizes, estimate, steps, settings,
                    time.perf_counter() - start)


def to_text(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def analysed_recipe(source: ModelSource, average: float, height: int | None, width: int | None) -> tuple[str, Recipe]:
    """--quantize-bits: the analysis file (the usual recipes and one at `average`) and the recipe at `average`, with
    where it came from."""
    analysis = analyse(source, height, width)
    recipe = analysis.recipe(average)
    name = recipe_name(analysis.average_bits(recipe))
    text = to_text(analysis.document((*AVERAGES, average)))
    origin = {"file": ANALYSIS_FILE, "target_bits": average}
    return text, Recipe(name, recipe, hashlib.sha256(text.encode()).hexdigest(), origin)
