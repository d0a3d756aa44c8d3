"""Does the fast first-order sensitivity (converter/compression/analysis.py) rank the demo Unet's layers as Apple's
full-pipeline pre-analysis does? Apple's measure, per layer: palettize that layer alone, run the pipeline (its
prompts, one step, as Apple's mixed_bit_compression_pre_analysis runs it) and take the final latents' PSNR against
the unpalettized run. Prints JSON with the Spearman rank correlation and the times of both methods.

    python scripts/mixed_bit_ranking.py [--nbits 4] [--probes 4] [--steps 1]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from coreml_sd.converter.compression import NBITS_CHOICES
from coreml_sd.converter.compression.analysis import build_recipe, estimated_errors, record
from coreml_sd.converter.compression.palettize import palettizable, palettize_layer
from coreml_sd.converter.models.demo import build_demo_pipeline
from coreml_sd.runtime.executor import psnr

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle above a purple circle",
           "two orange squares"]


def final_latents(pipeline, steps: int):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipeline(PROMPTS, negative_prompt=[""] * len(PROMPTS), num_inference_steps=steps, generator=generator,
                        output_type="latent").images.numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nbits", type=int, default=4)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--recipes", metavar="OUT.json",
                        help="also write recipes at 3, 4 and 5 average bits from the fast analysis, in Apple's format")
    parser.add_argument("--random-inputs", action="store_true",
                        help="record the fast analysis on random Unet inputs (as coreml-convert --mixed-bit-analysis "
                        "does) instead of those of the pipeline's run")
    args = parser.parse_args()
    pipeline = build_demo_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet

    calls = []
    handle = unet.register_forward_pre_hook(lambda module, a, kw: calls.append((a, kw)), with_kwargs=True)
    reference = final_latents(pipeline, args.steps)
    handle.remove()

    if args.random_inputs:  # noise latents and text embeddings of unit variance, the first step's timestep
        def randomized(a, kw, seed=1):
            generator = torch.Generator().manual_seed(seed)
            context = kw["encoder_hidden_states"]
            return ((torch.randn(a[0].shape, generator=generator), a[1]),
                    dict(kw, encoder_hidden_states=torch.randn(context.shape, generator=generator)))

        calls = [randomized(a, kw) for a, kw in calls]
    start = time.perf_counter()
    recorded = record(unet, lambda u: torch.cat([u(*a, **kw)[0] for a, kw in calls]), args.probes)
    fast = estimated_errors(unet, recorded, args.nbits)
    fast_seconds = time.perf_counter() - start

    if args.recipes:
        sizes = {name: layer.weight.numel() for name, layer in unet.named_modules() if palettizable(layer)}
        errors = {nbits: estimated_errors(unet, recorded, nbits) for nbits in NBITS_CHOICES}
        recipes = {}
        for average in (3, 4, 5):
            recipe = build_recipe(sizes, errors, average)
            achieved = sum(sizes[name] * b for name, b in recipe.items()) / sum(sizes.values())
            recipes[f"recipe_{achieved:.2f}_bit_mixedpalette"] = recipe
        Path(args.recipes).write_text(json.dumps({"model_version": "demo", "recipes": recipes}, indent=2))

    start = time.perf_counter()
    apple = {}
    for name, layer in unet.named_modules():
        if palettizable(layer):
            original = layer.weight.detach().clone()
            palettize_layer(layer, args.nbits)
            apple[name] = psnr(reference, final_latents(pipeline, args.steps))
            with torch.no_grad():
                layer.weight.copy_(original)
    apple_seconds = time.perf_counter() - start

    names = list(apple)
    correlation = spearmanr([apple[n] for n in names], [-fast[n] for n in names]).statistic
    print(json.dumps({"model": "demo", "nbits": args.nbits, "layers": len(names), "probes": args.probes,
                      "steps": args.steps, "random_inputs": args.random_inputs,
                      "spearman": round(float(correlation), 3), "fast_seconds": round(fast_seconds, 1),
                      "apple_seconds": round(apple_seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
