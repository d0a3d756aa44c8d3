"""Fixtures shared by all test areas: the tiny, tiny-xl and demo models and their converted packages.

Conversions are the slow part of the suite, so each package is converted once per run, in a folder that every
pytest-xdist worker sees (`converted_once`: the first worker to ask converts it under a file lock, the others wait
and reuse it). A variant that changes only some components is the base package copied and converted again with
the changed option: the converter skips the components whose settings did not change (attention implementations
touch the Unet and the VAE only).
"""
import dataclasses
import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import build_tiny_pipeline

XL_BASE_COMPONENTS = ("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: one thread each, or torch's thread pools fight over the cores.
        import torch

        torch.set_num_threads(1)


def pytest_collection_finish(session):
    # What the test modules imported (torch, diffusers, coremltools: some 600,000 objects) lives until the run ends:
    # left out of garbage collection, each full collection that a test triggers scans only what the tests made.
    gc.freeze()


def shared_temp(tmp_path_factory) -> Path:
    """The run's temporary folder, which holds each xdist worker's own (or is it, without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def converted_once(tmp_path_factory) -> Callable[[str, Callable[[Path], object]], Path]:
    """`converted_once(name, build)` -> the folder `build(folder)` makes, made once per run by whichever worker asks
    first. A folder whose build failed is built again by the next test that asks."""
    root = shared_temp(tmp_path_factory) / "converted"
    root.mkdir(parents=True, exist_ok=True)

    def folder(name: str, build: Callable[[Path], object]) -> Path:
        path, done = root / name, root / f"{name}.done"
        with FileLock(str(root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
                build(path)
                done.touch()
        return path

    return folder


def variant_of(base: Path, folder: Path, options: ConversionOptions, converted: list[str]) -> None:
    """`base` copied to `folder` and converted again with `options`, which must re-convert exactly `converted`."""
    shutil.copytree(base, folder)
    report = convert_model(options)
    assert report.converted == converted, report


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The diffusers original of the `tiny` packages (float32, the same weights)."""
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_packages(converted_once):
    """`tiny_packages(attention_implementation)` -> a package folder with all of SD's components: split einsum
    converted and validated, the other implementations as variants of it that their tests compare with diffusers
    themselves (the converter's validation skipped)."""
    components = tuple(SD.components)

    def package(attention_implementation: str = "split_einsum") -> Path:
        def build(folder: Path) -> None:
            options = ConversionOptions(model="tiny", output=folder, components=components,
                                        attention_implementation=attention_implementation)
            if attention_implementation == "split_einsum":
                convert_model(options)
            else:
                variant_of(package("split_einsum"), folder, dataclasses.replace(options, validate=False),
                           ["Unet", "VAEDecoder", "VAEEncoder"])

        return converted_once(f"tiny-{attention_implementation}", build)

    return package


@pytest.fixture(scope="session")
def tiny_palettized_package(tiny_variant, converted_once):
    """The tiny package with its TextEncoder and Unet in 6-bit palettes (converted and validated again; the other
    components, which palettes leave alone, as they are)."""
    def build(folder: Path) -> None:
        options = ConversionOptions(model="tiny", output=folder, components=tuple(SD.components), quantize_nbits=6)
        tiny_variant(options, ["TextEncoder", "Unet"])

    return converted_once("tiny-6-bit", build)


@pytest.fixture(scope="session")
def demo_pipeline():
    """The diffusers original of the `demo` packages (float32, the shipped weights)."""
    from coreml_sd.converter.models.demo import build_demo_pipeline

    return build_demo_pipeline()


@pytest.fixture(scope="session")
def demo_package(converted_once) -> Path:
    """The demo model converted once (split einsum; no safety checker: it draws shapes)."""
    components = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
    return converted_once("demo", lambda folder: convert_model(ConversionOptions(model="demo", output=folder,
                                                                                 components=components)))


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
def tiny_xl_packages(converted_once):
    """`tiny_xl_packages(model, attention_implementation)` -> a package folder of `tiny-xl` (every component) or
    `tiny-xl-refiner` (its default components), converted once per run; the tests compare them with diffusers
    themselves, so the converter's own validation is skipped here."""
    def package(model: str = "tiny-xl", attention_implementation: str = "split_einsum") -> Path:
        def build(folder: Path) -> None:
            components = XL_BASE_COMPONENTS if model == "tiny-xl" else None
            options = ConversionOptions(model=model, output=folder, components=components,
                                        attention_implementation=attention_implementation, validate=False)
            if attention_implementation == "split_einsum":
                convert_model(options)
            else:
                changed = ["Unet", "VAEDecoder", "VAEEncoder"] if model == "tiny-xl" else ["UnetRefiner", "VAEDecoder"]
                variant_of(package(model), folder, options, changed)

        return converted_once(f"{model}-{attention_implementation}", build)

    return package


@pytest.fixture(scope="session")
def tiny_variant(tiny_packages) -> Callable[[ConversionOptions, list[str]], Path]:
    """`tiny_variant(options, converted)` -> `options.output`: the tiny package (every component, split einsum)
    converted again with `options`, which must re-convert exactly `converted`."""
    def variant(options: ConversionOptions, converted: list[str]) -> Path:
        variant_of(tiny_packages("split_einsum"), options.output, options, converted)
        return options.output

    return variant


@pytest.fixture(scope="session")
def tiny_xl_variant(tiny_xl_packages) -> Callable[[ConversionOptions, list[str]], Path]:
    """`tiny_xl_variant(options, converted)` -> `options.output`: the tiny-xl package (its base components, split
    einsum) converted again with `options` (components: the base's unless they say), which must re-convert exactly
    `converted`."""
    def variant(options: ConversionOptions, converted: list[str]) -> Path:
        if options.components is None:
            options = dataclasses.replace(options, components=XL_BASE_COMPONENTS)
        variant_of(tiny_xl_packages("tiny-xl"), options.output, options, converted)
        return options.output

    return variant


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_pipeline, converted_once):
    """Two tiny ControlNets for the tiny Unet, saved once per run as diffusers folders: {folder: the float32
    original}."""
    from coreml_sd.converter.models.tiny_controlnet import build_tiny_controlnet

    networks = {}
    for name, seed in (("tiny-canny", 1), ("tiny-depth", 2)):
        controlnet = build_tiny_controlnet(tiny_pipeline.unet, seed)
        folder = converted_once(name, lambda folder: controlnet.save_pretrained(folder, safe_serialization=True))
        networks[folder] = controlnet
    return networks


@pytest.fixture(scope="session")
def tiny_controlnet_package(tiny_variant, tiny_controlnets, converted_once) -> Path:
    """The tiny package with both tiny ControlNets and its ControlledUnet (split einsum), converted and validated
    once per run: the tiny package's other components are reused as they are."""
    def build(folder: Path) -> None:
        options = ConversionOptions(model="tiny", output=folder, controlnets=tuple(map(str, tiny_controlnets)),
                                    components=("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"))
        tiny_variant(options, ["ControlledUnet", "controlnet/TinyCanny", "controlnet/TinyDepth"])

    return converted_once("tiny-controlnet", build)


@pytest.fixture(scope="session")
def tiny_inpainting_package(converted_once) -> Path:
    """The `tiny-inpainting` model (a 9-channel inpainting Unet) converted once per run (split einsum); its tests
    compare it with diffusers themselves, so the converter's own validation is skipped."""
    components = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
    return converted_once("tiny-inpainting", lambda folder: convert_model(
        ConversionOptions(model="tiny-inpainting", output=folder, components=components, validate=False)))
