"""coreml-convert's command line: bad input gets one line and a non-zero exit, and leaves nothing."""
import os
import signal
import subprocess
import sys
import time

import pytest

from coreml_sd.converter.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "no-such-alias"], "unknown model"),
        (["--model", "./no/such/folder"], "is not a folder"),
        (["--model", "tiny", "--height", "100"], "multiple of 64"),
        (["--model", "tiny", "--components", "Unet,Vocoder"], "unknown component"),
        (["--model", "some-org/some-model"], "cannot reach the Hugging Face hub"),
        (["--model", "./no/such/model.safetensors"], "does not exist"),
        (["--model", "tiny", "--model-type", "sd1"], "apply to single-file checkpoints only"),
        (["--model", "tiny", "--lora", "./no/such/lora.safetensors:0.5"], "is not a file"),
        (["--model", "tiny", "--embedding", "./no/such/embedding.pt"], "is not a file"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    output = tmp_path / "out"
    code, text = run(capsys, *argv, "-o", str(output))
    lines = [line for line in text.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0]
    assert "Traceback" not in text
    assert not output.exists()


def test_hub_id_without_network_fails_fast(tmp_path):
    """No offline flag: the hub is really asked, and its absence is reported in one line."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "coreml_sd.converter.cli", "--model", "CompVis/stable-diffusion-v1-4",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_list_models_names_the_aliases(capsys):
    code, text = run(capsys, "--list-models")
    assert code == 0
    for alias, hub_id in [("sd-v1-4", "CompVis/stable-diffusion-v1-4"), ("sd-2-1-base", "stabilityai/stable-diffusion-2-1-base"), ("tiny", "")]:
        assert any(line.split()[0] == alias and hub_id in line for line in text.splitlines())


def test_interrupted_conversion_keeps_finished_components_only(tmp_path):
    output = tmp_path / "tiny"
    process = subprocess.Popen([sys.executable, "-m", "coreml_sd.converter.cli", "--model", "tiny", "-o", str(output)],
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("Unet        load"):  # the TextEncoder is installed before the Unet starts
            break
    time.sleep(1.0)  # inside the Unet's trace
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest
    names = sorted(p.name for p in output.iterdir())
    assert names == ["TextEncoder.mlpackage", "manifest.json", "merges.txt", "vocab.json"]
