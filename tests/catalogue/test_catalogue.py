"""Catalogues through a local Ray instance (2 CPUs): the packages equal the plain command's, a rerun converts
nothing, a worker that dies is retried, one that always dies is reported while the rest finishes, and a
task no node can hold is refused before anything runs. Tiny TextEncoders keep the tasks short."""
import hashlib
import json
from pathlib import Path

import pytest

from coreml_sd.converter.catalogue.run import run_catalogue
from coreml_sd.converter.cli import main
from coreml_sd.converter.errors import ConversionError

from catalogue_faults import STOP_CRASHING, crash_marker

VARIANTS = {  # package folder -> the plain command's options for it
    "tiny-split_einsum": ["--attention-implementation", "split_einsum"],
    "tiny-original-6bit": ["--attention-implementation", "original", "--quantize-nbits", "6"],
    "tiny-split_einsum-4bit-128x192": ["--quantize-nbits", "4", "--width", "128", "--height", "192"],
}
CATALOGUE = """
output = "out"
[[model]]
source = "tiny"
[[variant]]
attention_implementation = "split_einsum"
components = ["TextEncoder"]
[[variant]]
attention_implementation = "original"
quantize_nbits = 6
components = ["TextEncoder"]
[[variant]]
quantize_nbits = 4
width = 128
height = 192
components = ["TextEncoder"]
"""


pytestmark = pytest.mark.slow  # Ray's start and its worker processes: minutes on two cores


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalogue.toml").write_text(text)
    return folder / "catalogue.toml"


def contents(package: Path) -> dict:
    """What makes a package, without what differs between two runs of the plain command itself (the order of
    protobuf maps in model.mlmodel, the UUIDs in the .mlpackage's Manifest.json, file hashes that follow from
    them, the order of a set in the scheduler config): the weights, the program, the tokenizer files, and
    the manifest with its validation figures."""
    import coremltools as ct

    manifest = json.loads((package / "manifest.json").read_text())
    manifest["scheduler"]["_use_default_values"] = sorted(manifest["scheduler"].get("_use_default_values", []))
    for entry in manifest["components"].values():
        entry["files"] = sorted(entry["files"])
    weights = package / "TextEncoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {
        "weights": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "program": str(ct.utils.load_spec(str(package / "TextEncoder.mlpackage"))),
        "tokenizer": [(package / name).read_text() for name in ("vocab.json", "merges.txt")],
        "manifest": manifest,
    }


def index(folder: Path) -> dict:
    return json.loads((folder / "out" / "catalogue.json").read_text())


@pytest.fixture(scope="module")
def catalogue_run(ray_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    assert run_catalogue(write(folder, CATALOGUE), None, None, False) == 0
    return folder


def test_packages_equal_the_plain_commands(catalogue_run, tmp_path):
    for name, options in VARIANTS.items():
        plain = tmp_path / name
        assert main(["--model", "tiny", "--components", "TextEncoder", "-o", str(plain), *options]) == 0
        package = catalogue_run / "out" / name
        assert contents(package) == contents(plain), name
        entry = index(catalogue_run)["packages"][name]
        manifest = json.loads((plain / "manifest.json").read_text())
        assert entry["status"] == "done"
        assert entry["files"]["TextEncoder"]["validation"] == manifest["components"]["TextEncoder"]["validation"]
        assert entry["manifest"]["attention_implementation"] == manifest["attention_implementation"]
        assert entry["files"]["TextEncoder"]["size_mib"] > 0 and entry["components"]["TextEncoder"]["memory_gib"] < 1


def test_a_rerun_converts_nothing(catalogue_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (catalogue_run / "out").rglob("*") if p.is_file()}
    assert run_catalogue(catalogue_run / "catalogue.toml", None, None, False) == 0
    out = capsys.readouterr().out
    assert all(f"{name:<36} up to date" in out for name in VARIANTS), out
    after = {p: p.stat().st_mtime_ns for p in (catalogue_run / "out").rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "catalogue.json"} == \
        {p: t for p, t in before.items() if p.name != "catalogue.json"}
    assert index(catalogue_run)["summary"]["done"] == 3


def test_a_dead_worker_is_retried_and_one_that_always_dies_is_reported(ray_instance, tmp_path, capsys):
    catalogue = write(tmp_path, """
output = "out"
retries = 1
[[model]]
source = "tiny"
name = "crash-once"
[[model]]
source = "tiny"
name = "crash-always"
[[variant]]
components = ["TextEncoder"]
""")
    with pytest.raises(ConversionError, match=r"1 of 2 packages failed"):
        run_catalogue(catalogue, None, None, False)
    out = capsys.readouterr().out
    packages = index(tmp_path)["packages"]
    once, always = tmp_path / "out" / "crash-once-split_einsum", tmp_path / "out" / "crash-always-split_einsum"
    # Its first attempt died mid-conversion, the retry installed the component, and nothing staged is left.
    assert crash_marker(once, "TextEncoder").exists()
    assert packages[once.name]["status"] == "done"
    assert packages[once.name]["files"]["TextEncoder"]["validation"]["psnr_db"] > 60
    assert not list(once.glob(".partial-*"))
    assert packages[always.name]["status"] == "failed"
    assert "process died" in packages[always.name]["error"] and "2 attempts" in packages[always.name]["error"]
    assert f"{always.name:<36} TextEncoder   FAILED: its process died" in out
    assert not (always / "TextEncoder.mlpackage").exists()
    # Run again once the fault is gone: the failed package is converted, the finished one is not touched.
    (tmp_path / "out" / STOP_CRASHING).touch()
    assert run_catalogue(catalogue, None, None, False) == 0
    out = capsys.readouterr().out
    assert f"{once.name:<36} up to date" in out and f"{always.name:<36} TextEncoder   converted" in out
    assert index(tmp_path)["packages"][always.name]["status"] == "done"


def test_a_task_no_node_can_hold_is_refused_before_anything_runs(ray_instance, tmp_path, capsys):
    catalogue = write(tmp_path, """
output = "out"
[[model]]
source = "tiny"
[[variant]]
width = 4096
height = 4096
""")
    assert main(["--catalogue", str(catalogue)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: tiny-split_einsum-4096x4096 VAEDecoder needs ") and err.count("\n") == 1, err
    assert "the largest node has 4.0 GiB" in err
    assert not (tmp_path / "out").exists()
