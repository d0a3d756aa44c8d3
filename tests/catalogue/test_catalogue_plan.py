"""Planning a catalogue, without Ray: package names, the memory each task reserves against the converter's
measured peaks, and one-line refusals of bad catalogue files."""
import json
import re
from pathlib import Path

import pytest
import transformers
from diffusers import PNDMScheduler

from coreml_sd.converter.cli import main
from coreml_sd.converter.models import tiny
from coreml_sd.converter.models.sd_v1_4 import SD_TEXT_ENCODER_CONFIG, SD_UNET_CONFIG, SD_VAE_CONFIG

# Peak RSS measured by scripts/bench_convert.py for the full-size SD v1.4 architecture at 512x512 (GiB): the
# Unet converting (2.33 split_einsum, 2.40 split_einsum_v2) and converting then validating in one process (4.44).
UNET_CONVERTING_GIB = 2.40
UNET_WITH_VALIDATION_GIB = 4.44


def config_only_sd_v1_4(folder: Path) -> Path:
    """SD v1.4's configurations as a diffusers folder, without weights: all a plan reads."""
    for name, config in (("unet", SD_UNET_CONFIG), ("vae", SD_VAE_CONFIG)):
        (folder / name).mkdir(parents=True)
        class_name = "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
        (folder / name / "config.json").write_text(json.dumps(dict(config, _class_name=class_name)))
    transformers.CLIPTextConfig(**SD_TEXT_ENCODER_CONFIG).save_pretrained(folder / "text_encoder")
    PNDMScheduler(**tiny.SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    tiny.build_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def dry_run(tmp_path: Path, text: str, capsys) -> tuple[int, dict[tuple[str, str], float], str]:
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(text)
    code = main(["--catalogue", str(catalogue), "--dry-run"])
    captured = capsys.readouterr()
    rows = re.findall(r"^(\S+)\s+(\w+)\s+([\d.]+) GiB", captured.out, re.MULTILINE)
    return code, {(package, component): float(gib) for package, component, gib in rows}, captured.err


def test_dry_run_shows_each_task_and_the_memory_measured_for_it(tmp_path, capsys):
    config_only_sd_v1_4(tmp_path / "sd14")
    code, memory, _ = dry_run(tmp_path, """
output = "out"
[[model]]
source = "sd14"
[[model]]
source = "tiny"
[[variant]]
attention_implementation = "split_einsum"
[[variant]]
attention_implementation = "original"
validate = false
[[variant]]
attention_implementation = "original"
quantize_nbits = 6
height = 768
width = 512
""", capsys)
    assert code == 0
    assert sorted({package for package, _ in memory}) == [
        "sd14-original", "sd14-original-6bit-512x768", "sd14-split_einsum",
        "tiny-original", "tiny-original-6bit-512x768", "tiny-split_einsum"]
    assert len(memory) == 18  # 6 packages x the family's 3 default components
    # The Unet reserves what it was measured to peak at, and a little more: never less.
    assert UNET_WITH_VALIDATION_GIB <= memory["sd14-split_einsum", "Unet"] <= 1.15 * UNET_WITH_VALIDATION_GIB
    assert UNET_CONVERTING_GIB <= memory["sd14-original", "Unet"] <= 1.15 * UNET_CONVERTING_GIB
    # The VAE's peak follows its activations: 1.5 times the pixels at 512x768.
    assert memory["sd14-original-6bit-512x768", "VAEDecoder"] > 1.3 * memory["sd14-split_einsum", "VAEDecoder"]
    for (package, component), gib in memory.items():
        if package.startswith("tiny"):
            assert gib < 1.0, (package, component)
            assert gib < memory["sd14" + package[4:], component]


@pytest.mark.parametrize(
    "text, message",
    [
        ('output = "out"\n[[model]]\nname = "x"\n[[variant]]\n', r"\[\[model\]\] 1: source is missing"),
        ('output = "out"\n[[model]]\nsource = "tiny"\n[[variant]]\nheigth = 512\n', r"unknown key\(s\) heigth"),
        (
            'output = "out"\n[[model]]\nsource = "tiny"\n[[variant]]\nheight = 500\n',
            r"--height 500 is not a positive multiple",
        ),
        (
            'output = "out"\n[[model]]\nsource = "tiny"\n[[variant]]\n[[variant]]\n',
            r"share the folder tiny-split_einsum",
        ),
        ('[[model]]\nsource = "tiny"\n[[variant]]\n', r"no output"),
    ],
)
def test_a_bad_catalogue_is_one_line_before_anything_runs(tmp_path, capsys, text, message):
    code, _, err = dry_run(tmp_path, text, capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("Error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dry-run"], "--ray-address, --max-parallel and --dry-run go with --catalogue FILE"),
        (["--catalogue", "c.toml", "--model", "tiny"], "leave out --model, -o and --validate-only"),
    ],
)
def test_catalogue_options_out_of_place_are_usage_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
