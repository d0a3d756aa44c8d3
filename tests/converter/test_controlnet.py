"""ControlNet packages and the ControlledUnet: Apple's names and contract, each output against diffusers'
ControlNetModel and UNet2DConditionModel (with down_block_additional_residuals / mid_block_additional_residual) in
float32 through the reference executor, the manifest's rows, and the refusal of a ControlNet made for another family.
"""
import json

import numpy as np
import pytest
import torch

from coreml_sd.converter.cli import main
from coreml_sd.converter.controlnets import controlnet_name
from coreml_sd.converter.models.tiny import TEXT_WIDTH
from coreml_sd.runtime.contract import (
    ModelDimensions,
    controlled_unet_spec,
    controlnet_spec,
    residual_layout,
)
from coreml_sd.runtime.executor import ReferenceModel, psnr

COMPONENT_FLOOR_DB = 60.0  # the suite's floor for components; measured 67-81 dB per residual, 70.5 dB ControlledUnet
NAMES = ("TinyCanny", "TinyDepth")


def contract_inputs(spec, seed: int) -> dict[str, np.ndarray]:
    """Inputs in the ranges the runtime feeds: latents, a late and an early timestep, a control image in [0, 1],
    and residuals of a ControlNet's size."""
    rng = np.random.RandomState(seed)
    inputs = {}
    for tensor in spec.inputs:
        if tensor.name == "timestep":
            value = np.array([981, 21])
        elif tensor.name == "controlnet_cond":
            value = rng.uniform(0, 1, tensor.shape)
        else:
            value = rng.randn(*tensor.shape)
        inputs[tensor.name] = value.astype(tensor.dtype)
    return inputs


def tiny_dims(unet) -> ModelDimensions:
    return ModelDimensions(TEXT_WIDTH, 128, 128, 2, residuals=residual_layout(dict(unet.config)))


@pytest.mark.parametrize("name", NAMES)
def test_controlnet_matches_diffusers(tiny_controlnet_package, tiny_controlnets, tiny_pipeline, name):
    original = tiny_controlnets[next(folder for folder in tiny_controlnets if controlnet_name(str(folder)) == name)]
    spec = controlnet_spec(f"controlnet/{name}", tiny_dims(tiny_pipeline.unet))
    inputs = contract_inputs(spec, seed=3)
    x = {key: torch.from_numpy(value.astype(np.float32)) for key, value in inputs.items()}
    with torch.no_grad():
        down, mid = original(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0].transpose(1, 2),
                             x["controlnet_cond"], return_dict=False)
    expected = [*down, mid]
    actual = ReferenceModel(tiny_controlnet_package / "controlnet" / f"{name}.mlpackage").predict(inputs)
    assert len(expected) == len(spec.outputs) == 7  # tiny: conv_in, 3 blocks' resnets + 2 downsamplers, mid
    figures = {t.name: psnr(value.numpy(), actual[t.name]) for t, value in zip(spec.outputs, expected)}
    print(figures)
    assert min(np.abs(value.numpy()).mean() for value in expected) > 0.05  # the projections are not zero
    assert min(figures.values()) >= COMPONENT_FLOOR_DB, figures


def test_controlled_unet_matches_diffusers(tiny_controlnet_package, tiny_pipeline):
    spec = controlled_unet_spec("ControlledUnet", tiny_dims(tiny_pipeline.unet))
    inputs = contract_inputs(spec, seed=4)
    x = {key: torch.from_numpy(value.astype(np.float32)) for key, value in inputs.items()}
    residuals = [x[t.name] for t in spec.inputs if t.name.startswith("additional_residual_")]
    with torch.no_grad():
        context = x["encoder_hidden_states"][:, :, 0].transpose(1, 2)
        expected = tiny_pipeline.unet(x["sample"], x["timestep"], context,
                                      down_block_additional_residuals=tuple(residuals[:-1]),
                                      mid_block_additional_residual=residuals[-1]).sample.numpy()
        plain = tiny_pipeline.unet(x["sample"], x["timestep"], context).sample.numpy()
    actual = ReferenceModel(tiny_controlnet_package / "ControlledUnet.mlpackage").predict(inputs)["noise_pred"]
    print(f"ControlledUnet {psnr(expected, actual):.1f} dB")
    assert psnr(expected, actual) >= COMPONENT_FLOOR_DB
    assert psnr(plain, actual) < 30  # the residuals change the prediction: they are not ignored


def test_contract_and_manifest_rows(tiny_controlnet_package, tiny_controlnets, tiny_pipeline):
    manifest = json.loads((tiny_controlnet_package / "manifest.json").read_text())
    dims = tiny_dims(tiny_pipeline.unet)
    assert manifest["residuals"] == [list(r) for r in dims.residuals]
    for name, spec in [("ControlledUnet", controlled_unet_spec("ControlledUnet", dims)),
                       *[(f"controlnet/{n}", controlnet_spec(f"controlnet/{n}", dims)) for n in NAMES]]:
        entry = manifest["components"][name]
        assert entry["file"] == f"{name}.mlpackage" and (tiny_controlnet_package / entry["file"]).is_dir()
        assert entry["inputs"] == {t.name: t.to_json() for t in spec.inputs}
        assert entry["outputs"] == {t.name: t.to_json() for t in spec.outputs}
        assert entry["validation"]["psnr_db"] >= 35
        model = ReferenceModel(tiny_controlnet_package / entry["file"])
        assert {n: (list(s), str(d)) for n, (s, d) in model.input_description.items()} == {
            t.name: (list(t.shape), t.dtype) for t in spec.inputs}
    folder = next(iter(tiny_controlnets))
    source = manifest["components"]["controlnet/TinyCanny"]["settings"]["source"]
    assert source["path"] == str(folder.resolve()) and source["base_family"] == "sd"
    assert set(source["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    # Apple's Unet stays beside the ControlledUnet, as the Swift package loads both
    assert "Unet" in manifest["components"]


@pytest.mark.parametrize("argument, name", [
    ("lllyasviel/sd-controlnet-mlsd", "LllyasvielSdControlnetMlsd"),  # Apple's README example
    ("lllyasviel/control_v11p_sd15_canny", "LllyasvielControlV11PSd15Canny"),  # str.title, as Apple's bundler
    ("/models/my-depth_net", "MyDepthNet"),
])
def test_names_follow_apples_bundler(argument, name):
    assert controlnet_name(argument) == name


def test_controlnet_of_another_family_is_refused(tmp_path, tiny_xl_pipeline, capsys):
    from coreml_sd.converter.models.tiny_controlnet import save_tiny_controlnet

    save_tiny_controlnet(tiny_xl_pipeline.unet, 1, tmp_path / "xl-net")
    output = tmp_path / "out"
    code = main(["--model", "tiny", "-o", str(output), "--controlnet", str(tmp_path / "xl-net")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not output.exists()
    assert len(error) == 1 and "made for another model family" in error[0] and "cross_attention_dim" in error[0], error


def test_validate_only_checks_controlnets_again(tiny_controlnet_package):
    from coreml_sd.converter.conversion.validate_only import validate_package

    results = validate_package(tiny_controlnet_package)
    assert {"ControlledUnet", "controlnet/TinyCanny", "controlnet/TinyDepth"} <= set(results)
    assert min(result["psnr_db"] for result in results.values()) >= 35  # measured 66-70 dB


def test_bundle_places_controlnets_where_the_swift_package_looks(tiny_controlnet_package, tmp_path):
    """Resources/controlnet/<Name> and Resources/ControlledUnet, Apple's names (here as .mlpackage: no compiler)."""
    import shutil

    from coreml_sd.converter.bundle import write_bundle
    from coreml_sd.converter.families.sd import SD

    folder = tmp_path / "package"
    shutil.copytree(tiny_controlnet_package, folder)
    resources = write_bundle(folder, SD, compile_with=None)
    assert (resources / "ControlledUnet.mlpackage").is_dir() and (resources / "Unet.mlpackage").is_dir()
    controlnets = sorted(p.name for p in (resources / "controlnet").iterdir())
    assert controlnets == ["TinyCanny.mlpackage", "TinyDepth.mlpackage"]
