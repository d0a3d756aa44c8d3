"""`--bundle-resources`: a package folder's models as Apple's StableDiffusion Swift package loads them.

`StableDiffusionPipeline(resourcesAt:)` (and `StableDiffusionXLPipeline`) read `<Name>.mlmodelc` for each model
of the contract (`TextEncoder`, `TextEncoder2`, `Unet` or `UnetChunk1` + `UnetChunk2`, `UnetRefiner`, ...,
`VAEDecoder`, `VAEEncoder`, `SafetyChecker`) and `vocab.json`/`merges.txt` from one folder. On a Mac each package
is compiled into it with `xcrun coremlcompiler compile`; elsewhere the `.mlpackage`s go there under the same base
names (hard links where the disk allows), for Xcode to compile when it builds the app or for
`coremlcompiler` later. A `manifest.json` naming the placed files rides along for `coreml-generate`; the Swift
package does not read it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from coreml_sd.runtime.contract import (
    COMPILED_SUFFIX,
    MANIFEST_FILE,
    PACKAGE_SUFFIX,
    TOKENIZER_FILES,
)
from coreml_sd.runtime.integrity import inventory

from .errors import ConversionError
from .families import Family
from .package_folder import PARTIAL_PREFIX

RESOURCES = "Resources"


def can_compile() -> bool:
    """Core ML's compiler exists on macOS with Xcode's command-line tools only."""
    return sys.platform == "darwin" and shutil.which("xcrun") is not None


def compile_model(package: Path, destination: Path) -> Path:
    """`xcrun coremlcompiler compile`: `<destination>/<package's base name>.mlmodelc`."""
    result = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(destination)],
                            capture_output=True, text=True)
    compiled = destination / (package.stem + COMPILED_SUFFIX)
    if result.returncode != 0 or not compiled.is_dir():
        message = (result.stderr.strip() or result.stdout.strip()
                   or f"exit status {result.returncode}").splitlines()[-1]
        raise ConversionError(f"xcrun coremlcompiler could not compile {package.name}: {message}")
    return compiled


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, destination)


def place_package(package: Path, destination: Path) -> Path:
    placed = destination / package.name
    shutil.copytree(package, placed, copy_function=_link_or_copy)
    return placed


def missing_models(family: Family, components: dict) -> list[str]:
    """The family's default components that a package folder's manifest lists neither whole nor in chunks."""
    installed = {entry.get("chunk_of", name) for name, entry in components.items()}
    return [name for name in family.default_components if name not in installed]


EMBEDDINGS_FILE = "embeddings.json"


def embedding_expansions(manifest: dict) -> dict[str, str]:
    """TOKEN -> "TOKEN TOKENb ...": the text a prompt's TOKEN typed once stands for, for each embedding of more
    than one vector (an app replaces the word before tokenizing, as coreml-generate does)."""
    return {entry["tokens"][0]: " ".join(entry["tokens"]) for entry in manifest.get("adapters", [])
            if "embedding" in entry and len(entry.get("tokens", [])) > 1}


def write_bundle(folder: Path, family: Family, compile_with=None) -> Path:
    """Write `folder/Resources/` from the package folder `folder` (replacing an earlier one whole); `compile_with`
    is the compiler (`compile_model` on a Mac, by default)."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    missing = missing_models(family, manifest["components"])
    if missing:
        raise ConversionError(f"{folder} lacks {', '.join(missing)}, which {family.swift_pipeline} needs, so no "
                              f"{RESOURCES}/ was written: convert {'it' if len(missing) == 1 else 'them'} too "
                              f"(--components {','.join(family.default_components)})")
    if compile_with is None and can_compile():
        compile_with = compile_model
    staging = folder / (PARTIAL_PREFIX + RESOURCES)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        bundled = dict(manifest, components={})
        for name, entry in manifest["components"].items():
            package = folder / entry["file"]
            destination = staging / Path(entry["file"]).parent  # ControlNets: Resources/controlnet/<Name>
            destination.mkdir(parents=True, exist_ok=True)
            if compile_with is not None:
                model = compile_with(package, destination)
                files = inventory(model)
            else:
                model = place_package(package, destination)
                files = entry["files"]
            placed = model.relative_to(staging).as_posix()
            bundled["components"][name] = dict(entry, file=placed, files=files)
            print(f"{name:<11} {RESOURCES}/{placed}", file=sys.stderr, flush=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(folder / name, staging / name)
        expansions = embedding_expansions(manifest)
        if expansions:
            (staging / EMBEDDINGS_FILE).write_text(json.dumps(expansions, indent=2) + "\n")
        (staging / MANIFEST_FILE).write_text(json.dumps(bundled, indent=2) + "\n")
        _replace(staging, folder / RESOURCES)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    resources = folder / RESOURCES
    if compile_with is None:
        print(f"{resources} holds .mlpackage models, which the Swift package cannot load as they are: add them to "
              "your app target and Xcode compiles each to .mlmodelc when it builds the app, or on a Mac run "
              f"`xcrun coremlcompiler compile {resources}/<Name>{PACKAGE_SUFFIX} {resources}` for each")
    if family.name == "sdxl-refiner":
        print(f"{family.swift_pipeline} loads the refiner beside a base model: copy {resources}/UnetRefiner* "
              f"into the base model's {RESOURCES}/")
    return resources


def _replace(staging: Path, final: Path) -> None:
    previous = final.with_name(PARTIAL_PREFIX + final.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
