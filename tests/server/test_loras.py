"""/sdapi/v1/loras: the LoRAs a package was converted with, as the converter recorded them in its manifest."""
import torch
from safetensors.torch import save_file

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.models.tiny import TEXT_WIDTH
from coreml_sd.runtime.server.packages import Catalogue

RANK = 2


def test_the_loras_baked_into_a_package_are_listed(tmp_path):
    generator = torch.Generator().manual_seed(0)
    layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora = tmp_path / "ink-style.safetensors"
    save_file({f"{layer}.lora_down.weight": torch.randn(RANK, TEXT_WIDTH, generator=generator),
               f"{layer}.lora_up.weight": torch.randn(TEXT_WIDTH, RANK, generator=generator),
               f"{layer}.alpha": torch.tensor(2.0)}, str(lora))
    root = tmp_path / "packages"
    convert_model(ConversionOptions(model="tiny", output=root / "inked", components=("TextEncoder",),
                                    loras=(f"{lora}:0.7",), validate=False))
    (root / "plain").mkdir()  # a folder that is no package is not offered
    catalogue = Catalogue(root)
    assert catalogue.names() == ["inked"]
    [item] = catalogue.loras()
    assert (item["name"], item["alias"], item["path"]) == ("ink-style.safetensors", "ink-style.safetensors", None)
    assert item["metadata"]["package"] == "inked" and item["metadata"]["scale"] == 0.7
    assert item["metadata"]["modules"] == ["text_encoder"]
