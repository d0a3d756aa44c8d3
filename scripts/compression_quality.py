"""What each weight compression costs on the trained demo model: the PSNR of the final latents (Apple's mixed-bit
measure: the same prompts, seed and steps, with and without the compression, in PyTorch float32) for uniform palettes,
grouped palettes, int8 and int4 blocks, and any recipes given. Prints JSON.

    python scripts/compression_quality.py [--steps 10] [--recipe FILE.json:NAME ...]
"""
import argparse
import copy
import json

import numpy as np
import torch

from coreml_sd.converter.compression import LinearQuantization
from coreml_sd.converter.compression.linear import quantize_module
from coreml_sd.converter.compression.palettize import palettize_module
from coreml_sd.converter.compression.recipe import apply_recipe, average_bits, read_recipe
from coreml_sd.converter.models.demo import build_demo_pipeline
from coreml_sd.runtime.executor import psnr

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle above a purple circle",
           "two orange squares"]


def final_latents(pipeline, steps: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipeline(PROMPTS, num_inference_steps=steps, generator=generator, output_type="latent").images.numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--recipe", action="append", default=[], metavar="FILE.json:NAME")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = build_demo_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    reference = final_latents(pipeline, args.steps)
    original_unet = pipeline.unet
    modes = {f"uniform {nbits}-bit": lambda unet, n=nbits: palettize_module(unet, n) for nbits in (8, 6, 4, 2)}
    modes["grouped 4-bit (16 channels)"] = lambda unet: palettize_module(unet, 4, 16)
    modes["int8 per channel"] = lambda unet: quantize_module(unet, LinearQuantization(8))
    modes["int4 blocks of 32"] = lambda unet: quantize_module(unet, LinearQuantization(4, 32))
    for argument in args.recipe:
        recipe = read_recipe(argument)
        modes[f"recipe {recipe.name} ({average_bits(original_unet, recipe):.2f} bits)"] = \
            lambda unet, r=recipe: apply_recipe(unet, r)
    results = {}
    for name, compress in modes.items():
        pipeline.unet = copy.deepcopy(original_unet)
        compress(pipeline.unet)
        results[name] = round(psnr(reference, final_latents(pipeline, args.steps)), 2)
    pipeline.unet = original_unet
    print(json.dumps({"model": "demo", "steps": args.steps, "prompts": len(PROMPTS),
                      "final_latent_psnr_db": results}, indent=2))


if __name__ == "__main__":
    main()
