"""Where a model comes from: an alias, a Hugging Face id, a local diffusers folder, a single-file checkpoint
(`.safetensors` / `.ckpt` in the original LDM layout), or a built-in model (`tiny`, `tiny-xl`, ...).

Every source is resolved to a `ModelSource`, which loads one component's modules at a time, in the
dtype asked for, so a conversion holds only what the component it converts needs. What each kind of
source reads lives in its own module (`folders`, `single_file`, `builtin`); they all hand back the
same `ModelSource`.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ConversionError
from ..families import Family

ALIASES = {
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2-base": "stabilityai/stable-diffusion-2-base",
    "sd-2-1-base": "stabilityai/stable-diffusion-2-1-base",
    "sd-2-1": "stabilityai/stable-diffusion-2-1",  # 768-v: v-prediction, 768x768
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class ModelParts:
    """The subset of a StableDiffusionPipeline that the Neural Engine modules are built from."""

    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    safety_checker: torch.nn.Module | None = None
    feature_extractor: dict | None = None  # the safety checker's preprocessing, as preprocessor_config.json holds it


class ModuleReader(Protocol):
    """What a kind of source knows how to read."""

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module: ...

    def empty(self, module_name: str) -> torch.nn.Module:
        """The module's layout on the meta device: names and shapes, no weights."""
        ...

    def file_hashes(self, modules: set[str]) -> dict[str, str]: ...

    def write_tokenizer_files(self, destination: Path) -> None: ...

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str) -> tuple[torch.nn.Module, dict]:
        """The model's own safety checker and its preprocessing config."""
        ...


@dataclass
class ModelSource:
    """A resolved model: its configuration is read eagerly, its weights only per component.

    `adapters` (LoRA, textual-inversion embeddings; see `converter.adapters`) change modules after they
    are read, so every consumer, validation included, sees the adapted model."""

    name: str
    description: dict
    scheduler_config: dict
    conditioning: dict  # the ModelDimensions fields of the text conditioning (Family.conditioning)
    sample_size: int
    latent_scaling_factor: float
    prediction_type: str
    family: Family
    reader: ModuleReader = field(repr=False)
    adapters: list = field(default_factory=list, repr=False)
    # Pipeline modules the source holds no weights for (a single file without its VAE or text encoder).
    absent_modules: frozenset[str] = frozenset()
    pad_token: str = "<|endoftext|>"  # what the tokenizer pads prompts with: SD 2.x's pads with "!"
    force_zeros_for_empty_prompt: bool | None = None  # as the model's pipeline config (model_index.json) says
    safety_checker: str | None = None  # --safety-checker: another model's checker, by folder or id
    vae_folder: Path | None = None  # a VAE swapped in for the model's own (--vae)
    vae_compute_precision: str | None = None  # the model's own VAE's, where it needs more than its family's

    def use_vae(self, vae: str) -> None:
        """Take the VAE from `vae` (a diffusers VAE folder, a model folder with vae/, or a Hugging Face id of
        either), with its latent scale."""
        from .folders import read_json, vae_folder

        self.vae_folder, self.description["vae"] = vae_folder(vae)
        self.latent_scaling_factor = float(read_json(self.vae_folder / "config.json").get(
            "scaling_factor", self.family.contract.latent_scaling_factor))

    def load(self, component: str, dtype: torch.dtype) -> ModelParts:
        """The pipeline modules `component` needs, in `dtype`, in eval mode."""
        parts = ModelParts()
        module_name = self.family.component(component).module
        if module_name == "safety_checker":
            checker, parts.feature_extractor = self._load_safety_checker(dtype)
            parts.safety_checker = checker.eval().requires_grad_(False)
            return parts
        if module_name in self.absent_modules:
            raise ConversionError(f"{self.name} holds no {module_name} weights: leave {component} out (--components)")
        module = self._read(module_name, dtype)
        for adapter in self.adapters:
            adapter.apply(module_name, module)
        setattr(parts, module_name, module.eval().requires_grad_(False))
        return parts

    def _read(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        if module_name == "vae" and self.vae_folder is not None:
            from diffusers import AutoencoderKL

            from .folders import load_diffusers_module

            try:
                return load_diffusers_module(AutoencoderKL, self.vae_folder, dtype)
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ConversionError(f"cannot load the VAE from {self.vae_folder}: {error}".splitlines()[0]) from error
        return self.reader.load(module_name, dtype)

    def _load_safety_checker(self, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
        if self.safety_checker is not None:
            from functools import partial

            from . import safety_checker
            from .folders import _download

            return safety_checker.locate(self.safety_checker, partial(_download, revision=None)).load(dtype)
        return self.reader.load_safety_checker(dtype, self.description, self.name)

    def check_adapters(self, components: list[str]) -> None:
        """Let each adapter refuse what does not fit the model (names, shapes) before anything converts."""
        for module_name in sorted(self.family.modules(components)):
            if self.adapters and module_name not in self.absent_modules:
                layout = self.reader.empty(module_name)
                for adapter in self.adapters:
                    adapter.check(module_name, layout)

    def file_hashes(self, components: list[str]) -> dict[str, str]:
        """SHA-256 of the configuration files and of the weights the given components are built from."""
        return self.reader.file_hashes(self.family.modules(components))

    def adapter_settings(self, module_name: str) -> list[dict]:
        """What the adapters change in a module (file, SHA-256, scale), for the component settings."""
        return [entry for adapter in self.adapters for entry in adapter.settings(module_name)]

    def write_tokenizer_files(self, destination: Path) -> None:
        """vocab.json and merges.txt, as the Swift package reads them, with any embeddings' tokens added."""
        self.reader.write_tokenizer_files(destination)
        for adapter in self.adapters:
            adapter.extend_tokenizer_files(destination)


def list_models() -> list[tuple[str, str]]:
    from .builtin import BUILT_IN

    return [(name, built_in.what) for name, built_in in BUILT_IN.items()] + list(ALIASES.items())


def resolve(model: str, revision: str | None = None, model_type: str | None = None,
            prediction_type: str | None = None, config_folder: Path | None = None) -> ModelSource:
    """Turn `--model` into a ModelSource: tiny, an alias, a local folder, a single file or a Hugging Face id.
    `model_type`, `prediction_type` and `config_folder` apply to single files only."""
    path = Path(model).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        from .single_file import single_file_source

        if not path.is_file():
            raise ConversionError(f"{model} does not exist: pass the path of a .safetensors or .ckpt checkpoint")
        return single_file_source(path.resolve(), model_type, prediction_type, config_folder)
    if model_type or prediction_type or config_folder:
        raise ConversionError("--model-type, --prediction-type and --config apply to single-file checkpoints only; "
                              "other models' own configs say what they are")
    from .builtin import BUILT_IN, built_in_source

    if model in BUILT_IN:
        return built_in_source(model)
    from .folders import folder_source, hub_source

    if path.is_dir():
        folder = path.resolve()
        return folder_source(folder, name=folder.name, description={"path": str(folder)})
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConversionError(f"{model} is not a folder or a .safetensors/.ckpt file; pass a diffusers model folder, a "
                              "single-file checkpoint, a Hugging Face id or an alias (coreml-convert --list-models)")
    hub_id = ALIASES.get(model, model)
    if "/" not in hub_id:
        known = ", ".join(name for name, _ in list_models())
        raise ConversionError(f"unknown model {model!r}: use one of {known}, a Hugging Face id (org/name), a local "
                              "folder or a .safetensors/.ckpt file")
    return hub_source(hub_id, revision, name=model if model in ALIASES else hub_id.split("/")[-1])
