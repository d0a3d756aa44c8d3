"""coreml-generate's faults beyond the option checks of tests/runtime/test_runtime_cli.py: prompts, images, steps,
outputs, a full disk."""
import json

from PIL import Image

from coreml_sd.runtime.cli import main

from hardening_testing import command, error_line, files_under, final_error_line

FAST = ["--steps", "1", "--scheduler", "ddim", "--backend", "reference", "--seed", "1"]


def generate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_empty_prompt_is_an_unconditional_image(tiny_package, tmp_path, capsys):
    code, out, err = generate(capsys, "", "--model", str(tiny_package), "-o", str(tmp_path / "empty.png"),
                              "--no-watermark", *FAST)
    assert code == 0 and err == ""
    assert Image.open(tmp_path / "empty.png").info["parameters"].startswith("\nSteps: 1, Sampler: DDIM")


def test_zero_byte_image(tiny_package, tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    code, out, err = generate(capsys, "x", "--model", str(tiny_package), "--image", str(tmp_path / "empty.png"),
                              "-o", str(tmp_path / "out"), *FAST)
    assert (code, error_line(err)) == (1, f"Error: {tmp_path / 'empty.png'} is empty (0 bytes); pass a PNG or JPEG")
    assert files_under(tmp_path / "out") == []


def test_absurdly_many_steps(tiny_package, tmp_path, capsys):
    code, out, err = generate(capsys, "x", "--model", str(tiny_package), "-o", str(tmp_path / "out"),
                              "--backend", "reference", "--steps", "1000000")
    assert (code, error_line(err)) == (1, "Error: --steps must be at most 1000, the model's training timesteps, "
                                          "not 1000000")
    assert files_under(tmp_path / "out") == []


def test_output_name_of_an_existing_file_that_is_not_a_png(tiny_package, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = generate(capsys, "x", "--model", str(tiny_package), "-o", str(tmp_path / "notes.txt"), *FAST)
    assert code == 1
    assert error_line(err).startswith(f"Error: cannot write to {tmp_path / 'notes.txt'} (")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_existing_png_is_replaced(tiny_package, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "out.png")
    code, out, err = generate(capsys, "x", "--model", str(tiny_package), "-o", str(tmp_path / "out.png"), *FAST)
    assert code == 0
    assert Image.open(tmp_path / "out.png").size == (128, 128)
    assert files_under(tmp_path) == ["out.png"]


def test_disk_full_while_saving_the_png(tiny_package, tmp_path):
    """No file may grow past 4 kB, as on a disk that fills up: the 128x128 PNG cannot be written."""
    result = command("coreml_sd.runtime.cli", "x", "--model", str(tiny_package), "-o", str(tmp_path / "out"),
                     *FAST, file_size_limit=4096)
    assert result.returncode == 1
    line = final_error_line(result.stderr)
    assert line.startswith(f"Error: cannot write {tmp_path / 'out' / 'x-1.png'} (") and "free disk space" in line
    assert files_under(tmp_path / "out") == []


def test_manifest_that_is_not_an_object(tiny_package, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(tiny_package, tmp_path / "copy")
    (copy / "manifest.json").write_text(json.dumps([1, 2, 3]))
    code, out, err = generate(capsys, "x", "--model", str(copy), "-o", str(tmp_path / "out"), *FAST)
    assert (code, error_line(err)) == (1, f"Error: {copy / 'manifest.json'} is not a coreml-sd manifest (no "
                                          "format_version); reconvert the package")
