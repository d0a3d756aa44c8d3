"""A fast estimate of how much palettizing each Unet layer costs, for mixed-bit recipes.

Apple's pre-analysis runs the whole pipeline once per layer and bit width and measures the final latents. Here each
layer's cost is estimated to first order from one recorded forward and backward pass per probe: palettizing layer L
changes its output by dy = (W' - W) x, and the Unet's output by about J dy, whose energy ||J dy||^2 is the mean of
(v . J dy)^2 = (g . dy)^2 over random probes v, g = J^T v being the gradient the backward pass of v leaves at L's
output. One pass per probe serves every layer and every bit width."""
import numpy as np
import torch
import torch.nn.functional as F

from .palettize import palette, palettizable


def _layer_delta(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, delta)
    return F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def record(unet: torch.nn.Module, run, probes: int, seed: int = 0) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """For each palettizable layer of `unet`, per probe: (its input, the gradient of v . output at its output), where
    `run(unet)` returns the Unet's output for the recorded inputs and v is a random normal probe."""
    layers = {name: module for name, module in unet.named_modules() if palettizable(module)}
    recorded: dict[str, list] = {name: [] for name in layers}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(probes):
        current: dict[str, list] = {}

        def hook(name):
            def keep(module, inputs, output):
                entry = [inputs[0].detach(), None]
                current[name] = entry
                output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))
            return keep

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            with torch.enable_grad():
                output = run(unet)
                probe = torch.randn(output.shape, generator=generator)
                (output * probe).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        for name, entry in current.items():
            recorded[name].append(tuple(entry))
    unet.zero_grad(set_to_none=True)
    return recorded


@torch.no_grad()
def estimated_errors(unet: torch.nn.Module, recorded: dict, nbits: int) -> dict[str, float]:
    """Per layer: the estimated energy of the change in the Unet's output when that layer alone is palettized."""
    errors = {}
    layers = dict(unet.named_modules())
    for name, samples in recorded.items():
        layer = layers[name]
        weight = layer.weight.detach()
        centroids, indices = palette(weight.numpy(), nbits)
        delta = torch.from_numpy(centroids[indices].reshape(weight.shape)).to(weight.dtype) - weight
        errors[name] = float(np.mean([float((gradient * _layer_delta(layer, x, delta)).sum()) ** 2
                                      for x, gradient in samples if gradient is not None]))
    return errors


def build_recipe(sizes: dict[str, int], errors: dict[int, dict[str, float]], average_bits: float) -> dict[str, int]:
    """Each layer's bits (of those `errors` holds estimates for, 16 costing nothing) minimizing the summed estimated
    error under an average of at most `average_bits` per weight (weighted by `sizes`): for a price per bit, each
    layer takes the bits of least error + price x bits x size; the price is bisected until the average fits."""
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
