"""coreml-convert's faults: bad models and options, the hub's refusals, full disks, signals, concurrent runs."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from coreml_sd.converter.cli import main
from coreml_sd.converter.package_folder import PackageFolder

from hardening_testing import command, error_line, final_error_line

CONVERTER = "coreml_sd.converter.cli"


def convert(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny model as a diffusers folder, as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    tiny_pipeline.save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(tiny_folder, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_folder, tmp_path / "model"))


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["--model", "no-such-alias"],
            "Error: unknown model 'no-such-alias': use one of demo, tiny, tiny-inpainting, tiny-xl, "
            "tiny-xl-refiner, sd-v1-4, sd-v1-5, sd-2-base, sd-2-1-base, sd-2-1, sdxl-base, sdxl-refiner, "
            "sd-turbo, sdxl-turbo, a Hugging Face id (org/name), a local folder or a .safetensors/.ckpt file",
        ),
        (
            ["--model", "./no/such/folder"],
            "Error: ./no/such/folder is not a folder or a .safetensors/.ckpt file; pass a "
            "diffusers model folder, a single-file checkpoint, a Hugging Face id or an alias "
            "(coreml-convert --list-models)",
        ),
        (
            ["--model", "tiny", "--components", "Unet,Vocoder"],
            "Error: unknown component(s) Vocoder for Stable "
            "Diffusion 1.x/2.x: choose from TextEncoder, Unet, "
            "VAEDecoder, VAEEncoder, SafetyChecker",
        ),
    ],
)
def test_unknown_model_or_component(capsys, tmp_path, argv, line):
    code, err = convert(capsys, *argv, "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (1, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--model", "./no/such/model.safetensors"],
            "does not exist: pass the path of a .safetensors or .ckpt checkpoint",
        ),
        (["--model", "tiny", "--model-type", "sd1"], "apply to single-file checkpoints only"),
        (["--model", "tiny", "--lora", "./no/such/lora.safetensors:0.5"], "is not a file"),
        (["--model", "tiny", "--embedding", "./no/such/embedding.pt"], "is not a file"),
    ],
)
def test_missing_single_file_lora_or_embedding(capsys, tmp_path, argv, expected):
    code, err = convert(capsys, *argv, "-o", str(tmp_path / "out"))
    assert code == 1 and expected in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--model", "tiny", "--height", "100"], "Error: --height 100 is not a positive multiple of 64"),
        (["--model", "tiny", "--width", "0"], "Error: --width 0 is not a positive multiple of 64"),
    ],
)
def test_size_not_a_multiple_of_64(capsys, tmp_path, argv, line):
    code, err = convert(capsys, *argv, "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (1, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "layers, line",
    [
        ("0", "Error: --clip-skip-layers must be at least 1 (1: no layers beyond the family's own), not 0"),
        ("3", "Error: --clip-skip-layers 3 is past the text encoder's depth: TextEncoder has 2 layers, so clip skip "
              "goes up to 2"),  # the tiny text encoder has 2 layers
    ],
)
def test_clip_skip_layers_out_of_range(capsys, tmp_path, layers, line):
    code, err = convert(capsys, "--model", "tiny", "--clip-skip-layers", layers, "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (1, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            [],
            "Error: --model is required (e.g. --model tiny, --model sd-v1-4; see --list-models) "
            "(see coreml-convert --help)",
        ),
        (
            ["--model", "tiny", "--height", "tall"],
            "Error: Invalid value for '--height': 'tall' is not a valid integer. (see coreml-convert --help)",
        ),
        (
            ["--model", "tiny", "--quantize-nbits", "3"],
            "Error: Invalid value for '--quantize-nbits': '3' is not one of "
            "'1', '2', '4', '6', '8'. (see coreml-convert --help)",
        ),
    ],
)
def test_bad_command_line_is_a_usage_error(capsys, tmp_path, argv, line):
    code, err = convert(capsys, *argv, "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (2, line)
    assert not (tmp_path / "out").exists()


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = convert(capsys, "--model", "some-org/some-model", "-o", str(tmp_path / "out"))
    assert code == 1
    assert error_line(err) == (
        "Error: cannot reach the Hugging Face hub to download some-org/some-model, and it is not in the local cache: "
        "connect to the network (or log in and accept the model's license), or pass a local diffusers folder"
    )
    assert not (tmp_path / "out").exists()


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated or a missing repository (status and X-Error-Code)."""

    answers = {
        "gated": (403, "GatedRepo", "Access to model some-org/gated is restricted."),
        "missing": (404, "RepoNotFound", "Repository Not Found"),
    }

    def do_GET(self):
        status, code, message = self.answers["gated" if "gated" in self.path else "missing"]
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "model, line",
    [
        (
            "some-org/gated",
            "Error: some-org/gated is gated: accept its license on huggingface.co and log in (hf auth "
            "login), or pass a local diffusers folder",
        ),
        (
            "some-org/missing",
            "Error: some-org/missing was not found on the Hugging Face hub (or is private: log in with "
            "hf auth login), or pass a local diffusers folder",
        ),
        (
            "some-org/unreachable",
            "Error: cannot reach the Hugging Face hub to download some-org/unreachable, and it is "
            "not in the local cache: connect to the network (or log in and accept the model's "
            "license), or pass a local diffusers folder",
        ),
    ],
)
def test_hub_refusals(fake_hub, tmp_path, model, line):
    """A real huggingface_hub client against a hub on loopback: the gated and missing answers the real hub gives,
    and a hub that does not answer at all."""
    endpoint = fake_hub if model != "some-org/unreachable" else f"http://127.0.0.1:{free_port()}"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    env = dict({k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, **env)
    result = subprocess.run(
        [sys.executable, "-m", CONVERTER, "--model", model, "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert (result.returncode, error_line(result.stderr)) == (1, line)
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    code, err = convert(capsys, "--model", str(tmp_path / "photos"), "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (
        1,
        f"Error: {tmp_path / 'photos'} is not a diffusers model folder (no "
        "model_index.json): convert a folder saved with save_pretrained",
    )
    assert not (tmp_path / "out").exists()


def test_model_folder_without_its_unet(capsys, model_copy, tmp_path):
    import shutil

    shutil.rmtree(model_copy / "unet")
    code, err = convert(capsys, "--model", str(model_copy), "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (
        1,
        f"Error: {model_copy / 'unet' / 'config.json'} is missing: is "
        f"{model_copy} a diffusers Stable Diffusion folder?",
    )
    assert not (tmp_path / "out").exists()


def test_model_folder_without_its_tokenizer(capsys, model_copy, tmp_path):
    import shutil

    shutil.rmtree(model_copy / "tokenizer")
    code, err = convert(capsys, "--model", str(model_copy), "-o", str(tmp_path / "out"), "--components", "Unet")
    assert (code, error_line(err)) == (
        1,
        f"Error: {model_copy / 'tokenizer'} has neither vocab.json + merges.txt nor tokenizer.json",
    )
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(capsys, model_copy, tmp_path):
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, err = convert(capsys, "--model", str(model_copy), "-o", str(tmp_path / "out"), "--components", "VAEDecoder")
    assert (code, error_line(err)) == (1, f"Error: cannot load vae from {model_copy}: {weights} is truncated")
    assert not (tmp_path / "out").exists()


def test_safetensors_with_a_lying_header(capsys, model_copy, tmp_path):
    """The header promises tensors past the end of the file."""
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**9]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
    code, err = convert(capsys, "--model", str(model_copy), "-o", str(tmp_path / "out"), "--components", "VAEDecoder")
    assert (code, error_line(err)) == (1, f"Error: cannot load vae from {model_copy}: {weights} is truncated")
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file(capsys, tmp_path):
    (tmp_path / "out").write_text("notes")
    code, err = convert(capsys, "--model", "tiny", "-o", str(tmp_path / "out"))
    assert (code, error_line(err)) == (1, f"Error: {tmp_path / 'out'} is a file, not a folder; pass a folder to -o")
    assert (tmp_path / "out").read_text() == "notes"


def test_disk_full_while_saving_a_package(tmp_path):
    """No file may grow past 1 MB, as on a disk that fills up: the TextEncoder's 3 MB of weights cannot be saved."""
    output = tmp_path / "out"
    result = command(
        CONVERTER, "--model", "tiny", "-o", str(output), "--components", "TextEncoder", file_size_limit=2**20
    )
    assert result.returncode == 1
    line = final_error_line(result.stderr)
    assert line.startswith("Error: TextEncoder: convert failed: could not write its files (") and line.endswith(
        f"); free disk space where the package and the temporary folder {tempfile.gettempdir()} are, and run again"
    )
    assert not output.exists()


def stage_lines(process: subprocess.Popen, until: str) -> list[str]:
    """Read the conversion's stage lines up to and including the first that starts with `until`."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(until):
            return seen
    raise AssertionError(f"the conversion ended before {until!r}: {''.join(seen)}")


def start_conversion(output: Path, components: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", CONVERTER, "--model", "tiny", "-o", str(output), "--components", components],
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_keeps_finished_components(tmp_path):
    output = tmp_path / "tiny"
    process = start_conversion(output, "TextEncoder,Unet")
    # The TextEncoder is installed before the Unet starts; the Unet's trace, conversion and validation after its
    # load take tens of seconds, so the interrupt lands inside them even on a loaded machine.
    stage_lines(process, "Unet        load")
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=300) == 130
    assert final_error_line(rest) == "Error: interrupted: finished components were kept, nothing half-written"
    assert sorted(p.name for p in output.iterdir()) == [
        "TextEncoder.mlpackage",
        "manifest.json",
        "merges.txt",
        "vocab.json",
    ]


def test_killed_conversion_resumes(tmp_path, capsys):
    output = tmp_path / "tiny"
    process = start_conversion(output, "TextEncoder,VAEDecoder")
    stage_lines(process, "VAEDecoder  load")
    process.kill()
    process.wait(timeout=60)
    assert "VAEDecoder" not in json.loads((output / "manifest.json").read_text())["components"]
    code, err = convert(capsys, "--model", "tiny", "-o", str(output), "--components", "TextEncoder,VAEDecoder")
    assert code == 0
    assert "TextEncoder up to date (pass --force to convert again)" in err and "VAEDecoder  validate" in err
    assert not [p for p in output.iterdir() if p.name.startswith(".")]


def test_two_conversions_into_one_folder(capsys, tmp_path):
    output = tmp_path / "tiny"
    with PackageFolder(output).lock():
        code, err = convert(capsys, "--model", "tiny", "-o", str(output), "--components", "TextEncoder")
    assert (code, error_line(err)) == (
        1,
        f"Error: {output} is being converted by process {os.getpid()}; wait for it to finish or pass another -o",
    )
    assert [p.name for p in output.iterdir()] == []


def test_stale_lock_of_a_dead_process_is_taken_over(capsys, tmp_path):
    output = tmp_path / "tiny"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    output.mkdir()
    (output / ".lock").write_text(str(dead.pid))
    code, err = convert(capsys, "--model", "tiny", "-o", str(output), "--components", "TextEncoder")
    assert code == 0, err
    assert sorted(p.name for p in output.iterdir()) == [
        "TextEncoder.mlpackage",
        "manifest.json",
        "merges.txt",
        "vocab.json",
    ]
