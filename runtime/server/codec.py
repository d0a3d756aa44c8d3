"""Images in and out of requests: base64 decoding behind Pillow's guards, and the progress preview.

The preview maps each latent pixel to a colour linearly, so no decoder runs during sampling: at first with SD v1's
published fit, then with a fit to the model's own last finished image (its latents against its pixels).

An input image is refused before its pixels are decoded when its header declares more pixels than any image
the server makes could use (a small PNG can declare gigapixels: a decompression bomb).
"""
import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import invalid
from .translation import MAX_SIDE

MAX_INPUT_PIXELS = 2 * MAX_SIDE * MAX_SIDE  # room for a 2048x2048 image in any aspect
# Keturn's linear fit of SD v1's VAE: latent channels (and an offset) -> approximate RGB in [-1, 1].
SD_LATENT_RGB = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                          [-0.184, -0.271, -0.473], [0.0, 0.0, 0.0]], dtype=np.float32)
VAE_FACTOR = 8  # image pixels per latent pixel, each way


def decode_base64(data: str, what: str) -> bytes:
    """A1111's image strings: raw base64 or a `data:image/...;base64,` URL; image URLs are never fetched."""
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise invalid(f"{what} is a URL; this server fetches nothing: send the image itself as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what} is not base64; send the image file's bytes base64-encoded") from None


def open_image(data: str, what: str, mode: str = "RGB") -> Image.Image:
    """An image from a base64 string, in `mode` (a mask keeps its transparency in RGBA); 422 for anything that is not
    a readable image of a sane size."""
    raw = decode_base64(data, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise invalid(f"{what} is {image.width}x{image.height}, more pixels than this server takes "
                              f"({MAX_INPUT_PIXELS}); send a smaller image")
            return image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(f"{what} declares more pixels than Pillow safely decodes; send a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise invalid(f"{what} is not an image this server can read ({reason}); send a PNG or JPEG") from None


def png_text(raw: bytes) -> dict[str, str]:
    """A PNG's text chunks (the image data itself is never decoded)."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return {key: value for key, value in image.info.items() if isinstance(value, str)}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise invalid("image is not a PNG this server can read; send the PNG file's bytes base64-encoded") from None


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def latent_rgb_fit(latents: torch.Tensor, image: Image.Image) -> np.ndarray | None:
    """The least-squares linear map (with offset) from each latent pixel to the mean colour of its block of the
    decoded image, in [-1, 1]; None when the image is not the latents' size (or too small to fit)."""
    values = latents[0].float().numpy()
    channels, height, width = values.shape
    if image.size != (width * VAE_FACTOR, height * VAE_FACTOR) or height * width <= channels + 1:
        return None
    pixels = np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1
    blocks = pixels.reshape(height, VAE_FACTOR, width, VAE_FACTOR, 3).mean(axis=(1, 3)).reshape(-1, 3)
    features = np.concatenate([values.reshape(channels, -1).T, np.ones((height * width, 1), np.float32)], axis=1)
    return np.linalg.lstsq(features, blocks, rcond=None)[0].astype(np.float32)


def preview_png(latents: torch.Tensor, latent_rgb: np.ndarray = SD_LATENT_RGB) -> bytes | None:
    """The latents as a small picture, one pixel per latent pixel, through `latent_rgb` (None for latents of
    another channel count)."""
    values = latents[0].float().numpy()
    if values.shape[0] + 1 != len(latent_rgb):
        return None
    rgb = np.einsum("chw,cr->hwr", values, latent_rgb[:-1]) + latent_rgb[-1]
    pixels = (np.clip(rgb / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
