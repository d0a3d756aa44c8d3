"""--quantize-recipe: Apple's mixed-bit recipes (the JSON of ml-stable-diffusion's mixed_bit_compression_pre_analysis)
applied to the tiny Unet: each named layer in a palette of exactly 2^bits entries, 16-bit layers in float16, the
package as large as the recipe predicts, computing what the original with the same palettes computes."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coreml_sd.converter.cli import main
from coreml_sd.converter.compression.palettize import WEIGHT_THRESHOLD, palette
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.program_stats import load_program
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.executor.ops.constexpr import constexpr_lut_to_dense_ios16

PSNR_THRESHOLD_DB = 60.0  # measured: 65 dB against the same palettes applied in PyTorch
SIZE_TOLERANCE = 0.02

# Apple's format as its pre-analysis writes it (other keys it writes, `single_layer`, `cumulative`, are left out
# here; they are not read): recipes by name, each diffusers Unet module name -> bits, 16 = float16.
APPLE_RECIPES = """{
  "model_version": "tiny",
  "baselines": {"original": 80.1, "linear_8bit": 45.2, "recipe_5.03_bit_mixedpalette": 41.0},
  "recipes": {
    "recipe_5.03_bit_mixedpalette": {
      "down_blocks.0.resnets.0.conv1": 8,
      "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 4,
      "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": 6,
      "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": 2,
      "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": 1,
      "mid_block.resnets.0.conv1": 16,
      "up_blocks.0.resnets.0.conv_shortcut": 4,
      "up_blocks.1.attentions.1.proj_out": 6,
      "up_blocks.2.resnets.0.conv1": 8,
      "time_embedding.linear_2": 16,
      "up_blocks.1.upsamplers.0.conv": 4,
      "down_blocks.2.resnets.0.time_emb_proj": 2
    }
  }
}"""
ALL_LAYERS = "every_layer"
CYCLE = (4, 6, 16, 8, 2, 1)


def large_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.numel() > WEIGHT_THRESHOLD}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_pipeline) -> Path:
    """Apple's file above, plus a recipe giving every large layer of the tiny Unet bits in turn."""
    document = json.loads(APPLE_RECIPES)
    document["recipes"][ALL_LAYERS] = {name: CYCLE[index % len(CYCLE)]
                                       for index, name in enumerate(large_layers(tiny_pipeline.unet))}
    path = tmp_path_factory.mktemp("recipes") / "tiny_palettization_recipe.json"
    path.write_text(json.dumps(document, indent=2))
    return path


@pytest.fixture(scope="module")
def recipe_unet(tmp_path_factory, recipe_file) -> Path:
    output = tmp_path_factory.mktemp("tiny-recipe")
    report = convert_model(ConversionOptions(model="tiny", output=output, components=("Unet",),
                                             quantize_recipe=f"{recipe_file}:{ALL_LAYERS}"))
    assert report.converted == ["Unet"]
    return output


def program_weights(package: Path) -> list[tuple[str, np.ndarray, int | None]]:
    """(op name, dense float16 weight, palette entries or None for a float16 constant) of every large weight."""
    weights = []
    for op in load_program(package).functions["main"].operations:
        if op.op_type == "constexpr_lut_to_dense":
            dense = constexpr_lut_to_dense_ios16(op.indices.val, op.lut.val, op.shape.val)
            weights.append((op.name, dense, op.lut.val.size))
        elif op.op_type == "const" and getattr(op.outputs[0].val, "size", 0) > WEIGHT_THRESHOLD:
            weights.append((op.name, op.outputs[0].val, None))
    return weights


def scaled_psnr(original: np.ndarray, stored: np.ndarray) -> float:
    return psnr(original, stored * (original @ stored) / (stored @ stored))


def test_each_named_layer_gets_a_palette_of_its_bits(recipe_unet, recipe_file, tiny_pipeline):
    recipe = json.loads(recipe_file.read_text())["recipes"][ALL_LAYERS]
    weights = program_weights(recipe_unet / "Unet.mlpackage")
    layers = large_layers(tiny_pipeline.unet)
    assert set(recipe) == set(layers)
    matched = set()
    for name, bits in recipe.items():
        original = layers[name].weight.detach().numpy().reshape(-1)
        # The program's weight is the one closest to the layer's original (same size; random weights differ), up to
        # a factor: coremltools folds the attention's scale into the query's weights.
        candidates = [(scaled_psnr(original, dense.reshape(-1).astype(np.float64)), op, entries)
                      for op, dense, entries in weights if dense.size == original.size]
        similarity, op, entries = max(candidates, key=lambda candidate: candidate[0])
        matched.add(op)
        if bits == 16:
            assert entries is None and similarity > 70, (name, similarity)  # float16 rounding only
        else:
            assert entries == 2**bits, (name, bits, entries)
            assert similarity > 4 * bits - 2, (name, bits, similarity)  # a palette's cost: about 5-6 dB a bit
    assert len(matched) == len(recipe)
    manifest = json.loads((recipe_unet / "manifest.json").read_text())["components"]["Unet"]
    assert manifest["quantize_recipe"]["name"] == ALL_LAYERS


def test_package_is_as_large_as_the_recipe_predicts(recipe_unet, recipe_file, tiny_pipeline, tiny_packages):
    recipe = json.loads(recipe_file.read_text())["recipes"][ALL_LAYERS]
    layers = large_layers(tiny_pipeline.unet)
    palettized = {id(layers[name].weight): bits for name, bits in recipe.items() if bits != 16}
    # Apple's size (bits per element of each weight), plus each palette's 2^bits float16 entries, each tensor stored
    # with a 64-byte record at 64-byte alignment, as Core ML's weight file stores it.
    def stored(size: float) -> int:
        return 64 + int(np.ceil(size / 64)) * 64

    predicted = sum(stored(parameter.numel() * palettized.get(id(parameter), 16) / 8)
                    for parameter in tiny_pipeline.unet.parameters())
    predicted += sum(stored(2 * 2**bits) for bits in palettized.values())
    entry = json.loads((recipe_unet / "manifest.json").read_text())["components"]["Unet"]["quantize_recipe"]
    assert entry["predicted_weight_bytes"] == predicted
    sizes = {id(layers[name].weight): layers[name].weight.numel() for name in recipe}
    assert entry["average_bits"] == pytest.approx(sum(sizes[id(layers[n].weight)] * b for n, b in recipe.items())
                                                  / sum(sizes.values()), abs=1e-3)

    def weights_bytes(folder: Path) -> int:
        return next((folder / "Unet.mlpackage").rglob("weight.bin")).stat().st_size

    assert weights_bytes(recipe_unet) == pytest.approx(predicted, rel=SIZE_TOLERANCE)  # measured: 0.2% under
    assert weights_bytes(recipe_unet) < 0.45 * weights_bytes(tiny_packages())  # measured: 0.42


def test_recipe_unet_computes_what_the_original_with_the_same_palettes_computes(recipe_unet, recipe_file,
                                                                               tiny_pipeline):
    recipe = json.loads(recipe_file.read_text())["recipes"][ALL_LAYERS]
    rng = np.random.RandomState(1)
    inputs = {"sample": rng.randn(2, 4, 16, 16).astype(np.float16),
              "timestep": np.array([981, 1], dtype=np.float16),
              "encoder_hidden_states": rng.randn(2, 32, 1, 77).astype(np.float16)}
    actual = ReferenceModel(recipe_unet / "Unet.mlpackage").predict(inputs)["noise_pred"]

    unet = copy.deepcopy(tiny_pipeline.unet)
    layers = large_layers(unet)
    with torch.no_grad():
        for name, bits in recipe.items():
            if bits != 16:
                weight = layers[name].weight
                centroids, indices = palette(weight.numpy(), bits)
                weight.copy_(torch.from_numpy(centroids[indices].reshape(weight.shape)))
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    with torch.no_grad():
        expected = unet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)).sample
    assert psnr(expected.numpy(), actual) >= PSNR_THRESHOLD_DB
    validation = json.loads((recipe_unet / "manifest.json").read_text())["components"]["Unet"]["validation"]
    assert validation["psnr_db"] >= PSNR_THRESHOLD_DB
    assert validation["quantize_recipe"] == ALL_LAYERS
    assert validation["unquantized_psnr_db"] < validation["psnr_db"]


def test_recipe_is_part_of_the_unets_settings(recipe_unet, recipe_file):
    """A rerun with another recipe (or another file) converts the Unet again."""
    import hashlib

    settings = json.loads((recipe_unet / "manifest.json").read_text())["components"]["Unet"]["settings"]
    assert settings["quantize_recipe"] == {"file_sha256": hashlib.sha256(recipe_file.read_bytes()).hexdigest(),
                                           "name": ALL_LAYERS}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(text)
    return str(path)


def refusal(tmp_path: Path, capsys, *arguments: str) -> str:
    output = tmp_path / "out"
    assert main(["--model", "tiny", "-o", str(output), "--components", "Unet", *arguments]) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not output.exists()
    return err


def test_bad_recipes_are_refused_in_one_line(tmp_path, capsys):
    apple = json.loads(APPLE_RECIPES)
    name = next(iter(apple["recipes"]))
    assert "is not JSON" in refusal(tmp_path, capsys, "--quantize-recipe", write(tmp_path, "recipes: {"))
    assert "not in Apple's recipe format" in refusal(tmp_path, capsys, "--quantize-recipe",
                                                     write(tmp_path, json.dumps(apple["recipes"][name])))
    assert f"has no recipe 'recipe_4_bit': choose one of {name}" in refusal(
        tmp_path, capsys, "--quantize-recipe", write(tmp_path, APPLE_RECIPES) + ":recipe_4_bit")
    odd = copy.deepcopy(apple)
    odd["recipes"][name]["up_blocks.1.upsamplers.0.conv"] = 3
    assert "gives up_blocks.1.upsamplers.0.conv 3 bits" in refusal(tmp_path, capsys, "--quantize-recipe",
                                                                    write(tmp_path, json.dumps(odd)))
    xl = copy.deepcopy(apple)
    xl["recipes"][name]["down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q"] = 4
    assert "names 1 layer(s) this model's Unet lacks (down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q)" in \
        refusal(tmp_path, capsys, "--quantize-recipe", write(tmp_path, json.dumps(xl)))
    assert "pass one of the two" in refusal(tmp_path, capsys, "--quantize-recipe", write(tmp_path, APPLE_RECIPES),
                                            "--quantize-nbits", "4")
    several = copy.deepcopy(apple)
    several["recipes"]["recipe_2.00_bit_mixedpalette"] = {"mid_block.resnets.0.conv1": 2}
    listing = refusal(tmp_path, capsys, "--quantize-recipe", write(tmp_path, json.dumps(several)))
    assert "holds 2 recipes" in listing and f"{name}, recipe_2.00_bit_mixedpalette" in listing
