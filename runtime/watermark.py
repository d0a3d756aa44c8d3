"""The invisible watermark Stable Diffusion puts in its images, with the library it uses (invisible-watermark).

Method `dwtDct`: the bits are written into the U channel's Haar-wavelet approximation, one per 4x4 DCT block,
repeated over the image. The image goes through the library as CompVis' scripts pass it: 8-bit BGR. The
library refuses images under 256x256 pixels. Which message a package's images carry is data in its manifest
(`watermark`); SD 1.x and 2.x write `StableDiffusionV1`, SDXL the 48 bits of diffusers' SDXL watermarker.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import GenerationError

METHOD = "dwtDct"
MIN_PIXELS = 256 * 256  # the library's limit on rows x columns
# The share of matched bits from which an image counts as watermarked: by chance, 136 bits reach it with
# probability 4e-13 and 48 bits 8e-6; watermarked images keep 82-100% (photographs at 256x256 the least),
# JPEG at quality 90 leaves 40-60% (scripts/bench_watermark.py).
PRESENT_FRACTION = 0.8


@dataclass(frozen=True)
class Watermark:
    name: str
    bits: tuple[int, ...]

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Watermark":
        return cls(payload.decode(), tuple(int(bit) for bit in np.unpackbits(np.frombuffer(payload, np.uint8))))

    @classmethod
    def from_manifest(cls, entry: dict) -> "Watermark":
        if entry.get("method") != METHOD:
            raise ValueError(f"watermark method {entry.get('method')!r} is not {METHOD}")
        return cls(entry["name"], tuple(int(bit) for bit in entry["bits"]))

    def to_manifest(self) -> dict:
        return {"method": METHOD, "name": self.name, "bits": "".join(map(str, self.bits))}


# CompVis' txt2img.py and img2img.py (SD 1.x; Stability's SD 2.x scripts write the same).
STABLE_DIFFUSION_V1 = Watermark.from_bytes(b"StableDiffusionV1")
# diffusers' StableDiffusionXLWatermarker (from Stability's generative-models).
STABLE_DIFFUSION_XL = Watermark("SDXL", tuple(int(bit) for bit
                                              in format(0b101100111110110010010000011110111011000110011110, "b")))
KNOWN_WATERMARKS = (STABLE_DIFFUSION_V1, STABLE_DIFFUSION_XL)


def fits(image: Image.Image) -> bool:
    return image.width * image.height >= MIN_PIXELS


def _library():
    """invisible-watermark, or one line on what to do when OpenCV cannot load (Linux without libGL)."""
    try:
        import imwatermark
    except ImportError as error:
        raise GenerationError(f"invisible-watermark cannot load ({error}); on Linux install libgl1 or "
                              "pip install opencv-python-headless, or pass --no-watermark") from None
    return imwatermark


def apply(image: Image.Image, watermark: Watermark) -> Image.Image:
    """`image` with `watermark` written in; call only where `fits(image)`."""
    encoder = _library().WatermarkEncoder()
    encoder.set_watermark("bits", list(watermark.bits))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, METHOD)[:, :, ::-1]))


def read_bits(image: Image.Image, length: int) -> np.ndarray:
    """The `length` bits the method reads from `image` (whatever it holds: unmarked images give noise)."""
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return np.asarray(_library().WatermarkDecoder("bits", length).decode(bgr, METHOD), dtype=np.uint8)


def matched_bits(image: Image.Image, watermark: Watermark) -> int:
    """How many of the watermark's bits `image` holds; about half of them by chance."""
    return int((read_bits(image, len(watermark.bits)) == np.array(watermark.bits)).sum())
