"""Pixels in and out: decoder output to PIL, input images to the encoder's range, PNGs with their settings."""
import errno
import io
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import GenerationError

logger = logging.getLogger("coreml_sd.runtime")


def to_pil(image: np.ndarray) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] (the VAEDecoder's output) to an RGB image, rounded as diffusers rounds."""
    pixels = np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def open_image(source: str | Path | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise GenerationError(f"no image at {source}; pass an existing image file to --image") from None
    except (UnidentifiedImageError, OSError) as exc:
        if Path(source).is_file() and Path(source).stat().st_size == 0:
            raise GenerationError(f"{source} is empty (0 bytes); pass a PNG or JPEG") from None
        raise GenerationError(f"{source} is not an image this runtime can read ({exc}); pass a PNG or JPEG") from None


def to_encoder_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1]; an image of another size is resized to `size` (width, height), the output's."""
    if image.size != size:
        logger.warning("resized the input image from %dx%d to %dx%d, the output's size", *image.size, *size)
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return pixels.transpose(2, 0, 1)[None]


def contact_sheet(images: list[Image.Image]) -> Image.Image:
    """The images on a near-square grid, row by row."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file size limit, a quota


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The PNG of an image with its settings as the `parameters` text chunk (what SD tools read back)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> None:
    """Write through a temporary file in the same folder and rename, so no half-written PNG is ever left."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise GenerationError(f"cannot write to {path.parent} ({exc.strerror}); choose another -o") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(png_bytes(image, parameters))
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's files are private; an image is not
        os.replace(temporary, path)
    except OSError as exc:
        os.unlink(temporary)
        remedy = "free disk space or choose another -o" if exc.errno in DISK_FULL_ERRNOS else "choose another -o"
        raise GenerationError(f"cannot write {path} ({exc.strerror or exc}); {remedy}") from None
