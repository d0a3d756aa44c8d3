"""ControlNets (`coreml-convert --controlnet ID_OR_PATH`): each a `controlnet/<Name>.mlpackage` beside the model's
packages, and the `ControlledUnet` that takes their residuals, as Apple's converter and Swift package have them.

A ControlNet is its own model source (a diffusers `ControlNetModel` folder or Hugging Face id, or a single file as
model sites publish them: sources/controlnet_file.py) whose one component is the ControlNet, converted and validated
as any component is; it must fit the model's Unet (same text width, blocks and channels), which is checked from the
configs (and a single file's tensor shapes) before anything converts.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from coreml_sd.runtime.contract import (
    CONTROLLED_UNET,
    CONTROLNET_PREFIX,
    ModelDimensions,
    controlled_unet_spec,
    controlnet_spec,
    residual_layout,
)

from .errors import ConversionError
from .families import Component, Family
from .sources import ModelSource

CONTROLNET_HUB_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors", "README.md"]
# What must agree between a ControlNet's config and the Unet's for its residuals to fit the Unet's skips.
MATCHING_SETTINGS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "down_block_types",
                     "addition_embed_type", "in_channels")


def controlnet_name(argument: str) -> str:
    """Apple's bundle name for a ControlNet: the Hugging Face id (a folder's or file's stem) with `/` as `_`, split
    at `_` and `-`, each word title-cased, joined: `lllyasviel/sd-controlnet-mlsd` → `LllyasvielSdControlnetMlsd`."""
    path = Path(argument).expanduser()
    identifier = path.stem if path.exists() or argument.startswith((".", "/", "~")) else argument
    return "".join(word.title() for word in re.split("_|-", identifier.replace("/", "_")))


def component_name(name: str) -> str:
    """A ControlNet's component name (and package path without suffix) in a package folder."""
    return CONTROLNET_PREFIX + name


@dataclass
class ControlNetReader:
    """A diffusers ControlNetModel folder (config.json and safetensors weights)."""

    folder: Path

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import ControlNetModel

        from .sources.folders import load_diffusers_module

        try:
            return load_diffusers_module(ControlNetModel, self.folder, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConversionError(f"cannot load the ControlNet from {self.folder}: {error}".splitlines()[0]) from error

    def empty(self, module_name: str) -> torch.nn.Module:
        from diffusers import ControlNetModel

        from .sources.folders import empty_module

        return empty_module(ControlNetModel, ControlNetModel.load_config(self.folder))

    def file_hashes(self, modules: set[str]) -> dict[str, str]:
        from .sources.folders import sha256

        return {path.name: sha256(path) for path in sorted(self.folder.iterdir()) if path.is_file()}

    def write_tokenizer_files(self, destination: Path) -> None:
        raise NotImplementedError("a ControlNet has no tokenizer")

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str):
        raise NotImplementedError("a ControlNet has no safety checker")


def controlnet_folder(argument: str) -> tuple[Path, dict]:
    """The folder holding a ControlNet's config.json and weights, and how the manifest records its origin."""
    path = Path(argument).expanduser()
    if path.is_dir():
        folder, description = path.resolve(), {"path": str(path.resolve())}
    elif argument.startswith((".", "/", "~")) or argument.count("/") != 1:
        raise ConversionError(f"--controlnet {argument} is neither a file, a folder nor a Hugging Face id (org/name); "
                              "pass a ControlNet file (e.g. control_v11p_sd15_canny.safetensors), a diffusers "
                              "ControlNetModel folder or id (e.g. lllyasviel/sd-controlnet-canny)")
    else:
        from .sources.folders import _download

        folder, description = _download(argument, None, CONTROLNET_HUB_PATTERNS), {"id": argument}
    if not (folder / "config.json").is_file():
        raise ConversionError(f"--controlnet {argument}: no config.json in {folder}; pass a diffusers ControlNetModel "
                              "folder")
    return folder, description


def check_fits(name: str, config: dict, unet_config: dict, base: ModelSource) -> None:
    """Refuse a ControlNet made for another family (its residuals would not fit the Unet's skips), in one line."""
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ConversionError(f"--controlnet {name}: config.json describes a {config['_class_name']}, not a "
                              "ControlNetModel")
    differing = [key for key in MATCHING_SETTINGS if _normalised(config, key) != _normalised(unet_config, key)]
    if differing:
        key = differing[0]
        raise ConversionError(
            f"--controlnet {name} was made for another model family than {base.name} ({base.family.description}): "
            f"its {key} is {_normalised(config, key)}, the Unet's {_normalised(unet_config, key)}; pass a ControlNet "
            "trained for this model's family")


def _normalised(config: dict, key: str):
    value = config.get(key)
    if key == "layers_per_block" and isinstance(value, int):
        return [value] * len(config["block_out_channels"])
    if key == "in_channels":
        return 4 if value is None else value
    return list(value) if isinstance(value, (list, tuple)) else value


def with_controlled_unet(family: Family) -> Family:
    """The family with a ControlledUnet component beside its Unet (the Unet's module, weights and LoRAs)."""
    components = {**family.components, CONTROLLED_UNET: Component("controlled_unet", "unet", controlled_unet_spec)}
    return replace(family, components=components)


def controlnet_source(argument: str, base: ModelSource, unet_config: dict) -> ModelSource:
    """A ControlNet as a model source of its own, whose one component (the first of its family's) is
    `controlnet/<Name>`."""
    path = Path(argument).expanduser()
    if path.is_file():
        from .sources.controlnet_file import controlnet_file_reader

        reader = controlnet_file_reader(path, argument, unet_config,
                                        lambda config: check_fits(argument, config, unet_config, base), base.name)
        description = {"path": str(path.resolve())}
    else:
        folder, description = controlnet_folder(argument)
        reader = ControlNetReader(folder)
        check_fits(argument, dict(reader.empty("controlnet").config), unet_config, base)
    name = controlnet_name(argument)
    component = Component("controlnet", "controlnet", controlnet_spec)
    family = replace(base.family, components={component_name(name): component})
    description = {**description, "controlnet": argument, "base_family": base.family.name,
                   "files": reader.file_hashes({"controlnet"})}
    return replace(base, name=name, description=description, family=family, reader=reader, adapters=[],
                   absent_modules=frozenset(), safety_checker=None, vae_folder=None)


def prepare(arguments: tuple[str, ...], base: ModelSource, dims: ModelDimensions) -> tuple[list[ModelSource],
                                                                                         ModelDimensions]:
    """The ControlNets' sources (each checked against the Unet), the base source's family given its ControlledUnet,
    and the dimensions with the residuals' layout."""
    unet_config = dict(base.reader.empty("unet").config)
    sources = [controlnet_source(argument, base, unet_config) for argument in arguments]
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConversionError(f"--controlnet names {repeated[0]} twice: pass each ControlNet once")
    base.family = with_controlled_unet(base.family)
    return sources, replace(dims, residuals=residual_layout(unet_config))


def recorded_sources(manifest: dict, base: ModelSource) -> dict[str, ModelSource]:
    """For validating a package again: its ControlNets' sources by component name, as the manifest records them;
    the base source's family gains its ControlledUnet when the package has one."""
    if not manifest.get("residuals"):
        return {}
    base.family = with_controlled_unet(base.family)
    unet_config = dict(base.reader.empty("unet").config)
    return {name: controlnet_source(entry["settings"]["source"]["controlnet"], base, unet_config)
            for name, entry in manifest["components"].items() if name.startswith(CONTROLNET_PREFIX)}
