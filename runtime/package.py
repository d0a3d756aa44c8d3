"""Finding a package folder and reading what the runtime needs from it.

A package is a folder written by `coreml-convert` (`manifest.json`, `.mlpackage` files, `vocab.json`,
`merges.txt`), a Swift `Resources/` bundle (`.mlmodelc` or `.mlpackage` files with the BPE files, often without
a manifest; the folder itself or one holding `Resources/`), or the output folder of Apple's Python converter
(`Stable_Diffusion_version_<model>_unet.mlpackage`, ...). A Unet may come as two chunks (`UnetChunk1` and
`UnetChunk2`), run as one. Without a manifest, the family follows from the files (`TextEncoder2`: SDXL,
`UnetRefiner` alone: the SDXL refiner), its published settings apply, and the attention implementation is what
the Unet's own metadata records; shapes always come from the models.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import contract
from .backends import model_metadata
from .clip_skip import EncoderRecord
from .contract import (
    APPLE_CONVERTER_NAMES,
    APPLE_CONVERTER_PREFIX,
    BUNDLE_FOLDER,
    CHUNKED_COMPONENTS,
    COMPONENTS,
    CONTROLLED_UNET,
    CONTROLNET_FOLDER,
    CONTROLNET_PREFIX,
    FAMILY_CONTRACTS,
    MAIN_FUNCTION,
    MANIFEST_FILE,
    MODEL_SUFFIXES,
    SAFETY_CHECKER,
    TEXT_ENCODER_2,
    TEXT_LENGTH,
    TOKENIZER_FILES,
    UNET,
    UNET_REFINER,
    FamilyContract,
    chunk_names,
)
from .errors import GenerationError
from .integrity import check_files, inside
from .recommended import Recommended
from .safety import SD_FEATURE_EXTRACTOR, ClipPreprocessing
from .watermark import STABLE_DIFFUSION_V1, Watermark

PACKAGES_ENV = "COREML_SD_PACKAGES"
MANIFEST_FORMAT_VERSION = 1
ATTENTION_METADATA = "coreml_sd.attention_implementation"  # what coreml-convert records in each model
SD_V1_PAD_TOKEN = "<|endoftext|>"  # SD 2.x's tokenizer pads with "!" instead; its manifest says so


@dataclass(frozen=True)
class Package:
    path: Path
    name: str
    # component name -> its model file, or its two chunks in run order; VAEEncoder and SafetyChecker may be absent
    components: dict[str, tuple[Path, ...]]
    vocab_file: Path
    merges_file: Path
    scheduler_config: dict
    scaling_factor: float
    prediction_type: str
    attention_implementation: str | None  # None when neither a manifest nor the models say
    # The SafetyChecker's CLIP preprocessing (preprocessor_config.json) and the invisible watermark the images carry.
    feature_extractor: dict = field(default_factory=lambda: dict(SD_FEATURE_EXTRACTOR))
    watermark: Watermark = STABLE_DIFFUSION_V1
    family: str = "sd"  # "sd", "sdxl" or "sdxl-refiner"
    force_zeros_for_empty_prompt: bool = False
    compute_units: dict[str, str] = field(default_factory=dict)  # per component, where the manifest says
    recommended: Recommended = field(default_factory=Recommended)  # the sampling settings the model is made for
    # The Unet's batch-1 function for sampling without guidance, in a multifunction Unet (its default function
    # `main` takes batch 2, as Apple's Swift package loads it)
    unguided_function: str | None = None
    # The functions of multifunction models, as the manifest lists them: component -> function name -> (Unet batch,
    # prompt chunks); and the most 77-token prompt chunks the Unet takes (its functions for 1 ... K chunks).
    functions: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    max_prompt_chunks: int = 1
    # Components that are a function of another component's model files, by the function's name: the ControlledUnet
    # held in the Unet's package (--shared-controlled-unet), `components` giving it the Unet's files.
    component_functions: dict[str, str] = field(default_factory=dict)
    # textual-inversion embeddings: TOKEN -> its tokens, one per vector (TOKEN, TOKENb, ...)
    embeddings: dict[str, list[str]] = field(default_factory=dict)
    pad_token: str = SD_V1_PAD_TOKEN  # what fills the 77 tokens after the end of the prompt
    # per text encoder, what the manifest records for clip skip: its depth and final layer norm
    text_encoder_records: dict[str, EncoderRecord] = field(default_factory=dict)

    @property
    def contract(self) -> FamilyContract:
        return FAMILY_CONTRACTS[self.family]

    @property
    def required_components(self) -> tuple[str, ...]:
        return self.contract.required_components

    @property
    def unet_name(self) -> str:
        return self.contract.unet

    @property
    def controlnets(self) -> tuple[str, ...]:
        """The names of the package's ControlNets (`controlnet/<Name>` components)."""
        return tuple(name.removeprefix(CONTROLNET_PREFIX) for name in self.components
                     if name.startswith(CONTROLNET_PREFIX))

    def prompt_length_functions(self, name: str, batch: int) -> dict[int, str]:
        """A component's functions that take `batch` rows, by the prompt chunks they take (none: one function)."""
        return {chunks: function for function, (rows, chunks) in self.functions.get(name, {}).items()
                if rows == batch}

    def component(self, name: str) -> tuple[Path, ...]:
        if name.startswith(CONTROLNET_PREFIX) and name not in self.components:
            controlnet = name.removeprefix(CONTROLNET_PREFIX)
            held = f"it holds {', '.join(self.controlnets)}" if self.controlnets else "it holds none"
            raise GenerationError(f"package {self.name!r} has no ControlNet {controlnet!r} ({held}); convert it with "
                                  "coreml-convert --controlnet ID_OR_PATH")
        if name not in self.components:
            raise GenerationError(
                f"package {self.name!r} has no {name}; convert it too "
                f"(coreml-convert ... --components {','.join(self.required_components)},{name})"
            )
        return self.components[name]


def packages_root() -> Path:
    return Path(os.environ.get(PACKAGES_ENV) or Path.cwd() / "packages")


def _holds_models(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in MODEL_SUFFIXES for p in folder.iterdir())


def _looks_like_package(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file() or _holds_models(folder) or _holds_models(folder / BUNDLE_FOLDER)


def models_folder(folder: Path) -> Path:
    """The folder that holds the models: `folder`, or its `Resources/` when only that one does (an app's bundle,
    or what the Hugging Face Diffusers app downloads)."""
    if not (folder / MANIFEST_FILE).is_file() and not _holds_models(folder) and _holds_models(folder / BUNDLE_FOLDER):
        return folder / BUNDLE_FOLDER
    return folder


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
    problem = _manifest_problem(manifest)
    if problem:
        raise GenerationError(f"{path}: {problem}; the manifest is damaged: convert the package again")
    return manifest


# The manifest's keys that the runtime reads, and the JSON types they must have.
_MANIFEST_TYPES = {
    "scheduler": dict,
    "latent_scaling_factor": (int, float),
    "prediction_type": str,
    "attention_implementation": str,
    "family": str,
    "components": dict,
}


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's shape, or None."""
    for key, kind in _MANIFEST_TYPES.items():
        if key in manifest and (not isinstance(manifest[key], kind) or isinstance(manifest[key], bool)):
            return f"{key!r} has the wrong type"
    for name, entry in manifest.get("components", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            return f"component {name!r} has no file name"
        files = entry.get("files", {})
        if not isinstance(files, dict) or not all(
            isinstance(record, dict) and isinstance(record.get("size"), int) and isinstance(record.get("sha256"), str)
            for record in files.values()
        ):
            return f"component {name!r} has a damaged file list"
    return None


def _contract_name(file: Path) -> tuple[str | None, str | None]:
    """The contract name of a model file and, for Apple's converter's names, the model id in it."""
    if file.stem in COMPONENTS or any(file.stem in chunk_names(name) for name in CHUNKED_COMPONENTS):
        return file.stem, None
    if file.stem.startswith(APPLE_CONVERTER_PREFIX):
        rest = file.stem[len(APPLE_CONVERTER_PREFIX):]
        for suffix in sorted(APPLE_CONVERTER_NAMES, key=len, reverse=True):
            if rest.endswith("_" + suffix):
                return APPLE_CONVERTER_NAMES[suffix], rest[: -len(suffix) - 1]
    return None, None


def _model_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix in MODEL_SUFFIXES),
                  key=lambda p: (MODEL_SUFFIXES.index(p.suffix), p.name))


def _component_files(folder: Path) -> dict[str, tuple[Path, ...]]:
    """The components present, by the contract's file names (`<Name>.mlpackage`, or in Swift bundles `.mlmodelc`)
    or by Apple's converter's; a chunked Unet as its two chunks, as the Swift package prefers them."""
    files: dict[str, Path] = {}
    model_ids = set()
    for file in _model_files(folder):  # .mlpackage before .mlmodelc: both backends run those
        name, model_id = _contract_name(file)
        if name is not None:
            model_ids.add(model_id)
            files.setdefault(name, file)
    model_ids.discard(None)
    if len(model_ids) > 1:
        raise GenerationError(f"{folder} holds the models of several conversions ({', '.join(sorted(model_ids))}); "
                              "move each model's files into a folder of its own")
    components = {name: (files[name],) for name in COMPONENTS if name in files}
    if (folder / CONTROLNET_FOLDER).is_dir():
        for file in _model_files(folder / CONTROLNET_FOLDER):
            components.setdefault(CONTROLNET_PREFIX + file.stem, (file,))
    for name in CHUNKED_COMPONENTS:
        first, second = chunk_names(name)
        if first in files and second in files:
            components[name] = (files[first], files[second])
        elif first in files or second in files:
            present, absent = (first, second) if first in files else (second, first)
            if name not in components:
                raise GenerationError(f"{folder} holds {files[present].name} but not {absent}; a chunked "
                                      f"{name} needs both chunks (or convert it unchunked)")
    return components


def _expected_files(family: str) -> str:
    names = [f"{name} (or {' + '.join(chunk_names(name))})" if name in CHUNKED_COMPONENTS else name
             for name in FAMILY_CONTRACTS[family].required_components]
    return (f"{', '.join(names)} as .mlpackage or .mlmodelc, or as Apple's converter names them "
            f"({APPLE_CONVERTER_PREFIX}<model>_text_encoder.mlpackage, ..._unet, ..._vae_decoder)")


def _attention_from_metadata(files: tuple[Path, ...]) -> str | None:
    """The attention implementation the converter recorded in the Unet (its first chunk's metadata too)."""
    try:
        return model_metadata(files[0]).get(ATTENTION_METADATA)
    except Exception:  # unreadable metadata records nothing; loading the model will name what is wrong with it
        return None


def load_package(folder: Path, verify: bool = False) -> Package:
    """Read a package folder; the files of every model the manifest lists are checked against their recorded sizes
    (with `verify`, their SHA-256 too) before any model is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GenerationError(f"{folder} is not a folder; pass a package folder or a name under {packages_root()}")
    package_name = folder.resolve().name  # a download's name, not that of the Resources/ folder inside it
    folder = models_folder(folder)
    manifest = _read_manifest(folder)
    components = _component_files(folder)
    if manifest is None and not components:
        found = sorted(p.name for p in _model_files(folder))
        if found:
            raise GenerationError(f"{folder} holds {', '.join(found)}, not the models generating needs: "
                                  f"{_expected_files('sd')}; rename them so, or convert the model with coreml-convert")
        raise GenerationError(
            f"{folder} is not a package: no {MANIFEST_FILE} and no .mlpackage/.mlmodelc models; "
            "convert one with coreml-convert"
        )
    manifest = manifest or {}
    family = manifest.get("family") or _family_from_files(components)
    if family not in FAMILY_CONTRACTS:
        raise GenerationError(f"{folder / MANIFEST_FILE}: unknown model family {family!r}; update coreml-sd or "
                              "reconvert")
    defaults = FAMILY_CONTRACTS[family]
    missing = [name for name in defaults.required_components if name not in components]
    if missing:
        raise GenerationError(
            f"package {folder} lacks {', '.join(missing)} (no {' or '.join(m + '.mlpackage' for m in missing)}); "
            f"it holds {', '.join(sorted(p.name for p in _model_files(folder)))} and needs {_expected_files(family)}; "
            "reconvert it with coreml-convert"
        )
    absent = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if absent:
        raise GenerationError(
            f"{folder} lacks {' and '.join(absent)}: put CLIP's tokenizer files vocab.json and merges.txt (the "
            f"model's tokenizer/ folder on Hugging Face has them) into {folder}")
    for entry in manifest.get("components", {}).values():
        if inside(folder, entry["file"], "the manifest").exists():  # an absent model is a missing component
            check_files(folder, entry["file"], entry.get("files", {}), hashes=verify)
    attention = manifest.get("attention_implementation") or _attention_from_metadata(components[defaults.unet])
    shared = _shared_components(manifest, defaults.unet)
    components.update({name: components[defaults.unet] for name in shared})
    return Package(
        path=folder,
        name=package_name,
        components=components,
        vocab_file=folder / "vocab.json",
        merges_file=folder / "merges.txt",
        scheduler_config=manifest.get("scheduler", defaults.scheduler_config),
        scaling_factor=float(manifest.get("latent_scaling_factor", defaults.latent_scaling_factor)),
        prediction_type=manifest.get("prediction_type", defaults.prediction_type),
        pad_token=manifest.get("pad_token", SD_V1_PAD_TOKEN),
        attention_implementation=attention,
        feature_extractor=_feature_extractor(manifest, folder),
        watermark=_watermark(manifest, folder),
        family=family,
        force_zeros_for_empty_prompt=bool(manifest.get("force_zeros_for_empty_prompt",
                                                       defaults.force_zeros_for_empty_prompt)),
        compute_units={name: entry["compute_units"] for name, entry in manifest.get("components", {}).items()
                       if isinstance(entry, dict) and "compute_units" in entry},
        recommended=_recommended(manifest, folder),
        unguided_function=manifest.get("components", {}).get(defaults.unet, {}).get("unguided_function"),
        functions=_functions(manifest),
        component_functions=shared,
        max_prompt_chunks=int(manifest.get("components", {}).get(defaults.unet, {}).get("max_prompt_chunks", 1)),
        embeddings=_embeddings(manifest),
        text_encoder_records=_text_encoder_records(manifest, folder, defaults),
    )


def _shared_components(manifest: dict, unet: str) -> dict[str, str]:
    """The components the Unet's package holds as functions, by the function that is each: the ControlledUnet."""
    entry = manifest.get("components", {}).get(unet, {})
    function = entry.get("controlled_unet_function") if isinstance(entry, dict) else None
    return {CONTROLLED_UNET: function} if isinstance(function, str) else {}


def _functions(manifest: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """Per multifunction component, each function's (Unet batch, prompt chunks), `main` too (packages converted
    with --unguided-function before the manifest recorded them give them by their input shapes); the functions
    that compute another component (the Unet's ControlledUnet) are listed under that one."""
    functions = {}
    for name, entry in manifest.get("components", {}).items():
        if not isinstance(entry, dict) or not entry.get("functions"):
            continue
        functions[name] = {MAIN_FUNCTION: (entry["inputs"]["sample"]["shape"][0], 1)}
        for function, described in entry["functions"].items():
            shapes = described["inputs"]
            functions.setdefault(described.get("component", name), {})[function] = (
                described.get("unet_batch_size", shapes["sample"]["shape"][0]),
                described.get("prompt_chunks", shapes["encoder_hidden_states"]["shape"][-1] // TEXT_LENGTH))
    return functions


def _text_encoder_records(manifest: dict, folder: Path, defaults: FamilyContract) -> dict[str, EncoderRecord]:
    records = {}
    for name in defaults.text_encoders:
        try:
            records[name] = EncoderRecord.from_manifest(manifest.get("components", {}).get(name, {}))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise GenerationError(f"{folder / MANIFEST_FILE}: unreadable {name} 'final_layer_norm' ({exc}); "
                                  "reconvert the package") from None
    return records


def _recommended(manifest: dict, folder: Path) -> Recommended:
    try:
        return Recommended.from_manifest(manifest.get("recommended", {}))
    except GenerationError as error:
        raise GenerationError(f"{folder / MANIFEST_FILE}: {error}; reconvert the package") from None


def _embeddings(manifest: dict) -> dict[str, list[str]]:
    """The embeddings the converter recorded among the manifest's adapters, by their first token."""
    return {entry["tokens"][0]: list(entry["tokens"]) for entry in manifest.get("adapters", [])
            if isinstance(entry, dict) and "embedding" in entry and entry.get("tokens")}


def _feature_extractor(manifest: dict, folder: Path) -> dict:
    """The SafetyChecker's preprocessing as the converter recorded it (SD v1.4's for bundles without a manifest)."""
    config = manifest.get("components", {}).get(SAFETY_CHECKER, {}).get("feature_extractor", SD_FEATURE_EXTRACTOR)
    try:
        ClipPreprocessing.from_config(config)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise GenerationError(f"{folder / MANIFEST_FILE}: unreadable SafetyChecker 'feature_extractor' ({exc!r}); "
                              "reconvert the package") from None
    return config


def _watermark(manifest: dict, folder: Path) -> Watermark:
    if "watermark" not in manifest:
        return STABLE_DIFFUSION_V1  # packages converted before the manifest recorded it, Swift bundles
    try:
        return Watermark.from_manifest(manifest["watermark"])
    except (TypeError, KeyError, ValueError) as exc:
        raise GenerationError(f"{folder / MANIFEST_FILE}: unreadable 'watermark' ({exc}); "
                              "reconvert the package") from None


def _family_from_files(components: dict[str, tuple[Path, ...]]) -> str:
    if UNET_REFINER in components and UNET not in components:  # a base folder may hold its refiner too
        return contract.SDXL_REFINER.name
    return contract.SDXL.name if TEXT_ENCODER_2 in components else contract.SD.name
