"""The inpainting stage the pipeline composes: what a generation starts from, which latents it redraws, and how
its result goes back over the image, as A1111 does it.

Whole picture: the image and its blurred mask are brought to the generation's size; the result is composited over
the image through the blurred mask doubled (A1111's overlay: the latents redrawn where the blurred mask is at least
half, and those pixels show fully). Only masked: the box around the blurred mask, padded and widened to the
generation's aspect ratio, is generated at the generation's size and pasted back through the blurred mask at the
image's size, once, so a 512x512 package repairs a hand in a 1024x1024 image. Either way every pixel the blurred
mask leaves at 0 is the image's, exactly.
"""
from dataclasses import dataclass

from PIL import Image

from .errors import GenerationError
from .inpainting import OPAQUE, Inpainting

INPAINT_AREAS = ("whole", "masked")  # A1111's "whole picture" and "only masked"
DEFAULT_PADDING = 32  # pixels around the mask's box, A1111's default in its web page (its API's is 0)


@dataclass(frozen=True)
class MaskedArea:
    """The box (left, top, right, bottom) in the image that "only masked" generates."""

    box: tuple[int, int, int, int]

    @classmethod
    def around(cls, blurred: Image.Image, padding: int, size: tuple[int, int]) -> "MaskedArea":
        """The box around the blurred mask's white, `padding` pixels wider each way within the image, then widened
        to the aspect ratio of `size` (width, height), centred where the image allows."""
        left, top, right, bottom = blurred.getbbox()
        width, height = blurred.size
        left, top = max(left - padding, 0), max(top - padding, 0)
        right, bottom = min(right + padding, width), min(bottom + padding, height)
        aspect = size[0] / size[1]
        if (right - left) / (bottom - top) < aspect:
            left, right = _widened(left, right, round((bottom - top) * aspect), width)
        else:
            top, bottom = _widened(top, bottom, round((right - left) / aspect), height)
        return cls((left, top, right, bottom))

    def crop(self, picture: Image.Image, size: tuple[int, int]) -> Image.Image:
        return picture.crop(self.box).resize(size, Image.Resampling.LANCZOS)

    def paste(self, generated: Image.Image, original: Image.Image, overlay: Image.Image) -> Image.Image:
        """The generated crop back in its box, composited over the original through `overlay` (image-sized)."""
        whole = original.convert("RGB")
        pasted = whole.copy()
        pasted.paste(generated.resize((self.box[2] - self.box[0], self.box[3] - self.box[1]),
                                      Image.Resampling.LANCZOS), self.box[:2])
        return Image.composite(pasted, whole, overlay)


def _widened(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown to `length` (at most `limit`) around its centre, shifted to stay within [0, limit)."""
    length = min(length, limit)
    low = max(0, min((low + high - length) // 2, limit - length))
    return low, low + length


@dataclass(frozen=True)
class InpaintStage:
    """One request's inpainting at the generation's size."""

    original: Image.Image  # the image as given
    source: Image.Image  # what the generation starts from: the image, or the masked area's crop
    redraw: Inpainting  # the blurred mask at the generation's size, not blurred again: latents and masked pixels
    overlay: Image.Image  # what the result is composited through: at the generation's size, or the image's
    area: MaskedArea | None
    settings: dict[str, object]

    @classmethod
    def prepare(cls, inpainting: Inpainting, image: Image.Image, size: tuple[int, int]) -> "InpaintStage":
        """The stage for a mask with white in it over `image`, generated at `size` (width, height)."""
        blurred = inpainting.blurred()
        if inpainting.padding is None:
            scaled = blurred if blurred.size == size else blurred.resize(size, Image.Resampling.LANCZOS)
            overlay = scaled.point(lambda level: min(2 * level, OPAQUE))
            return cls(image, image, Inpainting(scaled, blur=0), overlay, None, inpainting.settings)
        area = MaskedArea.around(blurred, inpainting.padding, size)
        return cls(image, area.crop(image, size), Inpainting(area.crop(blurred, size), blur=0),
                   blurred, area, inpainting.settings)

    def finish(self, generated: Image.Image) -> Image.Image:
        """The generated picture over the image: only what the mask redraws is new."""
        if self.area is not None:
            return self.area.paste(generated, self.original, self.overlay)
        original = self.original.convert("RGB")
        if original.size != generated.size:
            original = original.resize(generated.size, Image.Resampling.LANCZOS)
        return Image.composite(generated, original, self.overlay)


def check_inpainting(image: Image.Image | None, size: tuple[int, int], refined: bool,
                     unet_size: tuple[int, int] | None) -> None:
    """That inpainting at `size` can run: on an image, without a refiner or hires pass, and at the Unet's own size
    (`unet_size`) for an inpainting Unet."""
    if image is None:
        raise GenerationError("a mask needs the image it masks: add --image PATH")
    if refined:
        raise GenerationError("inpainting cannot be combined with --refiner or --upscale yet; inpaint first, then "
                              "refine or upscale the result")
    if unet_size is not None and size != unet_size:
        raise GenerationError(f"an inpainting Unet runs at its package's size only ({unet_size[0]}x{unet_size[1]}): "
                              "leave out --width and --height")
