"""Packages run through the reference executor compute what the diffusers originals compute.

The expected values come from the original diffusers/transformers modules in float32, called the
way diffusers' StableDiffusionPipeline calls them; the packages compute in float16 on the executor.
"""
import json

import numpy as np
import pytest
import torch

from coreml_sd.converter.cli import main
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.validate import validation_inputs
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import TEXT_WIDTH
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.executor import ReferenceModel, psnr

# A few dB under what the tiny components measure (66-70 dB), so that a regression shows; the converter's own
# release gate (35 dB) is checked by the validation tests below.
PSNR_THRESHOLD_DB = 60.0
IMPLEMENTATIONS = ("split_einsum", "split_einsum_v2", "original")


def random_inputs(component: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    if component == "TextEncoder":
        ids = np.full((1, 77), 49407)
        ids[0, 0] = 49406
        ids[0, 1:12] = rng.randint(0, 49406, size=11)
        return {"input_ids": ids.astype(np.float32)}
    if component == "Unet":
        return {"sample": rng.randn(2, 4, 16, 16).astype(np.float16),
                "timestep": np.array([981, 1], dtype=np.float16),
                "encoder_hidden_states": rng.randn(2, 32, 1, 77).astype(np.float16)}
    if component == "VAEDecoder":
        return {"z": (rng.randn(1, 4, 16, 16) / 0.18215).astype(np.float16)}
    return {"x": rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float16)}


@torch.no_grad()
def diffusers_outputs(pipeline, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    if component == "TextEncoder":
        output = pipeline.text_encoder(x["input_ids"].long(), output_hidden_states=True)
        return {"last_hidden_state": output[0].numpy(), "pooled_outputs": output[1].numpy(),
                "hidden_embeds": output.hidden_states[-2].numpy()}  # clip skip 2's layer
    if component == "Unet":
        context = x["encoder_hidden_states"].squeeze(2).permute(0, 2, 1)
        return {"noise_pred": pipeline.unet(x["sample"], x["timestep"], encoder_hidden_states=context).sample.numpy()}
    if component == "VAEDecoder":
        return {"image": pipeline.vae.decode(x["z"]).sample.numpy()}
    moments = pipeline.vae.encode(x["x"]).latent_dist
    return {"latent": torch.cat([moments.mean, moments.logvar], dim=1).numpy()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("component", ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"])
def test_package_matches_diffusers(tiny_packages, tiny_pipeline, implementation, component):
    inputs = random_inputs(component, seed=7)
    actual = ReferenceModel(tiny_packages(implementation) / f"{component}.mlpackage").predict(inputs)
    expected = diffusers_outputs(tiny_pipeline, component, inputs)
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape
        assert psnr(expected[name], actual[name]) >= PSNR_THRESHOLD_DB, name


@pytest.mark.parametrize("component", ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"])
def test_manifest_records_the_psnr_the_package_measures(tiny_packages, tiny_pipeline, component):
    """The manifest's validation figure is the package's worst-output PSNR against diffusers on the converter's
    seed-0 inputs, measured again here with the test's own diffusers calls."""
    folder = tiny_packages("split_einsum")
    validation = json.loads((folder / "manifest.json").read_text())["components"][component]["validation"]
    assert validation["seed"] == 0
    spec = SD.spec(component, ModelDimensions(TEXT_WIDTH, 128, 128, unet_batch_size=2, clip_skip_layers=2))
    inputs = validation_inputs(spec, seed=0, latent_scaling_factor=tiny_pipeline.vae.config.scaling_factor)
    actual = ReferenceModel(folder / f"{component}.mlpackage").predict(inputs)
    expected = diffusers_outputs(tiny_pipeline, component, inputs)
    assert validation["psnr_db"] == pytest.approx(
        min(psnr(expected[name], actual[name]) for name in expected), abs=0.01
    )


@pytest.fixture(scope="module")
def overflowing_folder(tmp_path_factory, tiny_pipeline):
    """A model whose VAE decoder overflows float16: its last convolution scaled far beyond 65504."""
    import copy

    folder = tmp_path_factory.mktemp("overflow") / "tiny-overflow"
    pipeline = copy.deepcopy(tiny_pipeline)
    with torch.no_grad():
        pipeline.vae.decoder.conv_out.weight.mul_(1e6)
    pipeline.save_pretrained(folder)
    return folder


def test_failed_validation_installs_nothing_and_keeps_what_was_valid(overflowing_folder, tmp_path):
    output = tmp_path / "package"
    convert_model(ConversionOptions(model=str(overflowing_folder), output=output, components=("TextEncoder",)))
    with pytest.raises(ConversionError, match="VAEDecoder: its float16 outputs hold inf/NaN"):
        convert_model(ConversionOptions(model=str(overflowing_folder), output=output, components=("VAEDecoder",)))
    assert sorted(p.name for p in output.iterdir()) == [
        "TextEncoder.mlpackage",
        "manifest.json",
        "merges.txt",
        "vocab.json",
    ]
    assert list(json.loads((output / "manifest.json").read_text())["components"]) == ["TextEncoder"]

    convert_model(
        ConversionOptions(model=str(overflowing_folder), output=output, components=("VAEDecoder",), validate=False)
    )
    assert (output / "VAEDecoder.mlpackage").is_dir()


def test_validate_only_prints_a_table_and_fails_on_a_bad_package(overflowing_folder, tiny_packages, tmp_path, capsys):
    output = tmp_path / "package"
    convert_model(
        ConversionOptions(
            model=str(overflowing_folder), output=output, components=("TextEncoder", "VAEDecoder"), validate=False
        )
    )
    assert main(["--validate-only", str(output)]) == 1
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    # the overflow is in the VAE: the text encoder is tiny's, whose PSNR the test above measures
    tiny_figure = json.loads((tiny_packages("split_einsum") / "manifest.json").read_text())["components"]["TextEncoder"]
    assert rows["TextEncoder"][-1] == "ok" and float(rows["TextEncoder"][1]) == pytest.approx(
        tiny_figure["validation"]["psnr_db"], abs=0.05)  # the table prints one decimal
    assert rows["VAEDecoder"][-1] == "FAILED"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["components"]["TextEncoder"]["validation"] == tiny_figure["validation"]
