"""Finding and reading package folders, without loading any model."""
import json
import shutil
import sys

import numpy as np
import pytest

from coreml_sd.converter.models.tiny import clip_vocabulary_files
from coreml_sd.runtime import GenerationError, Pipeline
from coreml_sd.runtime.backends import describe_model, resolve_backend
from coreml_sd.runtime.contract import SD_V1_SCHEDULER_CONFIG
from coreml_sd.runtime.package import find_package, load_package


def make_folder(root, name, files=("manifest.json",)):
    folder = root / name
    folder.mkdir(parents=True)
    for file in files:
        if file.endswith((".mlpackage", ".mlmodelc")):
            (folder / file).mkdir()
        else:
            (folder / file).write_text("{}")
    return folder


def test_the_only_package_is_found(tmp_path):
    make_folder(tmp_path, "tiny")
    make_folder(tmp_path, "notes", files=("README.md",))  # not a package: neither manifest nor models
    assert find_package(None, tmp_path) == tmp_path / "tiny"


def test_by_name_under_the_root_or_by_path(tmp_path, monkeypatch):
    root = tmp_path / "packages"
    make_folder(root, "tiny")
    elsewhere = make_folder(tmp_path, "elsewhere", files=("Unet.mlmodelc",))
    assert find_package("tiny", root) == root / "tiny"
    assert find_package(str(elsewhere), root) == elsewhere
    monkeypatch.setenv("COREML_SD_PACKAGES", str(root))
    assert find_package("tiny") == root / "tiny"


def test_no_package_or_several_or_an_unknown_name_is_explained(tmp_path):
    with pytest.raises(GenerationError, match=r"no packages in .*coreml-convert --model tiny"):
        find_package(None, tmp_path)
    make_folder(tmp_path, "a")
    make_folder(tmp_path, "b", files=("TextEncoder.mlpackage",))
    with pytest.raises(GenerationError, match=r"several packages in .* \(a, b\); choose one with --model NAME"):
        find_package(None, tmp_path)
    with pytest.raises(GenerationError, match=r"no package named 'c' and no folder 'c' \(available: a, b\)"):
        find_package("c", tmp_path)


def tokenizer_files(folder):
    for source in clip_vocabulary_files():
        shutil.copy(source, folder)


def test_manifest_from_a_newer_converter_is_refused(tmp_path):
    folder = make_folder(tmp_path, "new", files=("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"))
    tokenizer_files(folder)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(GenerationError, match="format 2, newer than this runtime reads .*update coreml-sd"):
        load_package(folder)
    (folder / "manifest.json").write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(GenerationError, match="is not a coreml-sd manifest"):
        load_package(folder)


def test_missing_tokenizer_files_are_named(tmp_path):
    folder = make_folder(tmp_path, "p", files=("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"))
    with pytest.raises(GenerationError, match=r"lacks vocab.json and merges.txt: put CLIP's tokenizer files vocab.json "
                       r"and merges.txt \(the model's tokenizer/ folder on Hugging Face has them\) into .*/p$"):
        load_package(folder)


def compiled_metadata(inputs: dict[str, tuple[list[int], str]], ops: dict[str, int], user: dict[str, str]) -> str:
    """metadata.json as Core ML writes it into a compiled model (a list with one description)."""
    return json.dumps([{
        "mlProgramOperationTypeHistogram": ops,
        "userDefinedMetadata": user,
        "inputSchema": [
            {"name": name, "shape": str(shape), "dataType": dtype, "type": "MultiArray", "hasShapeFlexibility": "0",
             "formattedType": f"MultiArray ({dtype} {' × '.join(map(str, shape))})", "isOptional": "0"}
            for name, (shape, dtype) in inputs.items()
        ],
    }])


@pytest.fixture
def swift_bundle(tmp_path):
    """An SD v1 `Resources/` folder as Apple's Swift package ships it: compiled models, BPE files, no manifest."""
    folder = make_folder(tmp_path, "Resources", files=("TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc"))
    tokenizer_files(folder)
    unet_inputs = {"sample": ([2, 4, 64, 64], "Float16"), "timestep": ([2], "Float16"),
                   "encoder_hidden_states": ([2, 768, 1, 77], "Float16")}
    # split_einsum attention as coreml-convert writes it: no einsum op, so only the metadata can say what it is
    (folder / "Unet.mlmodelc" / "metadata.json").write_text(compiled_metadata(
        unet_inputs, {"Ios16.matmul": 512, "Ios16.conv": 200}, {"coreml_sd.attention_implementation": "split_einsum"}
    ))
    (folder / "TextEncoder.mlmodelc" / "metadata.json").write_text(
        compiled_metadata({"input_ids": ([1, 77], "Float32")}, {"Ios16.linear": 100}, {})
    )
    return folder


def test_a_swift_bundle_reads_with_sd_v1_settings(swift_bundle):
    package = load_package(swift_bundle)
    assert package.components == {
        name: (swift_bundle / f"{name}.mlmodelc",) for name in ("TextEncoder", "Unet", "VAEDecoder")
    }
    assert package.scheduler_config == SD_V1_SCHEDULER_CONFIG
    assert (package.scaling_factor, package.prediction_type) == (0.18215, "epsilon")
    assert package.attention_implementation == "split_einsum"  # as the Unet's metadata records it


def test_compiled_models_declare_their_inputs_in_metadata(swift_bundle):
    assert describe_model(swift_bundle / "Unet.mlmodelc")[0] == {
        "sample": ((2, 4, 64, 64), np.dtype(np.float16)),
        "timestep": ((2,), np.dtype(np.float16)),
        "encoder_hidden_states": ((2, 768, 1, 77), np.dtype(np.float16)),
    }
    assert describe_model(swift_bundle / "TextEncoder.mlmodelc")[0] == {"input_ids": ((1, 77), np.dtype(np.float32))}


def test_compiled_models_need_core_ml(swift_bundle):
    with pytest.raises(
        GenerationError,
        match=r"TextEncoder.mlmodelc is compiled \(.mlmodelc\), which only Core ML on "
        "macOS runs, not the reference executor",
    ):
        Pipeline.from_package(swift_bundle, backend="reference")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is there on macOS")
def test_core_ml_backend_is_refused_off_macos():
    with pytest.raises(GenerationError, match="only on macOS; use --backend reference"):
        resolve_backend("coreml")
    assert resolve_backend("auto") == "reference"


APPLE = "Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0"


def test_apple_converter_names_and_chunks(tmp_path):
    """Apple's Python converter's file names (SDXL, chunked Unet) are read as the contract's components."""
    names = ("text_encoder", "text_encoder_2", "unet_chunk1", "unet_chunk2", "vae_decoder", "vae_encoder")
    folder = make_folder(tmp_path, "xl", files=[f"{APPLE}_{name}.mlpackage" for name in names])
    tokenizer_files(folder)
    package = load_package(folder)
    assert package.family == "sdxl"
    assert package.components == {
        "TextEncoder": (folder / f"{APPLE}_text_encoder.mlpackage",),
        "TextEncoder2": (folder / f"{APPLE}_text_encoder_2.mlpackage",),
        "Unet": (folder / f"{APPLE}_unet_chunk1.mlpackage", folder / f"{APPLE}_unet_chunk2.mlpackage"),
        "VAEDecoder": (folder / f"{APPLE}_vae_decoder.mlpackage",),
        "VAEEncoder": (folder / f"{APPLE}_vae_encoder.mlpackage",),
    }
    assert package.attention_implementation is None  # Apple's models record none: Core ML chooses ("ALL")


def test_apple_refiner_alone_is_the_refiner_family(tmp_path):
    refiner = "Stable_Diffusion_version_stabilityai_stable-diffusion-xl-refiner-1.0"
    folder = make_folder(
        tmp_path,
        "refiner",
        files=[f"{refiner}_{name}.mlpackage" for name in ("text_encoder_2", "refiner", "vae_decoder")],
    )
    tokenizer_files(folder)
    package = load_package(folder)
    assert package.family == "sdxl-refiner"
    assert package.components["UnetRefiner"] == (folder / f"{refiner}_refiner.mlpackage",)


def test_models_under_other_names_are_listed_with_the_expected_ones(tmp_path):
    folder = make_folder(tmp_path, "odd", files=("encoder.mlpackage", "denoiser.mlpackage", "decoder.mlmodelc"))
    with pytest.raises(GenerationError) as error:
        load_package(folder)
    assert str(error.value) == (
        f"{folder} holds decoder.mlmodelc, denoiser.mlpackage, encoder.mlpackage, not the models generating needs: "
        "TextEncoder, Unet (or UnetChunk1 + UnetChunk2), VAEDecoder as .mlpackage or .mlmodelc, or as Apple's "
        "converter names them (Stable_Diffusion_version_<model>_text_encoder.mlpackage, ..._unet, ..._vae_decoder); "
        "rename them so, or convert the model with coreml-convert"
    )


def test_a_missing_component_lists_what_the_folder_holds(tmp_path):
    folder = make_folder(tmp_path, "partial", files=(f"{APPLE}_text_encoder.mlpackage", f"{APPLE}_unet.mlpackage"))
    with pytest.raises(
        GenerationError,
        match=rf"lacks VAEDecoder \(no VAEDecoder.mlpackage\); it holds "
        rf"{APPLE}_text_encoder.mlpackage, {APPLE}_unet.mlpackage and needs "
        r"TextEncoder, Unet \(or UnetChunk1 \+ UnetChunk2\), VAEDecoder as",
    ):
        load_package(folder)


def test_half_a_chunked_unet_or_two_conversions_are_refused(tmp_path):
    folder = make_folder(
        tmp_path, "half", files=("TextEncoder.mlpackage", "UnetChunk1.mlpackage", "VAEDecoder.mlpackage")
    )
    with pytest.raises(
        GenerationError, match="holds UnetChunk1.mlpackage but not UnetChunk2; a chunked Unet needs both"
    ):
        load_package(folder)
    other = "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5"
    mixed = make_folder(tmp_path, "mixed", files=(f"{APPLE}_unet.mlpackage", f"{other}_unet.mlpackage"))
    with pytest.raises(
        GenerationError,
        match=r"models of several conversions \(runwayml_stable-diffusion-v1-5, "
        r"stabilityai_stable-diffusion-xl-base-1.0\); move each",
    ):
        load_package(mixed)


def test_a_downloaded_bundle_is_found_in_its_resources_folder(swift_bundle, tmp_path):
    """What the Hugging Face Diffusers app downloads, and an app's bundle: the models under Resources/."""
    download = swift_bundle.parent
    assert find_package(download.name, download.parent) == download  # listed as a package by its Resources/
    package = load_package(download)
    assert (package.path, package.name) == (swift_bundle, download.name)
    assert package.components["Unet"] == (swift_bundle / "Unet.mlmodelc",)
    with pytest.raises(
        GenerationError,
        match=r"^TextEncoder.mlmodelc is compiled \(.mlmodelc\), which only Core ML "
        "on macOS runs",
    ):
        Pipeline.from_package(download, backend="reference")
