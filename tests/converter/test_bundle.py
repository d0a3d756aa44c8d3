"""Swift bundles and chunked Unets against the contract table: Resources/ file names, every model's inputs and
outputs (names, shapes, dtypes), and chunk 1 -> chunk 2 through the executor against the whole Unet."""
import json
import shutil
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest

from coreml_sd.converter.bundle import RESOURCES, write_bundle
from coreml_sd.converter.chunks import WEIGHTS_FILE, split_package
from coreml_sd.converter.cli import main
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.metadata import licence_in_card
from coreml_sd.converter.conversion.program_stats import load_program
from coreml_sd.converter.docgen.contract_doc import generated
from coreml_sd.converter.docgen.swift_example import parts as swift_parts
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.families import family_by_name
from coreml_sd.runtime.contract import (
    TOKENIZER_FILES,
    ComponentSpec,
    ModelDimensions,
    TensorSpec,
    chunk_contract_problems,
    tensor_meaning,
)
from coreml_sd.runtime.executor import ReferenceModel, psnr

# The file names Apple's Swift package loads from its resources folder (StableDiffusionPipeline.ResourceURLs and
# StableDiffusionXLPipeline.ResourceURLs, ml-stable-diffusion), ControlNet's and the multilingual encoder's aside.
SWIFT_RESOURCE_FILES = {
    "TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "Unet.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc",
    "UnetRefiner.mlmodelc", "UnetRefinerChunk1.mlmodelc", "UnetRefinerChunk2.mlmodelc", "VAEDecoder.mlmodelc",
    "VAEEncoder.mlmodelc", "SafetyChecker.mlmodelc", "vocab.json", "merges.txt",
}
FEATURE_DTYPES = {
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "float16",
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32",
}
MAX_CHUNK_FRACTION = 0.55
CHUNK_PSNR_DB = 60.0


def declared(package: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A saved model's inputs and outputs as its model description declares them."""
    description = ct.utils.load_spec(str(package)).description

    def tensors(features):
        return [TensorSpec(f.name, tuple(f.type.multiArrayType.shape), FEATURE_DTYPES[f.type.multiArrayType.dataType])
                for f in features]

    return tensors(description.input), tensors(description.output)


def copy_folder(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination, copy_function=shutil.copy2)
    return destination


def assert_bundle_follows_the_contract(folder: Path, expected_models: set[str]) -> None:
    """Resources/ holds the expected models under the Swift package's names and the tokenizer files; each model
    declares the table's contract, a chunked Unet the chaining rule's."""
    manifest = json.loads((folder / "manifest.json").read_text())
    family = family_by_name(manifest["family"])
    dims = ModelDimensions.from_manifest(manifest)
    resources = folder / RESOURCES
    compiled_names = {name + ".mlmodelc" for name in expected_models} | set(TOKENIZER_FILES)
    assert compiled_names <= SWIFT_RESOURCE_FILES
    assert {p.name for p in resources.iterdir()} == \
        {name + ".mlpackage" for name in expected_models} | set(TOKENIZER_FILES) | {"manifest.json"}
    for name in TOKENIZER_FILES:
        assert (resources / name).read_bytes() == (folder / name).read_bytes()
    for name in expected_models - {"UnetChunk1", "UnetChunk2"}:
        spec = family.spec(name, dims)
        assert declared(resources / f"{name}.mlpackage") == (list(spec.inputs), list(spec.outputs)), name
        assert_described(resources / f"{name}.mlpackage", spec, manifest)
    if "UnetChunk1" in expected_models:
        assert_chunks_chain(
            family.spec("Unet", dims), resources / "UnetChunk1.mlpackage", resources / "UnetChunk2.mlpackage"
        )


def assert_described(package: Path, spec, manifest: dict) -> None:
    """What Xcode shows: each feature's meaning, layout and dtype as the table has them ("sample: noisy latents,
    (B,4,h,w) float16"); the source model as the version; and the coreml_sd.* metadata the runtime reads."""
    description = ct.utils.load_spec(str(package)).description
    for feature, tensor in zip((*description.input, *description.output), (*spec.inputs, *spec.outputs)):
        meaning, layout = tensor_meaning(tensor.name)
        assert feature.shortDescription == f"{meaning}, {layout} {tensor.dtype}"
    assert description.metadata.versionString == manifest["source"]["model"]
    assert description.metadata.shortDescription
    user = description.metadata.userDefined
    assert user["coreml_sd.attention_implementation"] == manifest["attention_implementation"]
    assert user["coreml_sd.source"] == manifest["source"]["model"]


def assert_chunks_chain(unet, first: Path, second: Path) -> None:
    """The Swift package's chaining: chunk 1 takes the Unet's inputs as declared (the Swift package reads the
    `sample` and `time_ids` shapes from it) and returns float32 values of new names; chunk 2 takes those and Unet
    inputs, and returns the Unet's output."""
    first_inputs, first_outputs = declared(first)
    second_inputs, second_outputs = declared(second)
    unet_inputs = {t.name: t for t in unet.inputs}
    assert first_inputs == list(unet.inputs)
    assert first_outputs and all(t.dtype == "float32" and t.name not in unet_inputs for t in first_outputs)
    passed = {t.name: t for t in first_outputs}
    assert all(unet_inputs.get(t.name, passed.get(t.name)) == t for t in second_inputs)
    assert set(passed) <= {t.name for t in second_inputs}  # everything chunk 1 computes is used
    assert second_outputs == list(unet.outputs)


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_bundle_of_every_component_follows_the_contract(model, tiny_packages, tiny_xl_packages, tmp_path, capsys):
    folder = copy_folder(
        tiny_packages("split_einsum") if model == "tiny" else tiny_xl_packages("tiny-xl"), tmp_path / model
    )
    manifest = json.loads((folder / "manifest.json").read_text())

    resources = write_bundle(folder, family_by_name(manifest["family"]))

    assert resources == folder / RESOURCES
    assert_bundle_follows_the_contract(folder, set(manifest["components"]))
    assert "Xcode compiles each to .mlmodelc" in capsys.readouterr().out  # this machine has no coremlcompiler


def test_chunked_bundle_from_the_command_line(tiny_packages, tmp_path, capsys):
    """--chunk-unet replaces the whole Unet by its chunks, in the package folder and in Resources/."""
    folder = copy_folder(tiny_packages("split_einsum"), tmp_path / "tiny")

    assert (
        main(
            [
                "--model",
                "tiny",
                "-o",
                str(folder),
                "--components",
                "Unet",
                "--chunk-unet",
                "--bundle-resources",
                "--no-validate",
            ]
        )
        == 0
    )

    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"UnetChunk1", "UnetChunk2"} <= set(manifest["components"]) and "Unet" not in manifest["components"]
    assert not (folder / "Unet.mlpackage").exists()
    assert [manifest["components"][name]["chunk_of"] for name in ("UnetChunk1", "UnetChunk2")] == ["Unet", "Unet"]
    expected = {"TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder", "SafetyChecker"}
    assert_bundle_follows_the_contract(folder, expected)
    assert "Resources" in capsys.readouterr().out


def test_palettized_bundle_from_the_command_line(tiny_packages, tiny_palettized_package, tmp_path):
    """A bundle of 6-bit packages keeps the float16 contract (palettes change the weights' storage only)."""
    float16_bytes = (tiny_packages() / "Unet.mlpackage" / WEIGHTS_FILE).stat().st_size
    folder = copy_folder(tiny_palettized_package, tmp_path / "tiny")

    arguments = ["--model", "tiny", "-o", str(folder), "--quantize-nbits", "6", "--bundle-resources", "--no-validate"]
    assert main(arguments) == 0

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"]["Unet"]["settings"]["quantize_nbits"] == 6
    assert (folder / RESOURCES / "Unet.mlpackage" / WEIGHTS_FILE).stat().st_size < 0.5 * float16_bytes
    assert_bundle_follows_the_contract(folder, set(manifest["components"]))


def split_unet(folder: Path, destination: Path):
    """The folder's Unet split into destination/UnetChunk1, UnetChunk2, with the contract of the whole."""
    split_package(folder / "Unet.mlpackage", destination, "Unet", lambda model, spec: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    unet = family_by_name(manifest["family"]).spec("Unet", ModelDimensions.from_manifest(manifest))
    return unet, destination / "UnetChunk1.mlpackage", destination / "UnetChunk2.mlpackage"


def assert_weights_are_halved(whole: Path, first: Path, second: Path) -> None:
    weights = [(package / WEIGHTS_FILE).stat().st_size for package in (whole, first, second)]
    assert max(weights[1:]) <= MAX_CHUNK_FRACTION * weights[0]


def test_palettized_chunks_run_as_the_whole_unet(tiny_palettized_package, tmp_path):
    """chunk 1 -> chunk 2 through the executor gives the whole Unet's output, and neither chunk holds more than
    half the weights + 5% (the palettes counted where their weights are used)."""
    whole = tiny_palettized_package / "Unet.mlpackage"
    unet, first, second = split_unet(tiny_palettized_package, tmp_path)
    assert_chunks_chain(unet, first, second)
    assert all(
        "constexpr_lut_to_dense" in {op.op_type for op in load_program(chunk).functions["main"].operations}
        for chunk in (first, second)
    )
    assert_weights_are_halved(whole, first, second)

    rng = np.random.RandomState(0)
    model = ReferenceModel(whole)
    inputs = {name: rng.uniform(-1, 1, shape).astype(dtype) for name, (shape, dtype) in model.input_description.items()}
    inputs["timestep"] = np.array([999, 1], dtype=np.float16)
    expected = model.predict(inputs)["noise_pred"]
    chunk_1 = ReferenceModel(first)
    passed = chunk_1.predict({name: inputs[name] for name in chunk_1.input_description})
    chunk_2 = ReferenceModel(second)
    actual = chunk_2.predict({name: {**inputs, **passed}[name] for name in chunk_2.input_description})["noise_pred"]
    assert psnr(expected, actual) >= CHUNK_PSNR_DB


def test_xl_chunks_follow_the_contract(tiny_xl_packages, tmp_path):
    """SDXL's Unet, with its time_ids and text_embeds, splits as SD's does (the chained run costs what the
    palettized test already shows, so it is not repeated here)."""
    folder = tiny_xl_packages("tiny-xl")
    unet, first, second = split_unet(folder, tmp_path)
    assert_chunks_chain(unet, first, second)
    assert_weights_are_halved(folder / "Unet.mlpackage", first, second)


def test_packages_readme_holds_the_contract_table():
    readme = (Path(__file__).resolve().parents[2] / "packages" / "README.md").read_text()
    for part in (generated(), *(text for _, _, text in swift_parts())):
        assert part in readme, "regenerate it: python -m coreml_sd.converter.docgen.contract_doc packages/README.md"
    assert all(f"`{name}`" in readme for name in SWIFT_RESOURCE_FILES)


@pytest.mark.parametrize(
    "card, licence",
    [
        ("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# Model", "creativeml-openrail-m"),
        ("---\nlicense: other\nlicense_name: sai-nc-community\n---\n", "sai-nc-community"),
        ("---\nlicense: 'openrail++'\n---\nlicense: mit\n", "openrail++"),
        ("# A card without a header\nlicense: mit\n", None),
    ],
)
def test_licence_is_read_from_the_model_card_header(card, licence):
    assert licence_in_card(card) == licence


def test_bundle_of_a_folder_without_the_pipelines_models_is_refused(tmp_path):
    folder = tmp_path / "text-encoder-only"
    convert_model(ConversionOptions(model="tiny", output=folder, components=("TextEncoder",), validate=False))
    with pytest.raises(ConversionError, match="lacks Unet, VAEDecoder, which StableDiffusionPipeline needs"):
        write_bundle(folder, family_by_name("sd"))
    assert sorted(p.name for p in folder.iterdir()) == ["TextEncoder.mlpackage", "manifest.json", "merges.txt",
                                                         "vocab.json"]


def test_compiled_bundle_holds_what_the_swift_package_loads(tiny_packages, tmp_path, capsys):
    """On a Mac each model goes through the compiler (here a stand-in at the adapter's seam that writes the folder
    `xcrun coremlcompiler compile` would write); Resources/ then holds exactly the names StableDiffusionPipeline
    loads, and a manifest that lists the compiled folders' files."""
    folder = copy_folder(tiny_packages("split_einsum"), tmp_path / "tiny")
    compiled = []

    def compiler(package: Path, destination: Path) -> Path:
        compiled.append(package.name)
        model = destination / (package.stem + ".mlmodelc")
        (model / "model.mil").parent.mkdir()
        (model / "model.mil").write_text(package.stem)
        return model

    resources = write_bundle(folder, family_by_name("sd"), compile_with=compiler)

    names = {p.name for p in resources.iterdir()} - {"manifest.json"}
    assert names <= SWIFT_RESOURCE_FILES
    assert names == {
        f"{name}.mlmodelc" for name in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder", "SafetyChecker")
    } | set(TOKENIZER_FILES)
    assert sorted(compiled) == sorted(
        f"{name}.mlpackage" for name in json.loads((folder / "manifest.json").read_text())["components"]
    )
    manifest = json.loads((resources / "manifest.json").read_text())
    assert manifest["components"]["Unet"]["file"] == "Unet.mlmodelc"
    assert set(manifest["components"]["Unet"]["files"]) == {"model.mil"}
    assert "Xcode" not in capsys.readouterr().out


def test_the_chaining_rule_names_what_breaks_it():
    unet = family_by_name("sd").spec("Unet", ModelDimensions(32, 128, 128))
    hidden = TensorSpec("hidden", (2, 64, 8, 8), "float32")
    first = ComponentSpec("UnetChunk1", unet.inputs, (hidden,))
    second = ComponentSpec("UnetChunk2", (unet.inputs[2], hidden), unet.outputs)
    assert chunk_contract_problems(unet, first, second) == []

    half_precision = TensorSpec("hidden", (2, 64, 8, 8), "float16")
    broken = [
        (ComponentSpec("UnetChunk1", unet.inputs[:2], (hidden,)), second, "not Unet's inputs"),
        (ComponentSpec("UnetChunk1", unet.inputs, (half_precision,)), second, "is float16, not float32"),
        (ComponentSpec("UnetChunk1", unet.inputs, (unet.inputs[0],)), second, "shadows Unet's input"),
        (first, ComponentSpec("UnetChunk2", (TensorSpec("other", (1,), "float32"),), unet.outputs), "takes other"),
        (first, ComponentSpec("UnetChunk2", (hidden,), (hidden,)), "outputs ['hidden'], not Unet's"),
    ]
    for chunk_1, chunk_2, problem in broken:
        assert any(problem in line for line in chunk_contract_problems(unet, chunk_1, chunk_2)), problem
