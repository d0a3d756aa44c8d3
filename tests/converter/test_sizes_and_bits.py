"""Conversion away from the defaults: another image size, and palettes of 1, 2, 4 and 8 bits — each validated by the
converter and generated from."""
import json

import numpy as np
import pytest
import torch

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.executor import ReferenceModel, psnr

VAE_PSNR_DB = 68.0  # the tiny VAE decoder measures 71.1-72.7 dB at 192x128 (three seeds)

# bits, height, width: one case in the quick run, the other palette sizes with --all
CASES = [pytest.param(1, 128, 128, marks=pytest.mark.slow), pytest.param(2, 128, 128, marks=pytest.mark.slow),
         (4, 192, 128), pytest.param(8, 128, 128, marks=pytest.mark.slow)]


@pytest.mark.parametrize("nbits, height, width", CASES)
def test_converted_validated_and_generated_from(tmp_path, tiny_pipeline, nbits, height, width):
    output = tmp_path / f"tiny-{nbits}bit"
    convert_model(ConversionOptions(model="tiny", output=output, quantize_nbits=nbits, height=height, width=width))
    manifest = json.loads((output / "manifest.json").read_text())
    assert (manifest["height"], manifest["width"]) == (height, width)
    for name in ("TextEncoder", "Unet"):
        validation = manifest["components"][name]["validation"]
        # palettes cost PSNR against the unquantized original (the converter's own gate checks the rest)
        assert validation["quantize_nbits"] == nbits and validation["unquantized_psnr_db"] <= validation["psnr_db"]
    assert manifest["components"]["Unet"]["inputs"]["sample"]["shape"] == [2, 4, height // 8, width // 8]

    # The VAE keeps float16 weights: at this size it computes what diffusers' decoder computes.
    latents = np.random.RandomState(1).randn(1, 4, height // 8, width // 8) / tiny_pipeline.vae.config.scaling_factor
    decoder = ReferenceModel(output / "VAEDecoder.mlpackage")
    with torch.no_grad():
        expected = tiny_pipeline.vae.decode(torch.from_numpy(latents.astype(np.float32))).sample.numpy()
    assert psnr(expected, decoder.predict({"z": latents.astype(np.float16)})["image"]) >= VAE_PSNR_DB

    pipe = Pipeline.from_package(output, backend="reference")
    image = pipe("a lighthouse", steps=2, seed=3, progress=False).images[0]
    pixels = np.asarray(image)
    assert image.size == (width, height) and pixels.std() > 0
