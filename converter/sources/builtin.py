"""Models built into the converter: `tiny`, SD's architecture at toy size with random weights."""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families.sd import SD
from . import TINY, ModelSource


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
        copy_clip_vocabulary_files(destination)


def copy_clip_vocabulary_files(destination: Path) -> None:
    """The CLIP BPE files the project ships, which every SD 1.x/2.x tokenizer uses."""
    from ..tiny import clip_vocabulary_files

    for path in clip_vocabulary_files():
        (destination / Path(path).name).write_bytes(Path(path).read_bytes())


def tiny_source() -> ModelSource:
    from ..tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    return ModelSource(
        name=TINY,
        description={"model": TINY, "seed": 0},
        # As scheduler_config.json holds it: a scheduler built from it for another class keeps that class's own
        # defaults for the values listed in `_use_default_values`, as diffusers does.
        scheduler_config=dict(pipeline.scheduler.config, _class_name=type(pipeline.scheduler).__name__),
        text_width=pipeline.text_encoder.config.hidden_size,
        sample_size=pipeline.unet.config.sample_size,
        latent_scaling_factor=pipeline.vae.config.scaling_factor,
        prediction_type=pipeline.scheduler.config.prediction_type,
        family=SD,
        reader=PipelineReader(pipeline),
    )
