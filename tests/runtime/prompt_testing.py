"""Helpers for the prompt tests: a tiny package whose text encoder is converted anew (with an embedding, or
other weights) beside the tiny package's own Unet and VAE."""
import json
import shutil
from pathlib import Path

from coreml_sd.converter.conversion import ConversionOptions, convert_model


def with_tiny_unet_and_vae(tiny_package: Path, model: str, output: Path, **options) -> Path:
    """`model`'s TextEncoder converted into `output` (with `options`, e.g. embeddings), completed with the tiny
    package's other models, which the text encoder's changes leave as they are."""
    convert_model(ConversionOptions(model=model, output=output, components=("TextEncoder",), validate=False,
                                    **options))
    manifest = json.loads((output / "manifest.json").read_text())
    tiny_manifest = json.loads((tiny_package / "manifest.json").read_text())
    for name in ("Unet", "VAEDecoder", "VAEEncoder"):
        shutil.copytree(tiny_package / f"{name}.mlpackage", output / f"{name}.mlpackage")
        manifest["components"][name] = tiny_manifest["components"][name]
    (output / "manifest.json").write_text(json.dumps(manifest))
    return output
