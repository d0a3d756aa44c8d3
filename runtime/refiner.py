"""SDXL's base + refiner ensemble as a stage of each denoising pass (diffusers' `denoising_end` on the base,
`denoising_start` on the refiner): the base denoises the first `start` of the schedule, the refiner the rest from
the base's latents with no noise added, and the refiner's VAE decodes. `NoRefiner` is the base alone.
"""
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import contract
from .conditioning import SizeConditioning
from .errors import GenerationError
from .sampling import Pass, StepHook
from .upscaling import Upscale

if TYPE_CHECKING:  # the pipeline composes this stage; the stage only calls back into it
    from .pipeline import Pipeline


class NoRefiner:
    """The base alone: it runs the whole schedule and decodes."""

    base_end: float | None = None

    def __init__(self, base: "Pipeline"):
        self.decoder = base
        self.settings: dict[str, object] = {}

    def condition(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int],
                  prompt_syntax: str = "a1111", clip_skip: int = 1) -> None:
        pass

    def __call__(self, latents: torch.Tensor, stage: Pass, seed: int, overlap: int, bar: Callable,
                 on_step: StepHook | None = None) -> torch.Tensor:
        return latents


class Refiner:
    """An SDXL refiner package taking over the base's latents at `start` of the schedule."""

    def __init__(self, base: "Pipeline", refiner: "Pipeline", start: float, upscale: Upscale | None):
        if refiner.package.family != contract.SDXL_REFINER.name or base.package.family != contract.SDXL.name:
            raise GenerationError(
                f"--refiner takes an SDXL refiner package for an SDXL base package; {refiner.package.name!r} is "
                f"{refiner.package.family!r} and {base.package.name!r} is {base.package.family!r}")
        if refiner.latent_window != base.latent_window:
            raise GenerationError(
                f"refiner {refiner.package.name!r} makes {refiner.width}x{refiner.height} images, the base "
                f"{base.width}x{base.height}; convert both at the same size")
        if upscale is not None:
            raise GenerationError("--refiner and --upscale cannot be combined yet; upscale the refined image with "
                                  "--image FILE --upscale")
        self.refiner = refiner
        self.base_end = start
        self.decoder = refiner
        self.settings = {"Refiner": refiner.package.name, "Refiner start": start}
        self.conditioning: dict[str, np.ndarray] = {}

    def condition(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int],
                  prompt_syntax: str = "a1111", clip_skip: int = 1) -> None:
        """The refiner's own conditioning: its text encoder (at the base's clip skip) and its aesthetic-score time
        ids."""
        with self.refiner.stage(*self.refiner.package.contract.text_encoders):
            self.conditioning = self.refiner.condition(prompt, negative_prompt, size, image_size, prompt_syntax,
                                                       clip_skip)

    def __call__(self, latents: torch.Tensor, stage: Pass, seed: int, overlap: int, bar: Callable,
                 on_step: StepHook | None = None) -> torch.Tensor:
        with self.refiner.stage(self.refiner.package.unet_name):
            return self.refiner.sampler.refine(latents, self.conditioning, stage, seed, self.base_end, overlap, bar,
                                               on_step)


def refinement_for(base: "Pipeline", refiner: "Pipeline | None", start: float,
                   upscale: Upscale | None) -> NoRefiner | Refiner:
    return NoRefiner(base) if refiner is None else Refiner(base, refiner, start, upscale)
