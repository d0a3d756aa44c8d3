"""How much memory one catalogue task reserves: the converter's measured peaks, scaled to the task's model.

Ray places a task only where its `memory` resource fits, so the figure must be what the task's process
really peaks at. The measurements below are peak RSS (`wait4`, as `/usr/bin/time -v` reports it) of one
process converting, or validating, one component of the full-size SD v1.4 architecture at 512x512 with
a Unet batch of 2 (`scripts/bench_convert.py`, float16 and 6-bit runs). A task that converts and then
validates in one process peaks at the larger of its two figures.

Other models are scaled from these: the text encoders' and the Unet's peaks grow with their parameters
(weights dominate), the VAE's with its activations (pixels x the width of its full-resolution layers);
only what lies above the interpreter's own baseline is scaled. SDXL and the safety checker are not
measured yet: their figures are such estimates.
"""
from dataclasses import dataclass
from functools import cache

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.sd_v1_4 import SD_TEXT_ENCODER_CONFIG, SD_UNET_CONFIG, SD_VAE_CONFIG

INTERPRETER_BASELINE_GIB = 0.37  # Python with torch, diffusers and coremltools imported, before any model
SAFETY_MARGIN = 1.1  # a worker process runs one task after another: its heap is never as fresh as a new process's
REFERENCE_PIXELS = 512 * 512


@dataclass(frozen=True)
class MeasuredPeak:
    """One component kind's peaks at the reference architecture, in GiB: float16 and with palettized weights."""

    convert_gib: float
    validate_gib: float
    palettized_convert_gib: float
    palettized_validate_gib: float
    scales_with: str  # "parameters" or "activations"


# scripts/bench_convert.py, full-size SD v1.4, 512x512, shared 2-core machine. The Unet's conversion figure
# is the largest of its attention implementations (split_einsum 2.33, original 2.30, split_einsum_v2 2.40);
# palettized: 6 bits. The VAEEncoder has no run of its own: it is taken to peak like the decoder, which
# holds the same full-resolution activations.
MEASURED_PEAKS = {
    "text_encoder": MeasuredPeak(1.11, 0.89, 1.11, 0.81, "parameters"),
    "unet": MeasuredPeak(2.40, 4.12, 3.01, 4.21, "parameters"),
    "vae_decoder": MeasuredPeak(0.65, 1.63, 0.65, 1.63, "activations"),
    "vae_encoder": MeasuredPeak(0.65, 1.63, 0.65, 1.63, "activations"),
}
# Not measured: CLIP ViT-L/14's vision tower (the safety checker) holds 2.5x the parameters of SD's text
# encoder, so 2.5x the text encoder's figures above the baseline. It is not scaled per model.
SAFETY_CHECKER_GIB = round(INTERPRETER_BASELINE_GIB + 2.5 * (1.11 - INTERPRETER_BASELINE_GIB), 2)


def reserved_gib(kind: str, size_ratio: float, validate: bool, palettized: bool) -> float:
    """GiB a task reserves for one component of `kind`, whose model is `size_ratio` times the reference's
    (parameters or activations, as the kind scales)."""
    if kind == "safety_checker":
        peak = SAFETY_CHECKER_GIB
    else:
        row = MEASURED_PEAKS[kind]
        figures = [row.palettized_convert_gib if palettized else row.convert_gib]
        if validate:
            figures.append(row.palettized_validate_gib if palettized else row.validate_gib)
        peak = INTERPRETER_BASELINE_GIB + (max(figures) - INTERPRETER_BASELINE_GIB) * size_ratio
    return round(peak * SAFETY_MARGIN + 0.05, 1)  # to the next 0.1 GiB, about


def size_ratio(kind: str, module, height: int, width: int) -> float:
    """How large `module` (on the meta device: shapes only) is against SD v1.4's module of the same kind."""
    if kind == "safety_checker":
        return 1.0
    if MEASURED_PEAKS[kind].scales_with == "activations":
        full_resolution_width = module.config.block_out_channels[0]
        reference_width = reference_vae_width()
        return height * width * full_resolution_width / (REFERENCE_PIXELS * reference_width)
    return parameter_count(module) / reference_parameters(kind)


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@cache
def reference_parameters(kind: str) -> int:
    """Parameters of SD v1.4's text encoder or Unet, built on the meta device from its configs."""

    with torch.device("meta"):
        if kind == "text_encoder":
            return parameter_count(CLIPTextModel(CLIPTextConfig(**SD_TEXT_ENCODER_CONFIG)))

        return parameter_count(UNet2DConditionModel(**SD_UNET_CONFIG))


def reference_vae_width() -> int:
    return SD_VAE_CONFIG["block_out_channels"][0]
