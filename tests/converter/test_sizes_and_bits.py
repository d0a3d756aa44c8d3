"""Conversion away from the defaults: another image size, and palettes of 1, 2, 4 and 8 bits — each validated by the
converter and generated from."""
import json

import numpy as np
import pytest

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.validate import PSNR_THRESHOLD_DB
from coreml_sd.runtime import Pipeline

# bits, height, width: one case in the quick run, the other palette sizes with --all
CASES = [pytest.param(1, 128, 128, marks=pytest.mark.slow), pytest.param(2, 128, 128, marks=pytest.mark.slow),
         (4, 192, 128), pytest.param(8, 128, 128, marks=pytest.mark.slow)]


@pytest.mark.parametrize("nbits, height, width", CASES)
def test_converted_validated_and_generated_from(tmp_path, nbits, height, width):
    output = tmp_path / f"tiny-{nbits}bit"
    convert_model(ConversionOptions(model="tiny", output=output, quantize_nbits=nbits, height=height, width=width))
    manifest = json.loads((output / "manifest.json").read_text())
    assert (manifest["height"], manifest["width"]) == (height, width)
    for name in ("TextEncoder", "Unet"):
        validation = manifest["components"][name]["validation"]
        assert validation["quantize_nbits"] == nbits and validation["psnr_db"] >= PSNR_THRESHOLD_DB
        assert validation["unquantized_psnr_db"] <= validation["psnr_db"]
    assert manifest["components"]["VAEDecoder"]["validation"]["psnr_db"] >= PSNR_THRESHOLD_DB
    assert manifest["components"]["Unet"]["inputs"]["sample"]["shape"] == [2, 4, height // 8, width // 8]

    image = Pipeline.from_package(output, backend="reference")("a lighthouse", steps=2, seed=3, progress=False).images[
        0
    ]
    pixels = np.asarray(image)
    assert image.size == (width, height) and pixels.std() > 0
