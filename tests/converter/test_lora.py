"""LoRAs merged before conversion: kohya (with LoCon 3x3 convolutions and alphas) and diffusers/PEFT files,
each package against diffusers' own `load_lora_weights` + `fuse_lora` on the same weights."""
import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.validate import reference_outputs, validation_inputs, worst_psnr
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.sources import ModelParts
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.executor import ReferenceModel, psnr

# Packages with a LoRA merged against diffusers' fused pipeline: components measured 66.6-71.7 dB (worst output), the
# 3-step image 56.7-57.1 dB
COMPONENT_PSNR_DB = 63.0
IMAGE_PSNR_DB = 54.0
RANK = 4
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROMPT = "a photo of an astronaut riding a horse"


def random_pairs(module: torch.nn.Module, suffixes: tuple[str, ...], seed: int) -> dict[str, tuple]:
    """Random LoRA (down, up) pairs for the layers whose names end in `suffixes` (3x3 downs for 3x3 convs)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, layer in module.named_modules():
        if name.endswith(suffixes) and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = layer.weight
            down = torch.randn(RANK, *weight.shape[1:], generator=generator) * 0.15
            up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=generator) * 0.15
            pairs[name] = (down, up)
    return pairs


def kohya_lora(pipeline, path, alpha=2.0):
    """kohya's layout: lora_unet_/lora_te_ + the diffusers module path with '_' for '.', and an alpha each."""
    state = {}
    for prefix, module, suffixes in (("lora_unet_", pipeline.unet, UNET_LAYERS),
                                     ("lora_te_text_model_", pipeline.text_encoder, TEXT_LAYERS)):
        for name, (down, up) in random_pairs(module, suffixes, seed=len(prefix)).items():
            key = prefix + name.replace(".", "_")
            state.update(
                {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
            )
    save_file(state, str(path))
    return path


def diffusers_lora(pipeline, folder):
    """diffusers' layout (PEFT names), written by diffusers itself, alpha = rank (diffusers 0.42 with transformers 5
    cannot load a file that carries PEFT's lora_alpha metadata into the text encoder)."""
    layers = {}
    for module_name, module, suffixes in (
        ("unet", pipeline.unet, UNET_LAYERS[:4] + ("conv1",)),
        ("text_encoder", pipeline.text_encoder, TEXT_LAYERS[:2]),
    ):
        layers[module_name] = {
            f"{name}.lora_{kind}.weight": tensor
            for name, pair in random_pairs(module, suffixes, seed=7).items()
            for kind, tensor in zip("AB", pair)
        }
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"]
    )
    return folder / "pytorch_lora_weights.safetensors"


def fused(pipeline, path, scale):
    reference = copy.deepcopy(pipeline)
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=scale)
    reference.unload_lora_weights()
    return reference


def assert_package_matches(folder, reference):
    dims = ModelDimensions(text_width=32, height=128, width=128, unet_batch_size=2)
    for component in ("TextEncoder", "Unet"):
        spec = SD.spec(component, dims)
        inputs = validation_inputs(spec, seed=1, latent_scaling_factor=0.18215)
        module = SD.component(component).module
        expected = reference_outputs(
            ModelParts(**{module: getattr(reference, module)}), SD.component(component), spec, inputs
        )
        actual = ReferenceModel(folder / spec.file_name).predict(inputs)
        assert worst_psnr(expected, actual) >= COMPONENT_PSNR_DB, component
    runtime = Pipeline.from_package(folder, backend="reference")
    ours = runtime(PROMPT, steps=3, scheduler="euler", seed=4, progress=False).images[0]
    from runtime_testing import diffusers_txt2img, pixels

    expected_image = diffusers_txt2img(reference, runtime.package.scheduler_config, PROMPT, "", "euler", 3, seed=4)
    assert psnr(expected_image, pixels(ours)) >= IMAGE_PSNR_DB


def test_kohya_then_diffusers_lora_match_diffusers_and_reruns_follow_them(tmp_path, tiny_pipeline, tiny_variant,
                                                                          monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "runtime"))
    kohya = kohya_lora(tiny_pipeline, tmp_path / "style.safetensors")
    output = tmp_path / "package"
    # the tiny package with the LoRA: only the components it changes convert again
    tiny_variant(ConversionOptions(model="tiny", output=output, loras=(f"{kohya}:0.8",), validate=False),
                 ["TextEncoder", "Unet"])
    reference = fused(tiny_pipeline, kohya, 0.8)
    # The LoRA changes the model: without it the package would not match.
    assert not torch.equal(
        reference.unet.down_blocks[0].resnets[0].conv1.weight, tiny_pipeline.unet.down_blocks[0].resnets[0].conv1.weight
    )
    assert_package_matches(output, reference)
    manifest = json.loads((output / "manifest.json").read_text())
    recorded = manifest["components"]["Unet"]["settings"]["adapters"]
    assert recorded == [{"lora": "style.safetensors", "sha256": manifest["adapters"][0]["sha256"], "scale": 0.8}]
    assert "adapters" not in manifest["components"]["VAEDecoder"]["settings"]

    (tmp_path / "peft").mkdir()
    peft = diffusers_lora(tiny_pipeline, tmp_path / "peft")
    rerun = convert_model(ConversionOptions(model="tiny", output=output, loras=(str(peft),), validate=False))
    assert rerun.converted == ["TextEncoder", "Unet"] and rerun.skipped == ["VAEDecoder"]
    assert_package_matches(output, fused(tiny_pipeline, peft, 1.0))


def test_bad_loras_are_refused_in_one_line(tmp_path, tiny_pipeline):
    stray = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, RANK),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 32),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, RANK),
    }
    save_file(stray, str(tmp_path / "stray.safetensors"))
    with pytest.raises(ConversionError, match=r"down_blocks\.7\.attentions\.0\.proj_in matches no layer of the unet"):
        convert_model(
            ConversionOptions(model="tiny", output=tmp_path / "a", loras=(str(tmp_path / "stray.safetensors"),))
        )
    wide = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, RANK),
    }
    save_file(wide, str(tmp_path / "sd-size.safetensors"))
    with pytest.raises(ConversionError, match="is for another architecture"):
        convert_model(
            ConversionOptions(model="tiny", output=tmp_path / "b", loras=(str(tmp_path / "sd-size.safetensors"),))
        )
    with pytest.raises(ConversionError, match="not a number"):
        convert_model(
            ConversionOptions(
                model="tiny", output=tmp_path / "c", loras=(f"{tmp_path / 'sd-size.safetensors'}:strong",)
            )
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_peft_metadata_alpha_and_locon_merge_as_written_out(tmp_path, tiny_pipeline):
    """PEFT's lora_alpha (file metadata) and a kohya LoCon 3x3 pair, against W + scale * alpha/rank * up @ down
    written out here."""
    from coreml_sd.converter.adapters.lora import Lora

    conv = "down_blocks.0.resnets.0.conv1"
    pairs = random_pairs(tiny_pipeline.unet, (conv,), seed=3)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers={f"{conv}.lora_{k}.weight": t for k, t in zip("AB", pairs[conv])},
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": 8, "target_modules": ["conv1"]},
    )
    kohya = {
        f"lora_unet_{conv.replace('.', '_')}.lora_down.weight": pairs[conv][0],
        f"lora_unet_{conv.replace('.', '_')}.lora_up.weight": pairs[conv][1],
        f"lora_unet_{conv.replace('.', '_')}.alpha": torch.tensor(2.0),
    }
    save_file(kohya, str(tmp_path / "locon.safetensors"))
    down, up = pairs[conv]
    original = tiny_pipeline.unet.get_submodule(conv).weight
    product = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # PEFT's 3x3 delta
    for path, alpha, scale in (
        (tmp_path / "pytorch_lora_weights.safetensors", 8.0, 0.5),
        (tmp_path / "locon.safetensors", 2.0, 1.5),
    ):
        unet = copy.deepcopy(tiny_pipeline.unet)
        Lora.from_argument(f"{path}:{scale}").apply("unet", unet)
        expected = original + scale * alpha / RANK * product
        torch.testing.assert_close(unet.get_submodule(conv).weight, expected, rtol=1e-5, atol=1e-6)
