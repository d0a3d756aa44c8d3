"""Models built into the converter: `demo` (a small model trained here, which draws what its prompt says), `tiny`
(SD's architecture at toy size with random weights), `tiny-xl` and `tiny-xl-refiner` (SDXL's)."""
import copy
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch

from ..errors import ConversionError
from ..families import detect_family
from ..models.tiny import build_tiny_safety_checker, clip_vocabulary_files
from . import ModelSource
from .folders import pipeline_setting


@dataclass
class PipelineReader:
    """Modules of a diffusers pipeline object held in memory."""

    pipeline: object

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        # A copy: the float32 original must survive for validation after an fp16 conversion.
        return copy.deepcopy(getattr(self.pipeline, module_name)).to(dtype=dtype)

    def empty(self, module_name: str) -> torch.nn.Module:
        return copy.deepcopy(getattr(self.pipeline, module_name)).to("meta")

    def file_hashes(self, modules: set[str]) -> dict[str, str]:
        return {}

    def write_tokenizer_files(self, destination: Path) -> None:
        copy_clip_vocabulary_files(destination)  # every built-in model's tokenizers use them

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str) -> tuple[torch.nn.Module, dict]:
        checker, feature_extractor = build_tiny_safety_checker()
        return checker.to(dtype=dtype), feature_extractor


def copy_clip_vocabulary_files(destination: Path) -> None:
    """The CLIP BPE files the project ships, which every SD 1.x/2.x tokenizer uses."""
    for path in clip_vocabulary_files():
        (destination / Path(path).name).write_bytes(Path(path).read_bytes())


@dataclass(frozen=True)
class BuiltIn:
    """An embedded model: what `--list-models` says of it, and the module and function that build its pipeline."""

    what: str
    module: str
    builder: str
    trained: bool = False  # its weights ship as files (a package records their digest); else a seed makes them
    vae_compute_precision: str | None = None  # where its VAE needs more than its family's float16


BUILT_IN = {
    "demo": BuiltIn("embedded 64x64 model trained on coloured shapes: draws what the prompt says "
                    "(model card: coreml_sd/converter/data/demo/README.md)", "demo", "build_demo_pipeline",
                    trained=True, vae_compute_precision="float32"),  # its encoder's activations reach ~300
    "tiny": BuiltIn("embedded SD-architecture model with random weights, for trying things out", "tiny",
                    "build_tiny_pipeline"),
    "tiny-xl": BuiltIn("embedded SDXL-architecture base with random weights", "tiny_xl", "build_tiny_xl_pipeline"),
    "tiny-xl-refiner": BuiltIn("embedded SDXL-architecture refiner with random weights", "tiny_xl",
                               "build_tiny_xl_refiner_pipeline"),
}


def built_in_source(name: str) -> ModelSource:
    built_in = BUILT_IN[name]
    module = import_module(f"coreml_sd.converter.models.{built_in.module}")
    try:
        pipeline = getattr(module, built_in.builder)()
    except FileNotFoundError as error:
        raise ConversionError(f"the {name} model's weights are missing: {error}") from None
    # What a package records to tell two versions of the model apart.
    identity = {"weights_sha256": module.weights_digest()} if built_in.trained else {"seed": 0}
    unet_config = dict(pipeline.unet.config)
    family = detect_family(dict(pipeline.config), unet_config)
    text_configs = {module: getattr(pipeline, module).config.to_dict() for module in family.text_encoder_classes}
    return ModelSource(
        name=name,
        description={"model": name, **identity},
        # As scheduler_config.json holds it: a scheduler built from it for another class keeps that class's own
        # defaults for the values listed in `_use_default_values`, as diffusers does.
        scheduler_config=dict(pipeline.scheduler.config, _class_name=type(pipeline.scheduler).__name__),
        conditioning=family.conditioning(unet_config, text_configs),
        sample_size=pipeline.unet.config.sample_size,
        latent_scaling_factor=pipeline.vae.config.scaling_factor,
        prediction_type=pipeline.scheduler.config.prediction_type,
        family=family,
        reader=PipelineReader(pipeline),
        force_zeros_for_empty_prompt=pipeline_setting(dict(pipeline.config), family),
        vae_compute_precision=built_in.vae_compute_precision,
    )
