"""The inpainting stage for any ordinary package: redraw only where a mask is white, by blending.

Every step, the latents outside the mask are replaced by the original image's latents noised to the next step's
level (the clean latents after the last step), as diffusers' StableDiffusionInpaintPipeline does for a Unet of 4
input channels; the decoded image is then composited over the original through the blurred mask, as A1111 does,
so every pixel the blurred mask leaves at 0 is the original's, exactly.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from .contract import VAE_FACTOR
from .errors import GenerationError

logger = logging.getLogger("coreml_sd.runtime")
DEFAULT_MASK_BLUR = 4  # pixels, A1111's default
OPAQUE = 255


@dataclass(frozen=True)
class Inpainting:
    """The redraw mask at the image's size (L: white = redraw) and its blur radius in pixels."""

    mask: Image.Image
    blur: int = DEFAULT_MASK_BLUR

    @property
    def empty(self) -> bool:
        return self.mask.getextrema()[1] == 0

    def at(self, size: tuple[int, int]) -> "Inpainting":
        """The mask at `size` (width, height), the generation's."""
        if self.mask.size == size:
            return self
        return Inpainting(self.mask.resize(size, Image.Resampling.LANCZOS), self.blur)

    def blurred(self) -> Image.Image:
        return self.mask.filter(ImageFilter.GaussianBlur(self.blur)) if self.blur else self.mask

    def latent_mask(self) -> np.ndarray:
        """(1, 1, h, w), 1 where the latents are redrawn: the blurred mask binarised at half and sampled at each
        latent pixel's top-left image pixel (diffusers' nearest-neighbour resize of its binarised mask)."""
        redraw = np.asarray(self.blurred(), dtype=np.float32) / OPAQUE >= 0.5
        return redraw[::VAE_FACTOR, ::VAE_FACTOR][None, None].astype(np.float32)

    def masked_pixels(self, image: Image.Image) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] with the pixels to redraw at 0, what an inpainting Unet's masked-image channels
        encode (diffusers: the image times the binarised mask's complement)."""
        pixels = np.asarray(image.convert("RGB").resize(self.mask.size, Image.Resampling.LANCZOS)
                            if image.size != self.mask.size else image.convert("RGB"), dtype=np.float32) / 127.5 - 1
        keep = np.asarray(self.blurred(), dtype=np.float32) / OPAQUE < 0.5
        return (pixels * keep[..., None]).transpose(2, 0, 1)[None]

    def composite(self, generated: Image.Image, original: Image.Image) -> Image.Image:
        """The generated pixels where the blurred mask is white, the original's where it is black, blended between."""
        return Image.composite(generated, original.resize(generated.size, Image.Resampling.LANCZOS)
                               if original.size != generated.size else original, self.blurred())


def open_mask(mask: str | Path | Image.Image | None, image: str | Path | Image.Image, blur: int) -> Inpainting | None:
    """The inpainting a mask (or, without one, the image's transparency: transparent = redraw) asks for; None
    without a mask and without transparency. An all-black mask warns: there is nothing to redraw."""
    if blur < 0:
        raise GenerationError(f"--mask-blur must be at least 0 pixels, not {blur}")
    picture = open_with_alpha(image, "--image")
    if mask is None:
        if "A" not in picture.getbands() or picture.getchannel("A").getextrema()[0] == OPAQUE:
            return None
        redraw = Image.eval(picture.getchannel("A"), lambda alpha: OPAQUE - alpha)
    else:
        redraw = open_with_alpha(mask, "--mask").convert("L")
        if redraw.size != picture.size:
            raise GenerationError(f"the mask is {redraw.size[0]}x{redraw.size[1]} but the image "
                                  f"{picture.size[0]}x{picture.size[1]}: pass a mask of the image's size")
    inpainting = Inpainting(redraw, blur)
    if inpainting.empty:
        logger.warning("the mask is black everywhere: nothing to inpaint, so the image is returned as it is")
    return inpainting


def open_with_alpha(source: str | Path | Image.Image, option: str) -> Image.Image:
    """An image as its file holds it, transparency included (`option` names it in the message if unreadable)."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as picture:
            picture.load()
            return picture
    except FileNotFoundError:
        raise GenerationError(f"no image at {source}; pass an existing image file to {option}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerationError(f"{source} is not an image this runtime can read ({exc}); pass a PNG") from None


class LatentBlend:
    """After each scheduler step: the latents outside the mask become the original's, noised to the next step."""

    def __init__(self, mask: np.ndarray, clean: torch.Tensor, noise: torch.Tensor, scheduler, timesteps: torch.Tensor):
        self.redraw = torch.from_numpy(mask)
        self.clean, self.noise, self.scheduler, self.timesteps = clean, noise, scheduler, timesteps

    def __call__(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        known = self.clean
        if step < len(self.timesteps) - 1:
            known = self.scheduler.add_noise(self.clean, self.noise, self.timesteps[step + 1 : step + 2])
        return known * (1 - self.redraw) + latents * self.redraw


INPAINT_AREAS = ("whole", "masked")  # A1111's "whole picture" and "only masked"
DEFAULT_PADDING = 32  # pixels around the mask's bounding box, A1111's default


@dataclass(frozen=True)
class MaskedArea:
    """A1111's "only masked": the box around the mask (padded, then widened to the package's aspect ratio) is
    generated at the package's size and pasted back, so a 512x512 package repairs a hand in a 1024x1024 image."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the image

    @classmethod
    def around(cls, inpainting: Inpainting, padding: int, size: tuple[int, int]) -> "MaskedArea":
        """The box for `inpainting`'s mask (its blurred extent) in an image of the mask's size, for a package
        making `size` (width, height) images."""
        if padding < 0:
            raise GenerationError(f"--inpaint-padding must be at least 0 pixels, not {padding}")
        bounds = inpainting.blurred().getbbox()
        if bounds is None:
            raise GenerationError("--inpaint-area masked needs a mask with white in it; the mask is black everywhere")
        width, height = inpainting.mask.size
        left, top = max(bounds[0] - padding, 0), max(bounds[1] - padding, 0)
        right, bottom = min(bounds[2] + padding, width), min(bounds[3] + padding, height)
        # widen the shorter side to the package's aspect ratio, centred, within the image
        aspect = size[0] / size[1]
        if (right - left) / (bottom - top) < aspect:
            left, right = _widened(left, right, round((bottom - top) * aspect), width)
        else:
            top, bottom = _widened(top, bottom, round((right - left) / aspect), height)
        return cls((left, top, right, bottom))

    def crop(self, picture: Image.Image, size: tuple[int, int]) -> Image.Image:
        return picture.crop(self.box).resize(size, Image.Resampling.LANCZOS)

    def paste(self, generated: Image.Image, original: Image.Image, inpainting: Inpainting) -> Image.Image:
        """The generated crop back in its box, composited over the original through the whole blurred mask."""
        full = original.convert("RGB").copy()
        width, height = self.box[2] - self.box[0], self.box[3] - self.box[1]
        full.paste(generated.resize((width, height), Image.Resampling.LANCZOS), self.box[:2])
        return Image.composite(full, original.convert("RGB"), inpainting.blurred())


def _widened(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown to `length` (at most `limit`) around its centre, shifted to stay within [0, limit)."""
    length = min(length, limit)
    low = max(0, min((low + high - length) // 2, limit - length))
    return low, low + length
