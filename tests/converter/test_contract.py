"""The saved packages follow the Swift package's contract: names, shapes, dtypes, format, fp16 weights."""
import json
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest

from coreml_sd.converter.conversion.program_stats import load_program
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import SCHEDULER_CONFIG, TEXT_WIDTH, clip_vocabulary_files
from coreml_sd.runtime.contract import ModelDimensions

FEATURE_DTYPES = {
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "float16",
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32",
}
IOS16_SPECIFICATION_VERSION = 7


def features(description) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        f.name: (tuple(f.type.multiArrayType.shape), FEATURE_DTYPES[f.type.multiArrayType.dataType])
        for f in description
    }


@pytest.mark.parametrize("component", SD.components)
def test_saved_spec_matches_the_contract(tiny_packages, component):
    folder = tiny_packages("split_einsum")
    spec = ct.utils.load_spec(str(folder / f"{component}.mlpackage"))
    expected = SD.spec(component, ModelDimensions(TEXT_WIDTH, 128, 128, unet_batch_size=2, clip_skip_layers=2))

    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == IOS16_SPECIFICATION_VERSION
    assert features(spec.description.input) == {t.name: (t.shape, t.dtype) for t in expected.inputs}
    assert features(spec.description.output) == {t.name: (t.shape, t.dtype) for t in expected.outputs}
    assert [f.name for f in spec.description.input] == [t.name for t in expected.inputs]


@pytest.mark.parametrize("component", ["Unet", "TextEncoder"])
def test_weights_are_stored_in_float16(tiny_packages, tiny_pipeline, component):
    module = {"Unet": tiny_pipeline.unet, "TextEncoder": tiny_pipeline.text_encoder}[component]
    parameters = sum(p.numel() for p in module.parameters())
    weights = (
        tiny_packages("split_einsum")
        / f"{component}.mlpackage"
        / "Data"
        / "com.apple.CoreML"
        / "weights"
        / "weight.bin"
    )
    bytes_per_parameter = weights.stat().st_size / parameters
    # 2 bytes each, plus per-tensor alignment and the few constants the rewrite adds.
    assert 1.9 < bytes_per_parameter < 2.3


def test_compute_precision_is_float16(tiny_packages):
    program = load_program(tiny_packages("split_einsum") / "Unet.mlpackage")
    convs = [op for op in program.functions["main"].operations if op.op_type == "conv"]
    assert convs and all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp16 for op in convs)


@pytest.mark.parametrize("component", SD.components)
def test_package_records_its_torch_source_as_a_one_step_conversion_does(tiny_packages, component):
    """Converted in two steps (to MIL, then to an ML Program), a package still names torch and the ATen
    dialect as its source, in the metadata and in the program's build info, not coremltools' "milinternal"."""
    import torch

    spec = ct.utils.load_spec(str(tiny_packages("split_einsum") / f"{component}.mlpackage"))
    metadata = spec.description.metadata.userDefined
    assert metadata["com.github.apple.coremltools.source"] == f"torch=={torch.__version__}"
    assert metadata["com.github.apple.coremltools.source_dialect"] == "TorchExport::ATEN"
    entries = spec.mlProgram.attributes["buildInfo"].immediateValue.dictionary.values
    build_info = {
        e.key.immediateValue.tensor.strings.values[0]: e.value.immediateValue.tensor.strings.values[0] for e in entries
    }
    assert build_info["coremltools-component-torch"] == torch.__version__
    assert build_info["coremltools-source-dialect"] == "TorchExport::ATEN"
    assert "coremltools-component-milinternal" not in build_info


def test_manifest_describes_the_package(tiny_packages, tiny_pipeline):
    folder = tiny_packages("split_einsum")
    manifest = json.loads((folder / "manifest.json").read_text())

    assert manifest["format_version"] == 1
    assert manifest["source"]["model"] == "tiny"
    assert manifest["attention_implementation"] == "split_einsum"
    assert (manifest["height"], manifest["width"], manifest["unet_batch_size"]) == (128, 128, 2)
    assert manifest["latent_scaling_factor"] == pytest.approx(tiny_pipeline.vae.config.scaling_factor)
    assert manifest["prediction_type"] == "epsilon"
    for key, value in SCHEDULER_CONFIG.items():
        assert manifest["scheduler"][key] == value
    assert manifest["scheduler"]["_class_name"] == "PNDMScheduler"
    assert set(manifest["components"]) == set(SD.components)
    unet = manifest["components"]["Unet"]
    assert unet["file"] == "Unet.mlpackage"
    assert unet["inputs"]["encoder_hidden_states"] == {"shape": [2, TEXT_WIDTH, 1, 77], "dtype": "float16"}
    assert "validation" in unet
    for packaged in clip_vocabulary_files():
        assert (folder / Path(packaged).name).read_bytes() == Path(packaged).read_bytes()


def test_tokenizer_files_reproduce_clip_token_ids(tiny_packages):
    from transformers import CLIPTokenizer

    folder = tiny_packages("split_einsum")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # Token ids of this prompt under openai/clip-vit-large-patch14, as published with SD v1.
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert len(tokenizer) == 49408
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 49407
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "an</w>",
        "astronaut</w>",
        "riding</w>",
        "a</w>",
        "horse</w>",
    ]
    assert np.all(np.array(ids[1:-1]) < 49406)
