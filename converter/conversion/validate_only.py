"""`coreml-convert --validate-only FOLDER`: check an existing package's components against their originals again."""
from pathlib import Path

import torch

from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.integrity import check_files

from ..compression import LinearQuantization, parse_linear
from ..compression.recipe import Recipe
from ..controlnets import recorded_sources
from ..errors import ConversionError
from ..package_folder import PackageFolder
from ..sources import ModelSource, resolve
from .multifunction import recorded_functions
from .run import ConversionReport, load_adapters, stage
from .validate import validate


def source_of(manifest: dict) -> ModelSource:
    """Resolve the model a package was converted from, as its manifest records it, with its adapters."""
    recorded = manifest["source"]
    if "path" in recorded:
        source = resolve(recorded["path"], model_type=recorded.get("model_type"),
                         prediction_type=recorded.get("prediction_type"), config_folder=recorded.get("config"))
    elif "id" in recorded:
        source = resolve(recorded["id"], recorded.get("revision"))
    else:
        source = resolve(recorded["model"])
    adapters = manifest.get("adapters", [])
    source.adapters = load_adapters(tuple(f"{a['path']}:{a['scale']}" for a in adapters if "lora" in a),
                                    tuple(f"{a['path']}:{a['tokens'][0]}" for a in adapters if "embedding" in a))
    for adapter, entry in zip(source.adapters,
                              [a for a in adapters if "lora" in a] + [a for a in adapters if "embedding" in a]):
        if adapter.digest != entry["sha256"]:
            raise ConversionError(f"{adapter.path} changed since the package was converted (SHA-256 differs): "
                                  "convert again")
    return source


def installed_components(manifest: dict) -> dict[str, tuple[str, ...]]:
    """Each component of a manifest and the entries it is installed as: itself, or its chunks in order."""
    installed: dict[str, tuple[str, ...]] = {}
    for name, entry in manifest["components"].items():
        component = entry.get("chunk_of", name)
        installed[component] = installed.get(component, ()) + (name,)
    return installed


def validate_package(path: Path, seed: int = 0) -> dict[str, dict]:
    """Check every component of an existing package folder again (its files' hashes first) and record the results."""
    folder = PackageFolder(path)
    if folder.manifest is None:
        raise ConversionError(f"{path} has no manifest.json: is it a package folder written by coreml-convert?")
    manifest = folder.manifest
    for entry in manifest["components"].values():
        check_files(folder.path, entry["file"], entry.get("files", {}), hashes=True)
    source = source_of(manifest)
    source.safety_checker = manifest["components"].get("SafetyChecker", {}).get("settings", {}).get("safety_checker")
    dims = ModelDimensions.from_manifest(manifest)
    sources = recorded_sources(manifest, source)
    results, report = {}, ConversionReport(folder.path)
    with folder.lock():
        for component, names in installed_components(manifest).items():
            packages = tuple(folder.path / manifest["components"][name]["file"] for name in names)
            for package in packages:
                if not package.is_dir():
                    raise ConversionError(f"{package} is missing: convert it again with coreml-convert")
            settings = manifest["components"][names[0]].get("settings", {})
            origin = sources.get(component, source)
            with stage(report, component, "validate"):
                results[component] = validate(packages if len(packages) > 1 else packages[0],
                                              origin.family.component(component),
                                              origin.family.spec(component, dims),
                                              lambda c=component, o=origin: o.load(c, torch.float32), seed,
                                              origin.latent_scaling_factor, settings.get("quantize_nbits"),
                                              recorded_recipe(manifest["components"][names[0]]),
                                              settings.get("quantize_group"), recorded_linear(settings))
                for function in recorded_functions(manifest["components"][names[0]], dims):
                    computed = function.component(component)  # the Unet's package may hold the ControlledUnet
                    results[component].setdefault("functions", {})[function.name] = validate(
                        packages[0], origin.family.component(computed), function.spec(origin, component),
                        lambda c=computed, o=origin: o.load(c, torch.float32), seed, origin.latent_scaling_factor,
                        settings.get("quantize_nbits"), function_name=function.name)
            for name in names:
                manifest["components"][name]["validation"] = results[component]
            folder.write_manifest()
    return results


def recorded_recipe(entry: dict) -> Recipe | None:
    """The mixed-bit recipe a component was converted with, as its manifest entry records it."""
    recorded = entry.get("quantize_recipe")
    return Recipe(recorded["name"], recorded["bits"], recorded["file_sha256"]) if recorded else None


def recorded_linear(settings: dict) -> LinearQuantization | None:
    recorded = settings.get("quantize_linear")
    if not recorded:
        return None
    return parse_linear(recorded["dtype"] + (f":{recorded['block']}" if "block" in recorded else ""))
