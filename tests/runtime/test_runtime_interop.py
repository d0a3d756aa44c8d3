"""`coreml-generate` on a folder laid out as Apple's Python converter names its outputs."""
import shutil

import numpy as np
from PIL import Image

from coreml_sd.runtime.cli import main

PROMPT = "a photo of an astronaut riding a horse"
# torch2coreml's names: Stable_Diffusion_version_<model id, "/" as "_">_<module>.mlpackage
APPLE_NAMES = {"TextEncoder": "text_encoder", "Unet": "unet", "VAEDecoder": "vae_decoder",
               "VAEEncoder": "vae_encoder", "SafetyChecker": "safety_checker"}


def test_apple_converter_folder_makes_the_original_folders_image(tiny_package, tmp_path, capsys):
    apple = tmp_path / "apple"
    apple.mkdir()
    for ours, theirs in APPLE_NAMES.items():
        shutil.copytree(tiny_package / f"{ours}.mlpackage",
                        apple / f"Stable_Diffusion_version_CompVis_stable-diffusion-v1-4_{theirs}.mlpackage")
    for name in ("vocab.json", "merges.txt"):  # Apple's converter leaves these out; its users add them
        shutil.copy(tiny_package / name, apple)
    images = {}
    for label, folder in (("ours", tiny_package), ("apple", apple)):
        output = tmp_path / f"{label}.png"
        code = main([PROMPT, "--model", str(folder), "--seed", "7", "--steps", "2", "--backend", "reference",
                     "-o", str(output)])
        assert code == 0, capsys.readouterr().err
        images[label] = np.asarray(Image.open(output).convert("RGB"))
    np.testing.assert_array_equal(images["apple"], images["ours"])
