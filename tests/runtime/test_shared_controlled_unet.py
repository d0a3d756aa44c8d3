"""--shared-controlled-unet: the ControlledUnet as function `controlled` of Unet.mlpackage, its weights stored once.
The function against diffusers' Unet given ControlNet residuals, generation with a ControlNet against the same from
Apple's two-package layout, the manifest's record, the package's size, and the options it refuses."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from coreml_sd.converter.cli import main as convert_command
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.models.tiny import TEXT_WIDTH
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.contract import ModelDimensions, controlled_unet_spec, residual_layout
from coreml_sd.runtime.control import ControlRequest
from coreml_sd.runtime.executor import ReferenceModel, psnr

FUNCTION_FLOOR_DB = 60.0  # the suite's floor for components; measured 70.5 dB (the two-file ControlledUnet: 70.5)
COMPONENTS = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def shared_package(tiny_controlnet_package, tiny_controlnets, converted_once) -> Path:
    """The ControlNet package converted again with --shared-controlled-unet, once per run: only the Unet converts
    (no validation: the tests compare it with diffusers themselves)."""
    def build(folder: Path) -> None:
        shutil.copytree(tiny_controlnet_package, folder)
        options = ConversionOptions(model="tiny", output=folder, controlnets=tuple(map(str, tiny_controlnets)),
                                    components=COMPONENTS, shared_controlled_unet=True, validate=False)
        assert convert_model(options).converted == ["Unet"]

    return converted_once("tiny-shared-controlled-unet", build)


def weights_size(package: Path) -> int:
    return sum(path.stat().st_size for path in package.rglob("*.bin"))


@torch.no_grad()
def test_the_controlled_function_matches_diffusers(shared_package, tiny_pipeline):
    spec = controlled_unet_spec("ControlledUnet", ModelDimensions(TEXT_WIDTH, 128, 128, 2,
                                                                  residuals=residual_layout(dict(tiny_pipeline.unet.config))))
    rng = np.random.RandomState(4)
    inputs = {t.name: (np.array([981, 21]) if t.name == "timestep" else rng.randn(*t.shape)).astype(t.dtype)
              for t in spec.inputs}
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    residuals = [x[t.name] for t in spec.inputs if t.name.startswith("additional_residual_")]
    expected = tiny_pipeline.unet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0].transpose(1, 2),
                                  down_block_additional_residuals=tuple(residuals[:-1]),
                                  mid_block_additional_residual=residuals[-1]).sample.numpy()
    ours = ReferenceModel(shared_package / "Unet.mlpackage", function_name="controlled").predict(inputs)["noise_pred"]
    print(f"controlled function {psnr(expected, ours):.1f} dB against diffusers")
    assert psnr(expected, ours) >= FUNCTION_FLOOR_DB
    # the default function stays Apple's plain Unet: no residual inputs
    assert not any(name.startswith("additional_residual_")
                   for name in ReferenceModel(shared_package / "Unet.mlpackage").input_description)


def test_the_manifest_records_the_functions_and_the_weights_are_stored_once(shared_package, tiny_controlnet_package):
    manifest = json.loads((shared_package / "manifest.json").read_text())
    unet = manifest["components"]["Unet"]
    assert "ControlledUnet" not in manifest["components"] and not (shared_package / "ControlledUnet.mlpackage").exists()
    assert unet["controlled_unet_function"] == "controlled" and unet["minimum_os"] == "macOS 15 / iOS 18"
    assert unet["settings"]["shared_controlled_unet"] is True
    function = unet["functions"]["controlled"]
    two_file = json.loads((tiny_controlnet_package / "manifest.json").read_text())["components"]["ControlledUnet"]
    assert function["component"] == "ControlledUnet"
    assert (function["unet_batch_size"], function["prompt_chunks"]) == (2, 1)
    assert (function["inputs"], function["outputs"]) == (two_file["inputs"], two_file["outputs"])
    # save_multifunction shares a constant only when the functions' values are identical: they are, so the package
    # holds the plain Unet's weights once (measured: 99.4% of the two-file Unet.mlpackage's)
    plain = weights_size(tiny_controlnet_package / "Unet.mlpackage")
    print(f"shared Unet.mlpackage weights {weights_size(shared_package / 'Unet.mlpackage') / plain:.2%} of the plain")
    assert weights_size(shared_package / "Unet.mlpackage") <= 1.03 * plain


def test_generation_with_a_controlnet_equals_the_two_file_layouts(shared_package, tiny_controlnet_package):
    outline = Image.new("RGB", (128, 128))
    ImageDraw.Draw(outline).ellipse((20, 30, 90, 100), outline="white", width=3)
    controls = [ControlRequest("TinyCanny", 0.8, outline, "")]
    settings = {"steps": 2, "seed": 5, "controls": controls, "progress": False}
    shared = Pipeline.from_package(shared_package, backend="reference")
    two_file = Pipeline.from_package(tiny_controlnet_package, backend="reference")
    ours, theirs = (np.asarray(pipeline(PROMPT, **settings).images[0]) for pipeline in (shared, two_file))
    assert shared.models["ControlledUnet"].function_name == "controlled"
    assert np.array_equal(ours, theirs)  # the same program on the same weights: bit for bit


@pytest.mark.parametrize(("argv", "line"), [
    (["--shared-controlled-unet"],
     "Error: --shared-controlled-unet stores the ControlledUnet that ControlNets need in the Unet's package: pass "
     "--controlnet ID_OR_PATH too, or drop it"),
    (["--shared-controlled-unet", "--controlnet", "NET", "--min-target", "iOS17"],
     "Error: --min-target iOS17 is lower than --shared-controlled-unet (a multifunction Unet) needs (iOS18 / "
     "macOS15): raise --min-target to iOS18 or leave it out"),
    (["--shared-controlled-unet", "--controlnet", "NET", "--bundle-resources"],
     "Error: --bundle-resources writes Apple's layout, whose Swift package loads ControlledUnet.mlmodelc by its file "
     "name: drop --shared-controlled-unet for a Swift bundle (apps that load function 'controlled' of the Unet by "
     "name use the package as is)"),
])
def test_bad_options_are_one_line(capsys, tmp_path, tiny_controlnets, argv, line):
    net = str(next(iter(tiny_controlnets)))
    code = convert_command(["--model", "tiny", "-o", str(tmp_path / "out"),
                            *[net if argument == "NET" else argument for argument in argv]])
    lines = [text for text in capsys.readouterr().err.splitlines() if text.strip()]
    assert (code, lines) == (1, [line])
    assert not (tmp_path / "out").exists()


def test_the_core_ml_backend_loads_the_controlled_function_by_name(shared_package, monkeypatch, tmp_path):
    """Through the Core ML adapter (coremltools' CompiledMLModel stood in for by the executor), as an app that loads
    by function name: the same image as the reference executor's."""
    from coreml_sd.runtime import backends

    from coreml_standin import Compiler, core_ml_standin

    monkeypatch.setattr(backends, "core_ml_functions", core_ml_standin(Compiler()))
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    outline = Image.new("RGB", (128, 128))
    ImageDraw.Draw(outline).rectangle((30, 20, 100, 90), outline="white", width=3)
    settings = {"steps": 2, "seed": 6, "controls": [ControlRequest("TinyDepth", 1.0, outline, "")], "progress": False}
    reference = Pipeline.from_package(shared_package, backend="reference")(PROMPT, **settings).images[0]
    core_ml = Pipeline.from_package(shared_package, backend="coreml")
    assert np.array_equal(np.asarray(core_ml(PROMPT, **settings).images[0]), np.asarray(reference))
    assert core_ml.models["ControlledUnet"]._model.function_name == "controlled"
    assert core_ml.models["Unet"]._model.function_name is None  # the default function, Apple's plain Unet
