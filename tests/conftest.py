"""Fixtures shared by all test areas: the tiny model and its converted packages.

Conversions are the slow part of the suite, so each attention implementation's package folder is
converted once per session (all of SD's components) and shared by every test that needs it.
"""
from pathlib import Path

import pytest

from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.tiny import build_tiny_pipeline


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
