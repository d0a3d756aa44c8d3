"""Model sources: a local diffusers folder and the Hugging Face cache, both without network."""
import hashlib
import json
import shutil

import pytest

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.models.tiny import clip_vocabulary_files


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("saved") / "tiny-sd"
    tiny_pipeline.save_pretrained(folder)
    return folder


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_folder_records_hashes_and_tokenizer_files(saved_folder, tmp_path):
    output = tmp_path / "out"
    convert_model(ConversionOptions(model=str(saved_folder), output=output, components=("TextEncoder",)))
    manifest = json.loads((output / "manifest.json").read_text())

    assert manifest["source"]["path"] == str(saved_folder)
    files = manifest["components"]["TextEncoder"]["settings"]["source"]["files"]
    assert files["text_encoder/model.safetensors"] == sha256(saved_folder / "text_encoder" / "model.safetensors")
    assert not any(name.startswith("unet/") for name in files)  # only what this conversion read
    # Whatever tokenizer files the folder holds, the package gets CLIP's vocab.json and merges.txt.
    vocab, merges = clip_vocabulary_files()
    assert json.loads((output / "vocab.json").read_text()) == json.loads(open(vocab).read())
    assert (output / "merges.txt").read_text().split("\n")[1:] == open(merges).read().split("\n")[1:]


def test_tokenizer_json_only_folder_gets_vocab_and_merges(saved_folder, tmp_path):
    folder = tmp_path / "tokenizer-json-only"
    shutil.copytree(saved_folder, folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    output = tmp_path / "out"
    convert_model(ConversionOptions(model=str(folder), output=output, components=("TextEncoder",)))
    vocab, _ = clip_vocabulary_files()
    assert json.loads((output / "vocab.json").read_text()) == json.loads(open(vocab).read())


def test_hub_id_is_read_from_the_local_cache_offline(saved_folder, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "hub" / "models--coreml-sd--tiny-sd"
    shutil.copytree(saved_folder, repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    report = convert_model(ConversionOptions(model="coreml-sd/tiny-sd", components=("TextEncoder",),
                                             output=tmp_path / "out"))
    manifest = json.loads((report.folder / "manifest.json").read_text())
    assert manifest["source"] == {"id": "coreml-sd/tiny-sd", "revision": None}
    assert report.converted == ["TextEncoder"]
