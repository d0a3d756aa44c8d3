"""The fast mixed-bit analysis: its first-order estimate of what palettizing one layer does to the Unet's output
against the change measured by running the Unet with that layer palettized, and recipes that meet their average."""
import copy

import numpy as np
import torch
from scipy.stats import spearmanr

from coreml_sd.converter.compression.analysis import build_recipe, estimate_errors
from coreml_sd.converter.compression.palettize import palettizable, palettize_layer

SPEARMAN_FLOOR = 0.9  # measured: 0.98 on the tiny Unet at 6 bits (0.93-0.96 on the demo Unet's final latents)


def test_estimate_ranks_layers_as_the_measured_output_change_does(tiny_pipeline):
    unet = copy.deepcopy(tiny_pipeline.unet)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    timestep = torch.tensor([981, 1])

    def run(model):
        return model(sample, timestep, context).sample

    estimated = estimate_errors(unet, [run], probes=8, bits=(6,)).totals()[6]
    with torch.no_grad():
        reference = run(unet)
        measured = {}
        for name, layer in unet.named_modules():
            if palettizable(layer):
                original = layer.weight.clone()
                palettize_layer(layer, 6)
                measured[name] = float(((run(unet) - reference) ** 2).sum())
                layer.weight.copy_(original)
    names = list(measured)
    assert set(estimated) == set(names)
    correlation = spearmanr([measured[n] for n in names], [estimated[n] for n in names]).statistic
    assert correlation >= SPEARMAN_FLOOR, correlation


def test_recipes_meet_their_average_and_spend_bits_where_errors_are():
    rng = np.random.default_rng(0)
    sizes = {f"layer{i}": int(size) for i, size in enumerate(rng.integers(1000, 100000, size=40))}
    sensitivity = {name: float(rng.lognormal(0, 2)) for name in sizes}
    # A palette's error falls about 4x per extra bit (6 dB).
    errors = {nbits: {name: s * 4.0 ** -nbits for name, s in sensitivity.items()} for nbits in (1, 2, 4, 6, 8)}
    total = sum(sizes.values())
    for average in (2.5, 4, 6.5):
        recipe = build_recipe(sizes, errors, average)
        achieved = sum(sizes[name] * bits for name, bits in recipe.items()) / total
        assert average - 0.5 < achieved <= average
        # A layer more sensitive per weight never gets fewer bits.
        ordered = sorted(sizes, key=lambda name: sensitivity[name] / sizes[name])
        assert [recipe[name] for name in ordered] == sorted(recipe[name] for name in ordered)
        assert len(set(recipe.values())) > 1
