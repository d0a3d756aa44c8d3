"""Invisible-watermark figures, printed as JSON: what the watermark costs an image and what survives.

For each image at 512x512 and at 256x256 (the method's minimum): the PSNR of the watermarked image against
the unwatermarked one (target >= 38 dB on the demo model's pictures), the bits read back (of 136,
`StableDiffusionV1`), the bits an unwatermarked image matches (chance: 68), and the bits left after JPEG
re-encoding at quality 90.

The images are the demo model's six sample prompts (diffusers' pipeline, seed 0, its 64x64 pictures enlarged
with Lanczos: a plain background and one shape), the tiny model's (random weights: saturated, noise-like
pictures, the method's worst case) and two natural photographs that scikit-learn ships (a stand-in for Stable
Diffusion's own outputs, which cannot be made without its weights). Exit code 1 if a demo picture misses the
target.

    python scripts/bench_watermark.py
"""
import io
import json
import sys

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from coreml_sd.converter.models.demo import build_demo_pipeline
from coreml_sd.converter.models.demo_data import SAMPLE_PROMPTS
from coreml_sd.converter.models.tiny import build_tiny_pipeline
from coreml_sd.runtime import watermark

PSNR_TARGET_DB = 38.0
SIZES = (512, 256)


def psnr_8bit(reference: Image.Image, image: Image.Image) -> float:
    error = np.asarray(reference, np.float64) - np.asarray(image, np.float64)
    return float(10 * np.log10(255**2 / np.mean(error**2)))


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def images(size: int) -> dict[str, Image.Image]:
    tiny = build_tiny_pipeline()
    generated = tiny("a photo of an astronaut riding a horse", height=size, width=size, num_inference_steps=5,
                     generator=torch.Generator().manual_seed(1)).images[0]
    photos = {name: Image.fromarray(load_sample_image(f"{name}.jpg")).resize((size, size), Image.Resampling.LANCZOS)
              for name in ("china", "flower")}
    demo = build_demo_pipeline()
    drawn = demo(list(SAMPLE_PROMPTS), num_inference_steps=15, generator=torch.Generator().manual_seed(0)).images
    shapes = {f"demo: {prompt}": image.resize((size, size), Image.Resampling.LANCZOS)
              for prompt, image in zip(SAMPLE_PROMPTS, drawn)}
    return {**shapes, "tiny model": generated, **photos}


def figures(image: Image.Image) -> dict:
    mark = watermark.STABLE_DIFFUSION_V1
    marked = watermark.apply(image, mark)
    return {
        "psnr_db": round(psnr_8bit(image, marked), 1),
        "bits_matched": watermark.matched_bits(marked, mark),
        "unwatermarked_bits_matched": watermark.matched_bits(image, mark),
        "jpeg_q90_bits_matched": watermark.matched_bits(jpeg(marked), mark),
    }


def main() -> None:
    results = {f"{size}x{size}": {name: figures(image) for name, image in images(size).items()} for size in SIZES}
    demo_psnr = [row["psnr_db"] for by_name in results.values() for name, row in by_name.items()
                 if name.startswith("demo")]
    print(json.dumps({"bits": len(watermark.STABLE_DIFFUSION_V1.bits), "psnr_target_db": PSNR_TARGET_DB,
                      "demo_psnr_db": {"min": min(demo_psnr), "mean": round(sum(demo_psnr) / len(demo_psnr), 1)},
                      "results": results}, indent=2))
    sys.exit(0 if min(demo_psnr) >= PSNR_TARGET_DB else 1)


if __name__ == "__main__":
    main()
