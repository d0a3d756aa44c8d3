"""The control stage: ControlNets that steer the Unet with control images (edges, pose, depth), as diffusers'
StableDiffusionControlNetPipeline and Apple's Swift package run them.

Each ControlNet runs on the same inputs as the Unet (latents, timestep, text conditioning) and on its control
image (RGB in [0, 1] at the generation size); its residuals, times its scale, are summed over the ControlNets and
fed to the ControlledUnet. Outside `[start, end)` of the schedule (diffusers' control_guidance_start/end) a
ControlNet adds nothing. At sizes beyond the package's, where the Unet runs in overlapping windows, each window's
ControlNet call takes that window's crop of the control image (resized to the whole generation size first); a hires
pass resizes the control image to its own size. With an SDXL refiner, the ControlNets steer the base's steps only:
the refiner has no ControlNet (as with diffusers' StableDiffusionXLControlNetPipeline and its denoising_end).
"""
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import Model
from .contract import VAE_FACTOR
from .errors import GenerationError
from .tiling import Layout, window_crops

CANNY_DEFAULT_THRESHOLDS = (100, 200)  # OpenCV's hysteresis thresholds, as diffusers' ControlNet examples use


@dataclass(frozen=True)
class ControlRequest:
    """One `--controlnet NAME[:SCALE]` with its `--control-image`."""

    name: str
    scale: float
    image: Image.Image
    image_sha256: str


def parse_controlnet(argument: str) -> tuple[str, float]:
    """`NAME[:SCALE]` → (NAME, SCALE), the scale 1.0 when not given."""
    name, _, scale = argument.partition(":")
    if not name:
        raise GenerationError(f"--controlnet {argument!r} names no ControlNet; pass NAME[:SCALE]")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise GenerationError(f"--controlnet {argument}: the scale {scale!r} is not a number; pass NAME[:SCALE], "
                              "e.g. canny:0.8") from None


def parse_preprocess(argument: str | None) -> tuple[int, int] | None:
    """`canny[:LOW:HIGH]` → the Canny thresholds; None for no preprocessing."""
    if argument is None:
        return None
    kind, *thresholds = argument.split(":")
    if kind != "canny" or len(thresholds) not in (0, 2):
        raise GenerationError(f"--control-preprocess {argument}: pass canny or canny:LOW:HIGH (e.g. canny:100:200)")
    try:
        low, high = (int(value) for value in thresholds) if thresholds else CANNY_DEFAULT_THRESHOLDS
    except ValueError:
        raise GenerationError(f"--control-preprocess {argument}: the thresholds must be whole numbers") from None
    if not 0 <= low <= high:
        raise GenerationError(f"--control-preprocess {argument}: LOW must be at most HIGH, both at least 0")
    return low, high


def canny_edges(image: Image.Image, thresholds: tuple[int, int]) -> Image.Image:
    """The picture's Canny edges as a white-on-black RGB map (what canny ControlNets were trained on)."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *thresholds)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def control_requests(controlnets: tuple[str, ...], images: tuple[str, ...], preprocess: str | None,
                     open_image: Callable[[str], Image.Image]) -> list[ControlRequest]:
    """The `--controlnet` / `--control-image` pairs, in order, each image preprocessed as asked."""
    if len(controlnets) != len(images):
        raise GenerationError(f"{len(controlnets)} --controlnet but {len(images)} --control-image: pass one control "
                              "image per ControlNet, in the same order")
    thresholds = parse_preprocess(preprocess)
    requests = []
    for argument, file in zip(controlnets, images):
        name, scale = parse_controlnet(argument)
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if Path(file).is_file() else ""
        image = open_image(file)  # with its transparency, which marks the pixels an inpainting ControlNet redraws
        if thresholds is not None:
            image = canny_edges(image, thresholds)
        requests.append(ControlRequest(name, scale, image, digest))
    return requests


def control_image_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(1, 3, H, W) RGB in [0, 1] at `size` (width, height), resized with Lanczos as diffusers' control image
    processor resizes it; every fully transparent pixel is -1 in all three channels, as Apple's Swift package
    converts control images (its rule for inpainting ControlNets: the pixels to redraw are transparent)."""
    image = image.convert("RGBA") if "A" in image.getbands() else image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 255
    rgb = pixels[..., :3]
    if pixels.shape[-1] == 4:
        rgb = np.where(pixels[..., 3:] == 0, np.float32(-1), rgb)
    return rgb.transpose(2, 0, 1)[None]


@dataclass
class Control:
    """The ControlNets of one generation: their models, scales and control images, and the fraction of the
    schedule they act on."""

    models: list[Model]
    scales: list[float]
    images: list[Image.Image]
    start: float = 0.0
    end: float = 1.0

    def scales_at(self, step: int, steps: int) -> list[float]:
        """Each ControlNet's scale at `step` of `steps`: zero outside [start, end), as diffusers' controlnet_keep."""
        active = not (step / steps < self.start or (step + 1) / steps > self.end)
        return [scale if active else 0.0 for scale in self.scales]

    def for_pass(self, layout: Layout, steps: int) -> "PassControl":
        """The ControlNets over a denoising pass of `steps` steps on latents of `layout`'s size: each control image
        resized to the pass's size in pixels (as diffusers resizes it to the generation size), from which each Unet
        window takes its crop, so that each window is steered by its own part of the picture (ControlNet tile
        upscaling); the scales of each step."""
        size = (layout.size[1] * VAE_FACTOR, layout.size[0] * VAE_FACTOR)
        images = [control_image_input(image, size).astype(model.input_description["controlnet_cond"][1])
                  for model, image in zip(self.models, self.images)]
        return PassControl(self.models, images, layout, [self.scales_at(step, steps) for step in range(steps)])


@dataclass(frozen=True)
class PassControl:
    """The ControlNets of one denoising pass: their models, control images at the pass's size (1, 3, H, W, in the
    models' dtypes), the Unet windows' layout, and each step's scales."""

    models: list[Model]
    images: list[np.ndarray]
    layout: Layout
    step_scales: list[list[float]]

    def residuals(self, inputs: dict[str, np.ndarray], windows: np.ndarray, scales: list[float],
                  residual_inputs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """The ControlledUnet's residual inputs for one Unet call whose rows lie in `windows` (a window index per
        row): each ControlNet's residuals on those windows' crops of its control image, times its scale, summed in
        float32 (zeros when no ControlNet acts), then in the ControlledUnet's dtypes."""
        total: dict[str, np.ndarray] = {}
        for model, scale, image in zip(self.models, scales, self.images):
            if scale == 0:
                continue
            description = model.input_description
            feed = {name: inputs[name].astype(dtype) for name, (_, dtype) in description.items()
                    if name != "controlnet_cond"}
            feed["controlnet_cond"] = window_crops(image, self.layout, windows)
            for name, value in model.predict(feed).items():
                total[name] = total.get(name, 0) + scale * value.astype(np.float32)
        return {name: (total[name] if name in total else np.zeros(shape, np.float32)).astype(dtype)
                for name, (shape, dtype) in residual_inputs.items()}


def control_settings(controls: list[ControlRequest], start: float, end: float) -> dict[str, str]:
    """What the PNG records of each ControlNet, in the way A1111's ControlNet extension lists its units."""
    return {f"ControlNet {index}": f'"Model: {request.name}, Weight: {request.scale:g}, Guidance Start: {start:g}, '
                                   f'Guidance End: {end:g}, Image SHA-256: {request.image_sha256}"'
            for index, request in enumerate(controls)}


def check_control(start: float, end: float) -> None:
    if not 0 <= start < end <= 1:
        raise GenerationError(f"--control-start {start} and --control-end {end} must satisfy 0 <= start < end <= 1 "
                              "(fractions of the schedule)")
