"""The inpainting stage for any ordinary package: redraw only where a mask is white, by blending.

Every step, the latents outside the mask are replaced by the original image's latents noised to the next step's
level (the clean latents after the last step), as diffusers' StableDiffusionInpaintPipeline does for a Unet of 4
input channels; the decoded image is then composited over the original through the blurred mask, as A1111 does
(inpaint_stage.py), so every pixel the blurred mask leaves at 0 is the original's, exactly.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .contract import VAE_FACTOR
from .errors import GenerationError

logger = logging.getLogger("coreml_sd.runtime")
DEFAULT_MASK_BLUR = 4  # pixels, A1111's default
OPAQUE = 255


@dataclass(frozen=True)
class Inpainting:
    """The redraw mask at the image's size (L: white = redraw), how far its edge is feathered (Gaussian standard
    deviations in pixels, across and, where it differs, down) and where it is generated: the whole picture, or with
    `padding` only the box around the mask, that many pixels wider each way (A1111's "only masked")."""

    mask: Image.Image
    blur: int = DEFAULT_MASK_BLUR
    blur_y: int | None = None  # None: `blur`
    padding: int | None = None  # None: the whole picture

    def __post_init__(self) -> None:
        for what, value in (("mask blur", self.blur), ("vertical mask blur", self.blur_y), ("padding", self.padding)):
            if value is not None and value < 0:
                raise GenerationError(f"the {what} must be at least 0 pixels, not {value}")

    @property
    def empty(self) -> bool:
        """Nothing to redraw: the blurred mask is black everywhere."""
        return self.blurred().getextrema()[1] == 0

    def blurred(self) -> Image.Image:
        """The mask feathered as A1111 feathers it: a Gaussian across, then one down, each cut at 2.5 deviations."""
        across, down = self.blur, self.blur if self.blur_y is None else self.blur_y
        if not across and not down:
            return self.mask
        import cv2  # the watermark's dependency, loaded once a mask is feathered

        pixels = np.asarray(self.mask)
        for deviation, kernel in ((across, lambda length: (length, 1)), (down, lambda length: (1, length))):
            if deviation:
                pixels = cv2.GaussianBlur(pixels, kernel(2 * int(2.5 * deviation + 0.5) + 1), deviation)
        return Image.fromarray(pixels)

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

    @property
    def settings(self) -> dict[str, object]:
        """What the PNG records, in A1111's names (it leaves out a blur of 0 and one that differs down)."""
        settings = {"Mask blur": self.blur} if self.blur > 0 and self.blur_y in (None, self.blur) else {}
        if self.padding is not None:
            settings.update({"Inpaint area": "Only masked", "Masked area padding": self.padding})
        return settings


def redraw_mask(picture: Image.Image) -> Image.Image:
    """The mask a picture means (L, white = redraw), as A1111 reads one: a picture with transparency is a stroke
    painted on a clear layer, its pixels more than half opaque redrawn; any other picture, its grey levels."""
    if "A" in picture.getbands() and picture.getchannel("A").getextrema()[0] < OPAQUE:
        return picture.getchannel("A").point(lambda alpha: OPAQUE if alpha > OPAQUE // 2 else 0)
    return picture.convert("L")


def open_mask(mask: str | Path | Image.Image | None, image: str | Path | Image.Image, blur: int,
              padding: int | None = None) -> Inpainting | None:
    """The inpainting a mask (or, without one, the image's transparency: transparent = redraw) asks for, of the
    whole picture or (with `padding`) only the masked area; None without a mask and without transparency. An
    all-black mask warns: there is nothing to redraw."""
    if blur < 0:
        raise GenerationError(f"--mask-blur must be at least 0 pixels, not {blur}")
    picture = open_with_alpha(image, "--image")
    if mask is None:
        if "A" not in picture.getbands() or picture.getchannel("A").getextrema()[0] == OPAQUE:
            return None
        redraw = Image.eval(picture.getchannel("A"), lambda alpha: OPAQUE - alpha)
    else:
        redraw = redraw_mask(open_with_alpha(mask, "--mask"))
        if redraw.size != picture.size:
            raise GenerationError(f"the mask is {redraw.size[0]}x{redraw.size[1]} but the image "
                                  f"{picture.size[0]}x{picture.size[1]}: pass a mask of the image's size")
    inpainting = Inpainting(redraw, blur, padding=padding)
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
