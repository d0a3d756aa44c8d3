"""SDXL base and refiner packages: Apple's XL contract, every component against diffusers in float32, the
float32 VAE, and the float16 overflow that validation refuses.

The expected values come from the diffusers/transformers modules in float32, called the way diffusers'
StableDiffusionXLPipeline calls them; the packages run on the reference executor.
"""
import copy
import json

import numpy as np
import pytest
import torch

from coreml_sd.converter.cli import main
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.program_stats import program_stats
from coreml_sd.converter.sources import resolve
from coreml_sd.runtime.executor import ReferenceModel, psnr

# Packages against diffusers, each a few dB under its measured worst output (split_einsum and original alike):
# measured 70.7, 69.2, 65.3 and 64.4 dB; the VAE computes in float32, 140.0 and 132.5 dB (float32 ulps apart, which
# another CPU's kernels may double: its floors sit further under, still far above float16's ~70 dB)
COMPONENT_PSNR_DB = {"TextEncoder": 67.0, "TextEncoder2": 66.0, "Unet": 62.0, "UnetRefiner": 61.0,
                     "VAEDecoder": 120.0, "VAEEncoder": 115.0}
PSNR_THRESHOLD_DB = 35.0  # the converter's release gate
BASE_COMPONENTS = ("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder")
REFINER_COMPONENTS = ("TextEncoder2", "UnetRefiner", "VAEDecoder")
# Apple's XL contract for tiny-xl's widths (CLIP-L 32, bigG 64 wide, projected to 64) at 128x128, batch 2.
XL_CONTRACT = {
    "TextEncoder": ({"input_ids": [1, 77]}, {"hidden_embeds": [1, 77, 32], "pooled_outputs": [1, 32]}),
    "TextEncoder2": ({"input_ids": [1, 77]}, {"hidden_embeds": [1, 77, 64], "pooled_outputs": [1, 64]}),
    "Unet": ({"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 96, 1, 77], "time_ids": [2, 6],
              "text_embeds": [2, 64]}, {"noise_pred": [2, 4, 16, 16]}),
    "UnetRefiner": ({"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 64, 1, 77],
                     "time_ids": [2, 5], "text_embeds": [2, 64]}, {"noise_pred": [2, 4, 16, 16]}),
    "VAEDecoder": ({"z": [1, 4, 16, 16]}, {"image": [1, 3, 128, 128]}),
}


def random_inputs(component: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    if component.startswith("TextEncoder"):
        ids = np.full((1, 77), 49407)
        ids[0, 0] = 49406
        ids[0, 1:12] = rng.randint(0, 49406, size=11)
        if component == "TextEncoder2":
            ids[0, 13:] = 0  # the second tokenizer pads with "!" after the end token
        return {"input_ids": ids.astype(np.float32)}
    if component.startswith("Unet"):
        width, sizes = (96, [1024, 768, 0, 64, 1024, 1024]) if component == "Unet" else (64, [1024, 768, 0, 64, 6.0])
        return {"sample": rng.randn(2, 4, 16, 16).astype(np.float16), "timestep": np.array([981, 1], dtype=np.float16),
                "encoder_hidden_states": rng.randn(2, width, 1, 77).astype(np.float16),
                "time_ids": np.array([sizes, sizes], dtype=np.float16),
                "text_embeds": rng.randn(2, 64).astype(np.float16)}
    if component == "VAEDecoder":
        return {"z": (rng.randn(1, 4, 16, 16) / 0.13025).astype(np.float16)}
    return {"x": rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float16)}


@torch.no_grad()
def diffusers_outputs(pipeline, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    if component.startswith("TextEncoder"):
        encoder = pipeline.text_encoder if component == "TextEncoder" else pipeline.text_encoder_2
        output = encoder(x["input_ids"].long(), output_hidden_states=True)
        return {
            "hidden_embeds": output.hidden_states[-2].numpy(),
            "pooled_outputs": output[0 if component == "TextEncoder2" else 1].numpy(),
            "hidden_embeds_3": output.hidden_states[-3].numpy(),  # clip skip 2's layer
        }
    if component.startswith("Unet"):
        context = x["encoder_hidden_states"].squeeze(2).permute(0, 2, 1)
        added = {"time_ids": x["time_ids"], "text_embeds": x["text_embeds"]}
        return {
            "noise_pred": pipeline.unet(
                x["sample"], x["timestep"], encoder_hidden_states=context, added_cond_kwargs=added
            ).sample.numpy()
        }
    if component == "VAEDecoder":
        return {"image": pipeline.vae.decode(x["z"]).sample.numpy()}
    moments = pipeline.vae.encode(x["x"]).latent_dist
    return {"latent": torch.cat([moments.mean, moments.logvar], dim=1).numpy()}


# The attention implementation changes the Unet and the VAE alone (the text encoders are the same files); the
# refiner's Unet is built from the base's block types, so its original-attention package would repeat the base's.
@pytest.mark.parametrize(("component", "implementation"),
                         [(component, "split_einsum") for component in (*BASE_COMPONENTS, "UnetRefiner")]
                         + [(component, "original") for component in ("Unet", "VAEDecoder", "VAEEncoder")])
def test_package_matches_diffusers(
    tiny_xl_packages, tiny_xl_pipeline, tiny_xl_refiner_pipeline, implementation, component
):
    model, pipeline = (
        ("tiny-xl-refiner", tiny_xl_refiner_pipeline) if component == "UnetRefiner" else ("tiny-xl", tiny_xl_pipeline)
    )
    inputs = random_inputs(component, seed=7)
    actual = ReferenceModel(tiny_xl_packages(model, implementation) / f"{component}.mlpackage").predict(inputs)
    expected = diffusers_outputs(pipeline, component, inputs)
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape
        assert psnr(expected[name], actual[name]) >= COMPONENT_PSNR_DB[component], name


@pytest.mark.parametrize("model", ["tiny-xl", "tiny-xl-refiner"])
def test_packages_follow_apples_xl_contract(tiny_xl_packages, model):
    folder = tiny_xl_packages(model)
    manifest = json.loads((folder / "manifest.json").read_text())
    expected = ("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder") if model == "tiny-xl" else REFINER_COMPONENTS
    assert set(expected) <= set(manifest["components"])
    for component in expected:
        entry = manifest["components"][component]
        inputs, outputs = XL_CONTRACT[component]
        assert entry["file"] == f"{component}.mlpackage" and (folder / entry["file"]).is_dir()
        assert {name: spec["shape"] for name, spec in entry["inputs"].items()} == inputs
        # the outputs Apple's Swift package reads, then a text encoder's clip skip layer
        clip_skip = {"hidden_embeds_3": [1, 77, outputs["hidden_embeds"][2]]} if "hidden_embeds" in outputs else {}
        assert {name: spec["shape"] for name, spec in entry["outputs"].items()} == outputs | clip_skip
        assert list(entry["outputs"])[: len(outputs)] == list(outputs)
    assert manifest["family"] == ("sdxl" if model == "tiny-xl" else "sdxl-refiner")
    assert manifest["latent_scaling_factor"] == 0.13025
    assert manifest["force_zeros_for_empty_prompt"] is (model == "tiny-xl")
    assert manifest["scheduler"]["_class_name"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("unet", ["Unet", "UnetRefiner"])
def test_no_tensor_above_rank_4_in_the_split_einsum_unet(tiny_xl_packages, unet):
    folder = tiny_xl_packages("tiny-xl" if unet == "Unet" else "tiny-xl-refiner")
    assert program_stats(folder / f"{unet}.mlpackage")["max_rank"] <= 4


def test_vae_computes_in_float32_and_says_where_to_run(tiny_xl_packages, tiny_xl_pipeline):
    folder = tiny_xl_packages()
    manifest = json.loads((folder / "manifest.json").read_text())
    for component in ("VAEDecoder", "VAEEncoder"):
        entry = manifest["components"][component]
        assert (entry["compute_precision"], entry["compute_units"]) == ("float32", "CPU_AND_GPU")
    weights = folder / "VAEDecoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    decoder = tiny_xl_pipeline.vae.decoder
    parameters = sum(p.numel() for p in [*decoder.parameters(), *tiny_xl_pipeline.vae.post_quant_conv.parameters()])
    assert 3.9 < weights.stat().st_size / parameters < 4.6  # float32: four bytes per parameter
    assert "compute_precision" not in manifest["components"]["Unet"]


def test_family_is_detected_from_model_index(tmp_path, tiny_xl_pipeline, tiny_xl_refiner_pipeline):
    tiny_xl_pipeline.save_pretrained(tmp_path / "base")
    tiny_xl_refiner_pipeline.save_pretrained(tmp_path / "refiner")
    base, refiner = resolve(str(tmp_path / "base")), resolve(str(tmp_path / "refiner"))
    assert (base.family.name, refiner.family.name) == ("sdxl", "sdxl-refiner")
    assert base.conditioning == {
        "text_width": 96,
        "pooled_width": 64,
        "time_ids_length": 6,
        "text_encoders": {"TextEncoder": (32, 32), "TextEncoder2": (64, 64)},
    }
    assert refiner.conditioning["time_ids_length"] == 5 and refiner.conditioning["text_width"] == 64
    assert (base.force_zeros_for_empty_prompt, refiner.force_zeros_for_empty_prompt) == (True, False)
    assert base.latent_scaling_factor == 0.13025
    assert resolve("tiny").family.name == "sd"


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory, tiny_xl_pipeline):
    """An SDXL-style model whose own VAE overflows float16 inside the decoder (its first convolution scaled
    by 1e5; the group norms after it bring float32 back to the usual range), and its unmodified VAE alone."""
    root = tmp_path_factory.mktemp("xl-vae")
    pipeline = copy.deepcopy(tiny_xl_pipeline)
    with torch.no_grad():
        pipeline.vae.decoder.conv_in.weight.mul_(1e5)
        pipeline.vae.decoder.conv_in.bias.mul_(1e5)
    pipeline.save_pretrained(root / "overflowing-model")
    tiny_xl_pipeline.vae.save_pretrained(root / "fixed-vae")
    return root / "overflowing-model", root / "fixed-vae"


def test_overflowing_float16_vae_is_refused_and_vae_swaps_in_another(vae_folders, tmp_path, capsys):
    model, fixed_vae = vae_folders
    output = tmp_path / "package"
    convert_model(ConversionOptions(model=str(model), output=output, components=("VAEDecoder",)))  # float32: fine
    assert (
        json.loads((output / "manifest.json").read_text())["components"]["VAEDecoder"]["validation"]["psnr_db"]
        >= PSNR_THRESHOLD_DB
    )

    capsys.readouterr()
    code = main(
        ["--model", str(model), "--components", "VAEDecoder", "--vae", str(model), "-o", str(tmp_path / "refused")]
    )
    error = capsys.readouterr().err
    assert code == 1
    last = error.strip().splitlines()[-1]
    assert last.startswith("Error: VAEDecoder: its float16 outputs hold inf/NaN") and "--vae" in last
    assert "Traceback" not in error
    assert not (tmp_path / "refused").exists()

    convert_model(
        ConversionOptions(model=str(model), output=tmp_path / "fixed", components=("VAEDecoder",), vae=str(fixed_vae))
    )
    manifest = json.loads((tmp_path / "fixed" / "manifest.json").read_text())
    entry = manifest["components"]["VAEDecoder"]
    assert entry["validation"]["psnr_db"] >= PSNR_THRESHOLD_DB and "compute_precision" not in entry  # float16
    assert manifest["source"]["vae"] == {"path": str(fixed_vae.resolve())}
