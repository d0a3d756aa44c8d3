"""Does the fast first-order sensitivity (converter/compression/analysis.py, as coreml-convert --mixed-bit-analysis
runs it: the model's own text encoder on generic prompts, a few steps across the schedule) rank the demo Unet's
layers as Apple's full-pipeline pre-analysis does? Apple's measure, per layer: palettize that layer alone, run the
pipeline (its prompts, one step, as Apple's mixed_bit_compression_pre_analysis runs it) and take the final latents'
PSNR against the unpalettized run. Prints JSON with the Spearman rank correlation and the times of both methods.

    python scripts/mixed_bit_ranking.py [--nbits 4] [--probes 1] [--steps 1] [--recipes OUT.json]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from coreml_sd.converter.compression.mixed_bit import analyse, to_text
from coreml_sd.converter.compression.palettize import palettizable, palettize_layer
from coreml_sd.converter.compression.unet_inputs import PROMPTS as ANALYSIS_PROMPTS
from coreml_sd.converter.compression.unet_inputs import STEPS as ANALYSIS_STEPS
from coreml_sd.converter.models.demo import build_demo_pipeline
from coreml_sd.converter.sources import resolve
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
    parser.add_argument("--probes", type=int, default=1, help="random probes per recorded Unet call")
    parser.add_argument("--steps", type=int, default=1, help="the steps of Apple's pipeline runs")
    parser.add_argument("--recipes", metavar="OUT.json",
                        help="also write the fast analysis' recipes at 3, 4 and 5 average bits, in Apple's format")
    args = parser.parse_args()

    start = time.perf_counter()
    analysis = analyse(resolve("demo"), probes=args.probes)
    fast = analysis.estimate.totals()[args.nbits]
    fast_seconds = time.perf_counter() - start
    if args.recipes:
        Path(args.recipes).write_text(to_text(analysis.document((3, 4, 5))))

    pipeline = build_demo_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet
    reference = final_latents(pipeline, args.steps)
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
    print(json.dumps({"model": "demo", "nbits": args.nbits, "layers": len(names), "probes_per_call": args.probes,
                      "analysis_prompts": len(ANALYSIS_PROMPTS), "analysis_steps": ANALYSIS_STEPS,
                      "apple_steps": args.steps, "spearman": round(float(correlation), 3),
                      "fast_seconds": round(fast_seconds, 1), "apple_seconds": round(apple_seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
