"""Loading diffusers and transformers modules tensor by tensor gives what their own from_pretrained gives."""
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.sources import resolve
from coreml_sd.converter.sources.folders import load_diffusers_module, load_text_encoder

LOADERS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("saved") / "tiny-sd"
    tiny_pipeline.save_pretrained(folder)
    return folder


def assert_same_module(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    assert type(actual) is type(expected)
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert actual_state[name].dtype == tensor.dtype, name
        assert torch.equal(actual_state[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("module_name", ["unet", "vae"])
def test_module_matches_from_pretrained(saved_folder, module_name, dtype):
    loader = LOADERS[module_name]
    loaded = load_diffusers_module(loader, saved_folder / module_name, dtype)
    assert_same_module(loaded, loader.from_pretrained(saved_folder, subfolder=module_name, torch_dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("class_name, module_name", [("CLIPTextModel", "text_encoder"),
                                                     ("CLIPTextModelWithProjection", "text_encoder_2")])
def test_text_encoder_matches_from_pretrained(tmp_path, tiny_xl_pipeline, class_name, module_name, dtype):
    import transformers

    folder = tmp_path / module_name
    # small shards, so that the sharded layout (SDXL's hub TextEncoder2 has it) is read too
    getattr(tiny_xl_pipeline, module_name).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_text_encoder(class_name, folder, dtype)
    expected = getattr(transformers, class_name).from_pretrained(folder, torch_dtype=dtype)
    assert_same_module(loaded, expected)
    tokens = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).last_hidden_state, expected(tokens).last_hidden_state)


def test_legacy_attention_names_are_renamed_as_diffusers_does(saved_folder, tmp_path):
    """SD's hub VAEs still name the mid-block attention's projections query/key/value/proj_attn."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved_folder / "vae" / "config.json").read_bytes())
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in load_file(saved_folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        match = re.match(r"(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", name)
        state[f"{match[1]}.{legacy_names[match[2]]}.{match[3]}" if match else name] = tensor
    assert any(".query." in name for name in state)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")

    loaded = load_diffusers_module(AutoencoderKL, folder, torch.float16)
    assert_same_module(loaded, AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float16))


def test_weights_that_do_not_fit_the_config_are_one_clear_error(saved_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_in.weight"]
    save_file(state, weights)

    with pytest.raises(ConversionError, match="cannot load unet from .*missing conv_in.weight"):
        resolve(str(folder)).load("Unet", torch.float16)
