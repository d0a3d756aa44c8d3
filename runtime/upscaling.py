"""The hires pass's settings and its upscalers: Lanczos, or an ESRGAN-family model (a user's .pth) through spandrel.

Hires ("generate, then upscale"): the image is enlarged by `factor`, then an image-to-image pass at the large size
with tiled denoising adds the detail the enlargement could not invent; `strength` says how much it may change.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .contract import VAE_FACTOR
from .errors import GenerationError

MIN_FACTOR, MAX_FACTOR = 1.0, 8.0
DEFAULT_STRENGTH = 0.35


class Upscaler(Protocol):
    name: str  # as the PNG parameters record it

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image: ...


class Lanczos:
    name = "Lanczos"

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


class ModelUpscaler:
    """A super-resolution model that spandrel recognises (ESRGAN, Real-ESRGAN, SwinIR, ...) on the CPU in float32;
    its output is brought to the requested size with Lanczos when its own scale differs."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise GenerationError(f"no upscaler model at {path}; pass an ESRGAN-family .pth file to --upscaler")
        try:
            import spandrel
        except ImportError:
            raise GenerationError(
                "--upscaler needs spandrel; install it with pip install 'coreml-sd[upscalers]'"
            ) from None
        try:
            descriptor = spandrel.ModelLoader().load_from_file(path)
        except Exception as exc:  # spandrel and torch.load fail in many ways on foreign files; all mean the same
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GenerationError(
                f"cannot read {path} as an upscaler model ({reason}); pass an ESRGAN-family .pth file"
            ) from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
            raise GenerationError(f"{path} holds a {descriptor.architecture.name} model, not an RGB upscaler")
        self.model = descriptor.eval()
        self.name = f"{path.name} ({descriptor.architecture.name} {descriptor.scale}x)"

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        import torch

        pixels = torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 255)
        with torch.inference_mode():
            enlarged = self.model(pixels).clamp(0, 1)[0].numpy().transpose(1, 2, 0)
        return Lanczos()(Image.fromarray((enlarged * 255).round().astype(np.uint8)), size)


@dataclass(frozen=True)
class Upscale:
    """`factor` in [1, 8]; `steps` of the detail pass (None: the generation's); `upscaler` enlarges the image."""

    factor: float
    strength: float = DEFAULT_STRENGTH
    steps: int | None = None
    upscaler: Upscaler = field(default_factory=Lanczos)

    def check(self) -> None:
        if not MIN_FACTOR <= self.factor <= MAX_FACTOR:
            raise GenerationError(f"--upscale must be in [{MIN_FACTOR:g}, {MAX_FACTOR:g}], not {self.factor:g}")
        if not 0 <= self.strength <= 1:
            raise GenerationError(f"--upscale-strength must be in [0, 1], not {self.strength}")
        if self.steps is not None and self.steps < 1:
            raise GenerationError(f"--upscale-steps must be at least 1, not {self.steps}")

    def size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The enlarged (width, height), rounded to whole latent pixels."""
        return tuple(max(VAE_FACTOR, round(side * self.factor / VAE_FACTOR) * VAE_FACTOR) for side in size)
