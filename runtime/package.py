"""Finding a package folder and reading what the runtime needs from it.

A package is a folder written by `coreml-convert` (`manifest.json`, `.mlpackage` files, `vocab.json`,
`merges.txt`) or a Swift `Resources/` bundle (`.mlmodelc` or `.mlpackage` files with the BPE files, often
without a manifest). Without a manifest, SD v1's settings apply; shapes always come from the models.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import GenerationError

PACKAGES_ENV = "COREML_SD_PACKAGES"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
MODEL_SUFFIXES = (".mlpackage", ".mlmodelc")
REQUIRED_COMPONENTS = ("TextEncoder", "Unet", "VAEDecoder")
OPTIONAL_COMPONENTS = ("VAEEncoder",)
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# SD v1.4's settings, for bundles that carry no manifest (Apple's published SD v1 bundles).
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SD_V1_SCALING_FACTOR = 0.18215
SD_V1_PREDICTION_TYPE = "epsilon"
SD_V1_PAD_TOKEN = "<|endoftext|>"  # SD 2.x's tokenizer pads with "!" instead; its manifest says so


@dataclass(frozen=True)
class Package:
    path: Path
    name: str
    components: dict[str, Path]  # component name -> model file; VAEEncoder may be absent
    vocab_file: Path
    merges_file: Path
    scheduler_config: dict
    scaling_factor: float
    prediction_type: str
    attention_implementation: str | None  # None when neither a manifest nor the models say
    pad_token: str = SD_V1_PAD_TOKEN  # what fills the 77 tokens after the end of the prompt

    def component(self, name: str) -> Path:
        if name not in self.components:
            raise GenerationError(
                f"package {self.name!r} has no {name}; convert it too "
                f"(coreml-convert ... --components TextEncoder,Unet,VAEDecoder,{name})"
            )
        return self.components[name]


def packages_root() -> Path:
    return Path(os.environ.get(PACKAGES_ENV) or Path.cwd() / "packages")


def _looks_like_package(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file() or any(p.suffix in MODEL_SUFFIXES for p in folder.iterdir())


def list_packages(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _looks_like_package(p))


def find_package(model: str | None, root: Path | None = None) -> Path:
    """The folder `--model` names: a package under the packages root by name, or any folder path."""
    root = packages_root() if root is None else root
    available = list_packages(root)
    if model is None:
        if len(available) == 1:
            return root / available[0]
        if not available:
            raise GenerationError(
                f"no packages in {root}; convert one (coreml-convert --model tiny -o {root / 'tiny'}) "
                "or pass --model PATH"
            )
        raise GenerationError(f"several packages in {root} ({', '.join(available)}); choose one with --model NAME")
    by_name = root / model
    if model in available:
        return by_name
    if Path(model).is_dir():
        return Path(model)
    listing = f"available: {', '.join(available)}" if available else f"{root} holds no packages"
    raise GenerationError(f"no package named {model!r} and no folder {model!r} ({listing})")


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"unreadable {path} ({exc}); reconvert the package with coreml-convert") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        raise GenerationError(f"{path} is not a coreml-sd manifest (no format_version); reconvert the package")
    if manifest["format_version"] > MANIFEST_FORMAT_VERSION:
        raise GenerationError(
            f"{path} has format {manifest['format_version']}, newer than this runtime reads "
            f"({MANIFEST_FORMAT_VERSION}); update coreml-sd"
        )
    return manifest


def _component_files(folder: Path) -> dict[str, Path]:
    """The components present, by the contract's file names: `<Name>.mlpackage` or, in Swift bundles, `.mlmodelc`."""
    files = {}
    for name in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS:
        present = [folder / (name + suffix) for suffix in MODEL_SUFFIXES if (folder / (name + suffix)).exists()]
        if present:
            files[name] = present[0]
    return files


def _attention_from_compiled_unet(unet: Path) -> str | None:
    """Core ML's compiled models list their op types; split-einsum attention is the one that uses einsum."""
    try:
        metadata = json.loads((unet / "metadata.json").read_text())[0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    histogram = metadata.get("mlProgramOperationTypeHistogram", {})
    return "split_einsum" if any(op.lower().endswith("einsum") for op in histogram) else "original"


def load_package(folder: Path) -> Package:
    folder = Path(folder)
    if not folder.is_dir():
        raise GenerationError(f"{folder} is not a folder; pass a package folder or a name under {packages_root()}")
    manifest = _read_manifest(folder)
    components = _component_files(folder)
    if manifest is None and not components:
        raise GenerationError(
            f"{folder} is not a package: no {MANIFEST_FILE} and no .mlpackage/.mlmodelc models; "
            "convert one with coreml-convert"
        )
    missing = [name for name in REQUIRED_COMPONENTS if name not in components]
    if "Unet" in missing and (folder / "UnetChunk1.mlmodelc").exists():
        raise GenerationError(f"{folder} holds a chunked Unet, which this runtime does not run; use an unchunked one")
    if missing:
        raise GenerationError(
            f"package {folder} lacks {', '.join(missing)} (no {' or '.join(m + '.mlpackage' for m in missing)}); "
            "reconvert it with coreml-convert"
        )
    for file_name in TOKENIZER_FILES:
        if not (folder / file_name).is_file():
            raise GenerationError(f"package {folder} lacks {file_name} (the CLIP tokenizer's files); reconvert it")
    manifest = manifest or {}
    scheduler_config = manifest.get("scheduler", SD_V1_SCHEDULER_CONFIG)
    if not isinstance(scheduler_config, dict):
        raise GenerationError(f"{folder / MANIFEST_FILE}: 'scheduler' is not a scheduler configuration; reconvert")
    attention = manifest.get("attention_implementation")
    if attention is None and components["Unet"].suffix == ".mlmodelc":
        attention = _attention_from_compiled_unet(components["Unet"])
    return Package(
        path=folder,
        name=folder.resolve().name,
        components=components,
        vocab_file=folder / "vocab.json",
        merges_file=folder / "merges.txt",
        scheduler_config=scheduler_config,
        scaling_factor=float(manifest.get("latent_scaling_factor", SD_V1_SCALING_FACTOR)),
        prediction_type=manifest.get("prediction_type", SD_V1_PREDICTION_TYPE),
        pad_token=manifest.get("pad_token", SD_V1_PAD_TOKEN),
        attention_implementation=attention,
    )
