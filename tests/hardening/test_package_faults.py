"""Damaged, foreign and tampered packages: named in one line before Core ML or the executor read them."""
import json
import os
import shutil

import pytest

from coreml_sd.converter.cli import main as convert_main
from coreml_sd.runtime.cli import main as generate_main

from hardening_testing import error_line, files_under

WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
PROGRAM = "Data/com.apple.CoreML/model.mlmodel"
ADVICE = "the package is damaged; convert again or copy it again"


def generate(capsys, package, *extra: str) -> tuple[int, str]:
    code = generate_main(["a lighthouse", "--model", str(package), "--steps", "1", "--scheduler", "ddim",
                          "--backend", "reference", "--seed", "1", "-o", str(package.parent / "images"), *extra])
    captured = capsys.readouterr()
    assert not files_under(package.parent / "images")
    return code, captured.err


def recorded_size(package, component: str, relative: str) -> int:
    manifest = json.loads((package / "manifest.json").read_text())
    return manifest["components"][component]["files"][relative]["size"]


def overwrite(path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def test_truncated_weight_file(package_copy, capsys):
    weights = package_copy / "Unet.mlpackage" / WEIGHTS
    expected = recorded_size(package_copy, "Unet", WEIGHTS)
    os.truncate(weights, 1000)
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == f"Error: Unet.mlpackage: {WEIGHTS} is 1,000 bytes, expected {expected:,}: {ADVICE}"


def test_weight_file_of_the_wrong_size(package_copy, capsys):
    weights = package_copy / "VAEDecoder.mlpackage" / WEIGHTS
    expected = recorded_size(package_copy, "VAEDecoder", WEIGHTS)
    with weights.open("ab") as file:
        file.write(b"\0" * 64)
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == (f"Error: VAEDecoder.mlpackage: {WEIGHTS} is {expected + 64:,} bytes, "
                               f"expected {expected:,}: {ADVICE}")


def test_missing_weight_file(package_copy, capsys):
    (package_copy / "TextEncoder.mlpackage" / WEIGHTS).unlink()
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == f"Error: TextEncoder.mlpackage: {WEIGHTS} is missing: {ADVICE}"


def test_damaged_blob_header_without_verify_is_a_load_error(package_copy, capsys):
    """Same size, so only reading it can tell: the executor's failure is one line naming the model."""
    overwrite(package_copy / "Unet.mlpackage" / WEIGHTS, 64, b"\xff" * 16)  # the first blob's metadata
    code, err = generate(capsys, package_copy)
    assert code == 1
    line = error_line(err)
    assert line.startswith(f"Error: cannot load {package_copy / 'Unet.mlpackage'} (") and "reconvert" in line


@pytest.mark.parametrize("relative", [WEIGHTS, PROGRAM])
def test_damaged_file_of_the_right_size_fails_verify(package_copy, capsys, relative):
    overwrite(package_copy / "Unet.mlpackage" / relative, 64, b"\xff" * 16)
    code, err = generate(capsys, package_copy, "--verify")
    assert code == 1
    line = error_line(err)
    assert line.startswith(f"Error: Unet.mlpackage: {relative} has SHA-256 ") and line.endswith(ADVICE)


def test_bad_protobuf(package_copy, capsys):
    program = package_copy / "TextEncoder.mlpackage" / PROGRAM
    program.write_bytes(b"\x08\x96\x01 not a protobuf " * (program.stat().st_size // 19 + 1))
    os.truncate(program, recorded_size(package_copy, "TextEncoder", PROGRAM))
    code, err = generate(capsys, package_copy)
    assert code == 1
    line = error_line(err)
    assert line.startswith(f"Error: cannot load {package_copy / 'TextEncoder.mlpackage'} (")


def test_validate_only_checks_hashes_first(package_copy, capsys):
    overwrite(package_copy / "Unet.mlpackage" / WEIGHTS, 64, b"\xff" * 16)
    code = convert_main(["--validate-only", str(package_copy)])
    captured = capsys.readouterr()
    assert code == 1
    line = error_line(captured.err)
    assert line.startswith(f"Error: Unet.mlpackage: {WEIGHTS} has SHA-256 ") and line.endswith(ADVICE)


def test_manifest_path_escaping_the_folder(package_copy, capsys):
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["components"]["Unet"]["file"] = "../../etc/passwd"
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    for code, err in (generate(capsys, package_copy),
                      (convert_main(["--validate-only", str(package_copy)]), capsys.readouterr().err)):
        assert code == 1
        assert error_line(err) == ("Error: the manifest names '../../etc/passwd', outside the package folder; the "
                                   "manifest is damaged or was tampered with: convert the package again")


def test_symlinked_file_pointing_outside(package_copy, tmp_path, capsys):
    weights = package_copy / "VAEDecoder.mlpackage" / WEIGHTS
    outside = tmp_path / "outside.bin"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == (f"Error: {weights} is a link to {outside}, outside the package folder; replace it "
                               "with the file itself (copy the package without links)")


def test_newer_manifest_format(package_copy, capsys):
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == (f"Error: {package_copy / 'manifest.json'} has format 99, newer than this runtime "
                               "reads (1); update coreml-sd")


def test_package_from_another_tool_without_tokenizer_files(tiny_package, tmp_path, capsys):
    """Apple's converter writes the models alone: the error says which two files to put where."""
    foreign = tmp_path / "apple"
    foreign.mkdir()
    for ours, theirs in [("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")]:
        shutil.copytree(tiny_package / f"{ours}.mlpackage",
                        foreign / f"Stable_Diffusion_version_tiny_{theirs}.mlpackage")
    code, err = generate(capsys, foreign)
    assert code == 1
    assert error_line(err) == (
        f"Error: {foreign} lacks vocab.json and merges.txt: put CLIP's tokenizer files vocab.json and merges.txt "
        f"(the model's tokenizer/ folder on Hugging Face has them) into {foreign}")


def test_manifest_of_the_wrong_shape(package_copy, capsys):
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["components"]["Unet"]["files"] = ["weight.bin"]
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = generate(capsys, package_copy)
    assert code == 1
    assert error_line(err) == (f"Error: {package_copy / 'manifest.json'}: component 'Unet' has a damaged file list; "
                               "the manifest is damaged: convert the package again")


def test_damaged_tokenizer_file(package_copy, capsys):
    merges = package_copy / "merges.txt"
    content = bytearray(merges.read_bytes())
    content[200] = 0xFF  # not UTF-8
    merges.write_bytes(bytes(content))
    code, err = generate(capsys, package_copy)
    assert code == 1
    line = error_line(err)
    assert line.startswith(f"Error: cannot read the tokenizer files vocab.json and merges.txt in {package_copy} (")
    assert line.endswith("the package is damaged; convert again or copy it again")
