"""A fast estimate of how much palettizing each Unet layer costs, for mixed-bit recipes.

Apple's pre-analysis runs the whole pipeline once per layer and bit width and measures the final latents. Here each
layer's cost is estimated to first order from one forward and backward pass per recorded Unet call and probe:
palettizing layer L's weight W into W' changes the Unet's output y by about J dW, whose energy ||J dW||^2 is the mean
of (v . J dW)^2 over random normal probes v, and v . J dW = <W' - W, G> with G = d(v . y)/dW the weight's gradient
after the backward pass of v. One pass per call and probe serves every layer and every bit width; each weight's
gradient is used as soon as it is accumulated and then dropped, so the analysis holds no more than the model and one
pass's activations."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import NBITS_CHOICES
from .palettize import centroids_by_bits, palettizable

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _ignore(what: str, done: int, total: int) -> None:
    pass


def _float16_values() -> torch.Tensor:
    """The value of each float16 bit pattern, indexed by the pattern as an int16 plus 32768 (inf and NaN as 0: no
    weight holds them)."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return torch.nan_to_num(patterns.view(torch.float16).double(), nan=0.0, posinf=0.0, neginf=0.0)


FLOAT16_VALUES = _float16_values()


class _Palettes:
    """A layer's palettes for each bit width (where the float16 values fall, and the value each snaps to). A
    palettized weight depends only on each element's float16 value, so <W', G> is the sum over the 65536 float16
    values of the value it snaps to times the gradient summed over the elements holding it: one pass over the
    gradient serves every bit width, and nothing the size of the weight is kept between passes."""

    def __init__(self, weight: torch.Tensor, bits: Sequence[int]):
        self.snapped = {}
        for nbits, centroids in centroids_by_bits(weight.detach().numpy(), bits).items():
            centroids = torch.from_numpy(centroids)
            cluster = torch.bucketize(FLOAT16_VALUES, (centroids[1:] + centroids[:-1]) / 2, right=True)
            # as palettize_layer stores it: the centroid in the weight's dtype
            self.snapped[nbits] = centroids.to(weight.dtype).double()[cluster].to(torch.float32)

    def dot_changes(self, weight: torch.Tensor, gradient: torch.Tensor) -> dict[int, float]:
        """<W' - W, G> for each bit width (W' the palettized weight, as palettize_layer makes it)."""
        weight = weight.detach().reshape(-1)
        gradient = gradient.reshape(-1)
        patterns = weight.to(torch.float16).view(torch.int16).to(torch.int32) + 32768
        per_value = torch.bincount(patterns, weights=gradient.double(), minlength=len(FLOAT16_VALUES))
        base = float(weight.double() @ gradient.double())
        return {nbits: float(snapped.double() @ per_value) - base for nbits, snapped in self.snapped.items()}


def palettizable_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in unet.named_modules() if palettizable(module)}


@dataclass
class Estimate:
    """Per bit width and layer, the estimated energy of the change in the Unet's output on each recorded call when
    that layer alone is palettized; and per call, its output's peak magnitude and size (for PSNRs)."""

    errors: dict[int, dict[str, list[float]]]
    peaks: list[float]
    sizes: list[int]

    def totals(self) -> dict[int, dict[str, float]]:
        return {nbits: {name: sum(values) for name, values in layers.items()} for nbits, layers in self.errors.items()}


def estimate_errors(unet: torch.nn.Module, calls: Sequence[Callable[[torch.nn.Module], torch.Tensor]], probes: int = 1,
                    bits: Sequence[int] = NBITS_CHOICES, seed: int = 0, progress: Progress = _ignore) -> Estimate:
    """The estimate for each bit width and palettizable layer of `unet` over `calls` (each runs the Unet on one
    recorded input and returns its output), from `probes` random probes per call."""
    layers = palettizable_layers(unet)
    palettes = {}
    for index, (name, layer) in enumerate(layers.items()):
        palettes[name] = _Palettes(layer.weight, bits)
        progress("palettes", index + 1, len(layers))
    estimate = Estimate({nbits: {name: [0.0] * len(calls) for name in layers} for nbits in bits}, [], [])
    current: dict[str, dict[int, float]] = {}

    def hook(name: str, layer: torch.nn.Module):
        def use(weight: torch.Tensor) -> None:
            current[name] = palettes[name].dot_changes(layer.weight, weight.grad)
            weight.grad = None
        return use

    weights = [layer.weight.requires_grad_(True) for layer in layers.values()]
    generator = torch.Generator().manual_seed(seed)
    handles = [layer.weight.register_post_accumulate_grad_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        for index in range(len(calls) * probes):
            call = index // probes
            current.clear()
            with torch.enable_grad():
                output = calls[call](unet)
                probe = torch.randn(output.shape, generator=generator)
                (output * probe).sum().backward()
            if index % probes == 0:
                estimate.peaks.append(float(output.detach().abs().max()))
                estimate.sizes.append(output.numel())
            for name, dots in current.items():
                for nbits, dot in dots.items():
                    estimate.errors[nbits][name][call] += dot * dot / probes
            progress("probes", index + 1, len(calls) * probes)
    finally:
        for handle in handles:
            handle.remove()
        for weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
    return estimate


def build_recipe(sizes: dict[str, int], errors: dict[int, dict[str, float]], average_bits: float) -> dict[str, int]:
    """Each layer's bits (of those `errors` holds estimates for, 16 costing nothing) minimizing the summed estimated
    error under an average of at most `average_bits` per weight (weighted by `sizes`): for a price per bit, each
    layer takes the bits of least error + price x bits x size; the price is bisected until the average fits. A
    lower price never takes bits from a layer, so the recipes of rising averages are nested."""
    choices = sorted(errors) + [16]
    total = sum(sizes.values())

    def recipe_at(price: float) -> dict[str, int]:
        return {name: min(choices, key=lambda b: (errors[b][name] if b != 16 else 0.0) + price * b * size)
                for name, size in sizes.items()}

    def bits(recipe: dict[str, int]) -> float:
        return sum(sizes[name] * b for name, b in recipe.items()) / total

    low, high = 0.0, 1.0
    while bits(recipe_at(high)) > average_bits and high < 1e30:
        high *= 10
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if bits(recipe_at(middle)) > average_bits else (low, middle)
    return recipe_at(high)
