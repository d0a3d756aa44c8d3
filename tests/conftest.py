"""Fixtures shared by all test areas: the tiny, tiny-xl and demo models and their converted packages.

Conversions are the slow part of the suite, so each attention implementation's package folder is
converted once per session (all of SD's components) and shared by every test that needs it.
"""
from pathlib import Path

import pytest
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The diffusers original of the `tiny` packages (float32, the same weights)."""
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory):
    """`tiny_packages(attention_implementation)` -> a package folder with all of SD's components."""
    folders: dict[str, Path] = {}

    def package(attention_implementation: str = "split_einsum") -> Path:
        if attention_implementation not in folders:
            output = tmp_path_factory.mktemp(f"tiny-{attention_implementation}")
            convert_model(ConversionOptions(model="tiny", output=output, components=tuple(SD.components),
                                            attention_implementation=attention_implementation))
            folders[attention_implementation] = output
        return folders[attention_implementation]

    return package


@pytest.fixture(scope="session")
def tiny_palettized_unet(tmp_path_factory):
    """A package folder with the `tiny` Unet alone, its weights in 6-bit palettes (converted and validated)."""
    output = tmp_path_factory.mktemp("tiny-6-bit")
    report = convert_model(ConversionOptions(model="tiny", output=output, components=("Unet",), quantize_nbits=6))
    assert report.converted == ["Unet"]
    return output


@pytest.fixture(scope="session")
def demo_pipeline():
    """The diffusers original of the `demo` packages (float32, the shipped weights)."""
    from coreml_sd.converter.models.demo import build_demo_pipeline

    return build_demo_pipeline()


@pytest.fixture(scope="session")
def demo_package(tmp_path_factory) -> Path:
    """The demo model converted once (split einsum; no safety checker: it draws shapes)."""
    output = tmp_path_factory.mktemp("demo")
    components = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
    convert_model(ConversionOptions(model="demo", output=output, components=components))
    return output


@pytest.fixture(scope="session")
def tiny_xl_pipeline():
    """The diffusers original of the `tiny-xl` packages (float32, the same weights)."""
    from coreml_sd.converter.models.tiny_xl import build_tiny_xl_pipeline

    return build_tiny_xl_pipeline()


@pytest.fixture(scope="session")
def tiny_xl_refiner_pipeline():
    """The diffusers original of the `tiny-xl-refiner` packages."""
    from coreml_sd.converter.models.tiny_xl import build_tiny_xl_refiner_pipeline

    return build_tiny_xl_refiner_pipeline()


@pytest.fixture(scope="session")
def tiny_xl_packages(tmp_path_factory):
    """`tiny_xl_packages(model, attention_implementation)` -> a package folder of `tiny-xl` (every component) or
    `tiny-xl-refiner` (its default components), converted once per session; the tests compare them with
    diffusers themselves, so the converter's own validation is skipped here."""
    folders: dict[tuple[str, str], Path] = {}

    def package(model: str = "tiny-xl", attention_implementation: str = "split_einsum") -> Path:
        key = (model, attention_implementation)
        if key not in folders:
            output = tmp_path_factory.mktemp(f"{model}-{attention_implementation}")
            components = ("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder") if model == "tiny-xl" else None
            convert_model(ConversionOptions(model=model, output=output, components=components,
                                            attention_implementation=attention_implementation, validate=False))
            folders[key] = output
        return folders[key]

    return package


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_pipeline, tmp_path_factory):
    """Two tiny ControlNets for the tiny Unet, saved as diffusers folders: {folder: the float32 original}."""
    from coreml_sd.converter.models.tiny_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {root / name: save_tiny_controlnet(tiny_pipeline.unet, seed, root / name)
            for name, seed in (("tiny-canny", 1), ("tiny-depth", 2))}


@pytest.fixture(scope="session")
def tiny_controlnet_package(tiny_controlnets, tmp_path_factory) -> Path:
    """The tiny model with both tiny ControlNets and its ControlledUnet, converted once (split einsum)."""
    output = tmp_path_factory.mktemp("tiny-controlnet")
    convert_model(ConversionOptions(model="tiny", output=output, controlnets=tuple(map(str, tiny_controlnets)),
                                    components=("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")))
    return output


@pytest.fixture(scope="session")
def tiny_inpainting_package(tmp_path_factory) -> Path:
    """The `tiny-inpainting` model (a 9-channel inpainting Unet) converted once (split einsum)."""
    output = tmp_path_factory.mktemp("tiny-inpainting")
    convert_model(ConversionOptions(model="tiny-inpainting", output=output,
                                    components=("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")))
    return output
