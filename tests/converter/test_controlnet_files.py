"""ControlNets from single files in lllyasviel's original layout (`--controlnet control_v11p_sd15_canny.safetensors`),
single-file inpainting checkpoints, and the ControlledUnet in chunks (`--chunk-unet`): each package through the
reference executor against the diffusers original in float32, and bad files refused in one line."""
import hashlib
import json
import shutil

import coremltools as ct
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from test_controlnet import contract_inputs, tiny_dims

from coreml_sd.converter.bundle import write_bundle
from coreml_sd.converter.chunks import chunked_reference_model, package_spec
from coreml_sd.converter.cli import main
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import UNET_CONFIG, build_tiny_inpainting_pipeline
from coreml_sd.converter.models.tiny_controlnet import build_tiny_controlnet
from coreml_sd.converter.sources import resolve
from coreml_sd.runtime.contract import (
    ModelDimensions,
    chunk_contract_problems,
    chunk_names,
    controlled_unet_spec,
    controlnet_spec,
)
from coreml_sd.runtime.executor import ReferenceModel, psnr

from ldm_layout import controlnet_state, ldm_state

COMPONENT_FLOOR_DB = 60.0  # the suite's floor for components; measured below in each test's comment
FILE_STEM = "control_tiny_canny"  # named as lllyasviel's control_v11p_sd15_canny files
FILE_NAME = "ControlTinyCanny"  # its stem by Apple's bundler's rule


@pytest.fixture(scope="module")
def file_controlnet(tiny_pipeline):
    return build_tiny_controlnet(tiny_pipeline.unet, seed=7)


def package_copy(tiny_controlnet_package, tmp_path):
    """The converted tiny ControlNet package, copied: a rerun converts only what changed."""
    return shutil.copytree(tiny_controlnet_package, tmp_path / "package")


def diffusers_residuals(controlnet, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = {key: torch.from_numpy(value.astype(np.float32)) for key, value in inputs.items()}
    with torch.no_grad():
        down, mid = controlnet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0].transpose(1, 2),
                               x["controlnet_cond"], return_dict=False)
    return [tensor.numpy() for tensor in (*down, mid)]


def test_single_file_controlnet_matches_diffusers(tiny_controlnet_package, file_controlnet, tiny_pipeline, tmp_path):
    path = tmp_path / f"{FILE_STEM}.safetensors"
    save_file(controlnet_state(file_controlnet), str(path))
    folder = package_copy(tiny_controlnet_package, tmp_path)

    assert main(["--model", "tiny", "-o", str(folder), "--components", "ControlledUnet", "--controlnet", str(path),
                 "--no-validate"]) == 0

    spec = controlnet_spec(f"controlnet/{FILE_NAME}", tiny_dims(tiny_pipeline.unet))
    inputs = contract_inputs(spec, seed=5)
    expected = diffusers_residuals(file_controlnet, inputs)
    actual = ReferenceModel(folder / spec.file_name).predict(inputs)
    figures = {t.name: round(psnr(value, actual[t.name]), 1) for t, value in zip(spec.outputs, expected)}
    print(figures)  # measured 67.1-81.9 dB
    assert min(np.abs(value).mean() for value in expected) > 0.05  # the zero convolutions are randomised
    assert min(figures.values()) >= COMPONENT_FLOOR_DB, figures
    entry = json.loads((folder / "manifest.json").read_text())["components"][spec.name]
    assert entry["inputs"] == {t.name: t.to_json() for t in spec.inputs}
    assert entry["outputs"] == {t.name: t.to_json() for t in spec.outputs}
    source = entry["settings"]["source"]
    assert source["path"] == str(path.resolve()) and source["base_family"] == "sd"
    assert source["files"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}


def test_pickled_controlnet_reads_the_same_weights(file_controlnet, tiny_pipeline, tmp_path):
    """A .pth as lllyasviel publishes them (a pickled state dict) gives the diffusers module's own weights."""
    from coreml_sd.converter.sources.controlnet_file import controlnet_file_reader

    path = tmp_path / f"{FILE_STEM}.pth"
    torch.save(controlnet_state(file_controlnet), path)
    reader = controlnet_file_reader(path, str(path), dict(tiny_pipeline.unet.config), lambda config: None, "tiny")
    loaded, expected = reader.load("controlnet", torch.float32).state_dict(), file_controlnet.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def other_width_controlnet(tiny_pipeline):
    """A ControlNet with the tiny Unet's text width but wider blocks: only its tensors' shapes tell."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (32, 64, 128)})
    return build_tiny_controlnet(unet, seed=1)


@pytest.mark.parametrize("case, message", [
    ("sd-checkpoint", "is a Stable Diffusion checkpoint, not a ControlNet: pass it with --model"),
    ("lora", "holds no ControlNet"),
    ("xl-controlnet", "was made for another model family than tiny"),
    ("wider-blocks", "does not fit tiny's Unet (its down_blocks.2"),
])
def test_bad_controlnet_files_are_one_line(case, message, tiny_pipeline, tiny_xl_pipeline, tmp_path, capsys):
    if case == "sd-checkpoint":
        state = ldm_state(tiny_pipeline)
    elif case == "lora":
        state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    elif case == "xl-controlnet":
        state = controlnet_state(build_tiny_controlnet(tiny_xl_pipeline.unet, seed=1))
    else:
        state = controlnet_state(other_width_controlnet(tiny_pipeline))
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path))
    output = tmp_path / "out"
    code = main(["--model", "tiny", "-o", str(output), "--controlnet", str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not output.exists()
    print(error[0])
    assert len(error) == 1 and message in error[0], error
    if case == "xl-controlnet":
        assert "cross_attention_dim" in error[0]


def test_single_file_inpainting_checkpoint_converts_to_a_9_channel_unet(tmp_path):
    """An SD 1.x inpainting checkpoint (conv_in takes 9 channels) in the original layout, with the configs of an
    ordinary 4-channel model: the weights decide, and the Unet package matches the diffusers inpainting Unet."""
    pipeline = build_tiny_inpainting_pipeline()
    configs = tmp_path / "tiny-configs"
    pipeline.save_pretrained(configs)
    unet_config = configs / "unet" / "config.json"
    unet_config.write_text(json.dumps(dict(json.loads(unet_config.read_text()), in_channels=4)))
    path = tmp_path / "tiny-inpainting.safetensors"
    save_file(ldm_state(pipeline), str(path))
    output = tmp_path / "package"

    convert_model(ConversionOptions(model=str(path), config=configs, output=output, components=("Unet",),
                                    validate=False))

    manifest = json.loads((output / "manifest.json").read_text())
    dims = ModelDimensions.from_manifest(manifest)
    assert dims.unet_in_channels == 9
    spec = SD.spec("Unet", dims)
    assert manifest["components"]["Unet"]["inputs"]["sample"]["shape"] == [2, 9, 16, 16]
    inputs = contract_inputs(spec, seed=6)
    x = {key: torch.from_numpy(value.astype(np.float32)) for key, value in inputs.items()}
    with torch.no_grad():
        expected = pipeline.unet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0].transpose(1, 2)).sample
    actual = ReferenceModel(output / spec.file_name).predict(inputs)["noise_pred"]
    print(f"inpainting Unet {psnr(expected.numpy(), actual):.1f} dB")  # measured 68.8 dB
    assert psnr(expected.numpy(), actual) >= COMPONENT_FLOOR_DB


def test_sd2_inpainting_checkpoint_is_a_512_epsilon_model(tmp_path, tiny_pipeline):
    """SD 2's 512-inpainting-ema has an OpenCLIP text encoder and no v-prediction marker: it is epsilon at 512, not
    the 768-v default of other SD 2.x files."""
    state = ldm_state(tiny_pipeline, vae=False, open_clip=True)
    first = "model.diffusion_model.input_blocks.0.0.weight"
    state[first] = torch.zeros(state[first].shape[0], 9, *state[first].shape[2:])
    path = tmp_path / "512-inpainting-ema.safetensors"
    save_file(state, str(path))
    source = resolve(str(path))
    assert (source.description["model_type"], source.prediction_type) == ("sd2", "epsilon")
    assert source.conditioning["unet_in_channels"] == 9


def test_chunked_controlled_unet_runs_as_the_whole(tiny_controlnet_package, tiny_pipeline, tmp_path):
    """--chunk-unet with ControlNets writes ControlledUnetChunk1/2, chained as Apple's Swift package chains them
    (chunk 1 takes every input, residuals included; chunk 2 chunk 1's outputs and the inputs it uses)."""
    folder = package_copy(tiny_controlnet_package, tmp_path)
    controlnets = tuple(entry["settings"]["source"]["controlnet"] for name, entry in
                        json.loads((folder / "manifest.json").read_text())["components"].items()
                        if name.startswith("controlnet/"))

    report = convert_model(ConversionOptions(model="tiny", output=folder, controlnets=controlnets, chunk_unet=True,
                                             components=("ControlledUnet",), validate=False))

    assert report.converted == ["ControlledUnet"]  # the ControlNets are up to date
    manifest = json.loads((folder / "manifest.json").read_text())
    names = ("ControlledUnetChunk1", "ControlledUnetChunk2")  # Apple's, which the Swift package loads
    assert chunk_names("ControlledUnet") == names
    assert "ControlledUnet" not in manifest["components"] and not (folder / "ControlledUnet.mlpackage").exists()
    assert [manifest["components"][name]["chunk_of"] for name in names] == ["ControlledUnet"] * 2
    whole = controlled_unet_spec("ControlledUnet", tiny_dims(tiny_pipeline.unet))
    chunk_specs = [package_spec(ct.models.MLModel(str(folder / f"{name}.mlpackage"), skip_model_load=True)
                                .get_spec().description, name) for name in names]
    for chunk in chunk_specs:  # the manifest's rows are what the packages declare
        entry = manifest["components"][chunk.name]
        assert entry["inputs"] == {t.name: t.to_json() for t in chunk.inputs}
        assert entry["outputs"] == {t.name: t.to_json() for t in chunk.outputs}
    assert chunk_contract_problems(whole, *chunk_specs) == []
    assert chunk_specs[0].inputs == whole.inputs  # every residual is an input of chunk 1, as the Swift package feeds
    print("chunk 2 takes", [t.name for t in chunk_specs[1].inputs if t.name in {i.name for i in whole.inputs}])
    resources = write_bundle(folder, SD, compile_with=None)  # the names the Swift package looks for
    assert all((resources / f"{name}.mlpackage").is_dir() for name in names)
    assert not (resources / "ControlledUnet.mlpackage").exists()

    inputs = contract_inputs(whole, seed=8)
    x = {key: torch.from_numpy(value.astype(np.float32)) for key, value in inputs.items()}
    residuals = [x[t.name] for t in whole.inputs if t.name.startswith("additional_residual_")]
    with torch.no_grad():
        expected = tiny_pipeline.unet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0].transpose(1, 2),
                                      down_block_additional_residuals=tuple(residuals[:-1]),
                                      mid_block_additional_residual=residuals[-1]).sample.numpy()
    chained = chunked_reference_model(tuple(folder / f"{name}.mlpackage" for name in names)).predict(inputs)
    whole_output = ReferenceModel(tiny_controlnet_package / "ControlledUnet.mlpackage").predict(inputs)["noise_pred"]
    figures = {"diffusers": psnr(expected, chained["noise_pred"]), "whole": psnr(whole_output, chained["noise_pred"])}
    print(figures)  # measured 69.9 dB against diffusers; 202 dB against the whole ControlledUnet package
    assert figures["diffusers"] >= COMPONENT_FLOOR_DB and figures["whole"] >= COMPONENT_FLOOR_DB, figures
