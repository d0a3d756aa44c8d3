"""Fuzzing: whatever the input, a correct result or one clear error — never a traceback or a hang."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import coreml_sd.converter
from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.images import save_png
from coreml_sd.runtime.infotext import parameters_text
from coreml_sd.runtime.package import load_package
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.prompt import PromptEncoder

DATA = Path(coreml_sd.converter.__file__).parent / "data"
START, END = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer() -> PromptEncoder:
    return PromptEncoder(DATA / "vocab.json", DATA / "merges.txt", text_encoder=None)


@given(prompt=st.text(max_size=400))
def test_any_text_tokenizes_to_77_ids(tokenizer, prompt):
    ids = tokenizer.token_ids(prompt)
    assert ids.shape == (1, 77) and ids[0, 0] == START and END in ids[0, 1:]
    assert ids.min() >= 0 and ids.max() <= END


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                                        max_size=4), max_leaves=20)
MANIFEST_KEYS = st.sampled_from(["scheduler", "latent_scaling_factor", "prediction_type", "attention_implementation",
                                 "components", "format_version"])


@pytest.fixture(scope="module")
def package_shell(tiny_package, tmp_path_factory) -> Path:
    """The tiny package's models (linked) and tokenizer files, for manifests to be written into."""
    shell = tmp_path_factory.mktemp("shell")
    for entry in tiny_package.iterdir():
        if entry.suffix == ".mlpackage":
            (shell / entry.name).symlink_to(entry)
        elif entry.name != "manifest.json":
            shutil.copy(entry, shell / entry.name)
    return shell


@given(manifest=JSON | st.dictionaries(MANIFEST_KEYS, JSON).map(lambda d: {"format_version": 1, **d}))
def test_any_manifest_loads_or_is_refused_in_one_line(package_shell, manifest):
    (package_shell / "manifest.json").write_text(json.dumps(manifest))
    try:
        load_package(package_shell)
    except GenerationError as error:
        assert "\n" not in str(error)


@given(prompt=st.text(), negative=st.text(max_size=50), seed=st.integers(0, 2**32 - 1))
def test_png_parameters_round_trip(tmp_path_factory, prompt, negative, seed):
    text = parameters_text(prompt, negative, {"Steps": 1, "Seed": seed})
    path = tmp_path_factory.mktemp("png") / "image.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    assert Image.open(path).info["parameters"] == text


@settings(max_examples=8)
@given(data=st.data())
def test_mutated_package_runs_or_is_refused_in_one_line(tiny_package, tmp_path_factory, data):
    copy = Path(shutil.copytree(tiny_package, tmp_path_factory.mktemp("mutated") / "package"))
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files), label="file")
    content = bytearray(target.read_bytes())
    if data.draw(st.booleans(), label="truncate") or not content:
        content = content[: data.draw(st.integers(0, max(len(content) - 1, 0)), label="length")]
    else:
        offset = data.draw(st.integers(0, len(content) - 1), label="offset")
        content[offset] ^= data.draw(st.integers(1, 255), label="mask")
    target.write_bytes(bytes(content))
    try:
        pipe = Pipeline.from_package(copy, backend="reference")
        image = pipe("a lighthouse", steps=1, scheduler="ddim", seed=1, progress=False).images[0]
    except GenerationError as error:
        assert "\n" not in str(error)
    else:
        assert np.asarray(image).shape == (128, 128, 3)
