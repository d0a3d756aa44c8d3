"""--mixed-bit-analysis and --quantize-bits on the tiny model: recipes in Apple's format that --quantize-recipe reads,
at the averages their names say, spending bits as the estimates ask; a package palettized as its recipe says."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_recipe import large_layers, program_weights, refusal, scaled_psnr

from coreml_sd.converter.cli import main
from coreml_sd.converter.compression.analysis import build_recipe
from coreml_sd.converter.compression.mixed_bit import ANALYSIS_FILE, analyse
from coreml_sd.converter.compression.recipe import read_recipe, recipe_layers
from coreml_sd.converter.compression.unet_inputs import PROMPTS
from coreml_sd.converter.sources import resolve

RECIPE_NAME = re.compile(r"recipe_(\d+\.\d\d)_bit_mixedpalette")
APPLE_BITS = {1, 2, 4, 6, 8, 16}
TARGET = 4.5


@pytest.fixture(scope="module")
def bits_package(tmp_path_factory) -> Path:
    """The tiny Unet converted with --quantize-bits 4.5 (validation off: the palettes are read back here)."""
    output = tmp_path_factory.mktemp("tiny-bits")
    assert main(["--model", "tiny", "-o", str(output), "--components", "Unet", "--quantize-bits", str(TARGET),
                 "--no-validate"]) == 0
    return output


@pytest.fixture(scope="module")
def analysis_file(bits_package) -> Path:
    return bits_package / ANALYSIS_FILE


def test_analysis_file_is_apples_format_and_quantize_recipe_reads_it(analysis_file, tiny_pipeline):
    document = json.loads(analysis_file.read_text())
    assert {"model_version", "recipes", "single_layer"} <= set(document)
    layers = large_layers(tiny_pipeline.unet)
    assert len(document["recipes"]) >= 5
    for name, recipe in document["recipes"].items():
        assert RECIPE_NAME.fullmatch(name), name
        assert set(recipe) == set(layers)  # diffusers' own module names, every palettizable layer
        assert set(recipe.values()) <= APPLE_BITS and len(set(recipe.values())) > 1
        parsed = read_recipe(f"{analysis_file}:{name}")  # what --quantize-recipe FILE:NAME reads
        assert parsed.bits == recipe and set(recipe_layers(tiny_pipeline.unet, parsed)) == set(layers)
    assert set(document["single_layer"]) == {"1", "2", "4", "6", "8"}
    for nbits, measured in document["single_layer"].items():
        assert measured.pop("metadata")["nbits"] == int(nbits)
        assert set(measured) == set(layers)
        assert all(len(psnrs) == len(PROMPTS) for psnrs in measured.values())
    # each layer suffers less at 8 bits than at 1 (one random probe per call: the estimate is noisy in between)
    worse = [name for name in layers
             if sum(document["single_layer"]["8"][name]) <= sum(document["single_layer"]["1"][name])]
    assert not worse, worse


def test_recipes_average_the_bits_their_names_say(analysis_file, tiny_pipeline):
    document = json.loads(analysis_file.read_text())
    sizes = {name: layer.weight.numel() for name, layer in large_layers(tiny_pipeline.unet).items()}
    targets = {name: entry["target_bits"] for name, entry in document["analysis"]["recipes"].items()}
    assert sorted(targets.values()) == [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]
    for name, recipe in document["recipes"].items():
        average = sum(sizes[layer] * bits for layer, bits in recipe.items()) / sum(sizes.values())
        assert average == pytest.approx(float(RECIPE_NAME.fullmatch(name).group(1)), abs=0.005)
        assert targets[name] - 0.1 <= average <= targets[name]  # measured: at most 0.04 under on the tiny Unet


def test_recipes_are_nested(analysis_file):
    """A recipe of more bits never takes bits from a layer (a lower price per bit never does)."""
    recipes = json.loads(analysis_file.read_text())["recipes"]
    ordered = sorted(recipes, key=lambda name: float(RECIPE_NAME.fullmatch(name).group(1)))
    for smaller, larger in zip(ordered, ordered[1:]):
        assert all(recipes[smaller][layer] <= recipes[larger][layer] for layer in recipes[smaller]), (smaller, larger)


def test_a_layer_that_gains_more_from_every_bit_gets_at_least_as_many():
    """Of two layers of the same size, one whose estimated error falls at least as much as the other's with every
    added bit never gets fewer bits (estimates of the tiny Unet on 2 prompts x 2 steps)."""
    analysis = analyse(resolve("tiny"), prompts=PROMPTS[:2], steps=2)
    errors = {**analysis.estimate.totals(), 16: dict.fromkeys(analysis.sizes, 0.0)}
    widths = sorted(errors)

    def dominates(a: str, b: str) -> bool:
        return all(errors[low][a] - errors[high][a] >= errors[low][b] - errors[high][b]
                   for i, low in enumerate(widths) for high in widths[i + 1:])

    pairs = [(a, b) for a in analysis.sizes for b in analysis.sizes
             if a != b and analysis.sizes[a] == analysis.sizes[b] and dominates(a, b)]
    assert len(pairs) >= 20, len(pairs)
    for average in (2.5, 4.5, 6.5):
        recipe = build_recipe(analysis.sizes, analysis.estimate.totals(), average)
        assert all(recipe[a] >= recipe[b] for a, b in pairs), average


def test_quantize_bits_palettizes_as_its_recipe_says(bits_package, analysis_file, tiny_pipeline):
    document = json.loads(analysis_file.read_text())
    name = next(n for n, entry in document["analysis"]["recipes"].items() if entry["target_bits"] == TARGET)
    recipe = document["recipes"][name]
    entry = json.loads((bits_package / "manifest.json").read_text())["components"]["Unet"]
    assert entry["settings"]["quantize_bits"] == TARGET
    recorded = entry["quantize_recipe"]
    assert recorded["name"] == name and recorded["bits"] == recipe
    assert recorded["file_sha256"] == hashlib.sha256(analysis_file.read_bytes()).hexdigest()
    assert recorded["analysis"] == {"file": ANALYSIS_FILE, "target_bits": TARGET}
    assert recorded["average_bits"] == pytest.approx(float(RECIPE_NAME.fullmatch(name).group(1)), abs=0.005)
    # each layer's weight in the package (the one closest to the original, up to the query's folded scale) is a
    # palette of 2^bits entries, or float16 where the recipe says 16
    weights = program_weights(bits_package / "Unet.mlpackage")
    for layer_name, layer in large_layers(tiny_pipeline.unet).items():
        original = layer.weight.detach().numpy().reshape(-1)
        _, op, entries = max(((scaled_psnr(original, dense.reshape(-1).astype(np.float64)), op, entries)
                              for op, dense, entries in weights if dense.size == original.size),
                             key=lambda candidate: candidate[0])
        assert entries == (None if recipe[layer_name] == 16 else 2 ** recipe[layer_name]), (layer_name, op, entries)


def test_mixed_bit_analysis_writes_the_recipes_and_converts_nothing(analysis_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "tiny", "--mixed-bit-analysis", "recipes.json"]) == 0
    summary = capsys.readouterr().out.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes.json"]
    written, converted = (json.loads(path.read_text()) for path in (tmp_path / "recipes.json", analysis_file))
    averages = sorted(float(RECIPE_NAME.fullmatch(name).group(1)) for name in written["recipes"])
    assert len(summary.splitlines()) == 1, summary
    assert f"{len(averages)} recipes of {averages[0]:.2f} to {averages[-1]:.2f} bits per weight" in summary, summary
    assert written["recipes"] == converted["recipes"]  # seeded: the analysis --quantize-bits ran
    assert written["single_layer"] == converted["single_layer"]


def analysis_refusal(tmp_path: Path, capsys, *arguments: str) -> str:
    out = tmp_path / "recipes.json"
    assert main(["--model", "tiny", "--mixed-bit-analysis", str(out), *arguments]) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_bad_input_is_refused_in_one_line(tmp_path, capsys, analysis_file):
    recipe = f"{analysis_file}:{next(iter(json.loads(analysis_file.read_text())['recipes']))}"
    assert "pass one of the two" in refusal(tmp_path, capsys, "--quantize-bits", "4.5", "--quantize-nbits", "4")
    assert "pass one of the two" in refusal(tmp_path, capsys, "--quantize-bits", "4.5", "--quantize-recipe", recipe)
    assert "--quantize-bits 0.5 is outside 1 to 16" in refusal(tmp_path, capsys, "--quantize-bits", "0.5")
    assert "--quantize-bits 17 is outside 1 to 16" in refusal(tmp_path, capsys, "--quantize-bits", "17")
    assert "cannot be combined with --quantize-bits" in refusal(tmp_path, capsys, "--quantize-bits", "4",
                                                                "--unguided-function")
    assert "cannot be combined with --quantize-bits" in refusal(tmp_path, capsys, "--quantize-bits", "4",
                                                                "--max-prompt-chunks", "2")
    assert "pass one of them" in refusal(tmp_path, capsys, "--quantize-bits", "4", "--quantize-linear", "int8")
    assert "converts nothing: drop --quantize-bits" in analysis_refusal(tmp_path, capsys, "--quantize-bits", "4")
    assert "converts nothing: drop -o" in analysis_refusal(tmp_path, capsys, "-o", str(tmp_path / "out"))
    assert "--height 65 is not a positive multiple of 64" in analysis_refusal(tmp_path, capsys, "--height", "65")
    assert main(["--model", "tiny", "--mixed-bit-analysis", str(tmp_path / "missing" / "recipes.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert "give a file in an existing folder" in err and len(err.splitlines()) == 1, err
