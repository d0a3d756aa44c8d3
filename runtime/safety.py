"""The safety checker stage: CLIP's preprocessing, the SafetyChecker package, flagged images made black.

The preprocessing is diffusers' feature extractor (transformers' CLIPImageProcessor, PIL backend), computed
from the configuration the converter recorded in the manifest: bicubic resize of the shortest edge, centre
crop, rescale to [0, 1], CLIP's mean and standard deviation. (Apple's Swift package instead squeezes the
image to 224x224 and uses ImageNet's statistics; scores near a threshold can then differ.)
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .backends import Model

NO_ADJUSTMENT = 0.0  # diffusers' thresholds as they are
# SD v1.4's feature_extractor/preprocessor_config.json (CLIP's preprocessing, in the older flat format): for
# checkers that come without their own configuration.
SD_FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


@dataclass(frozen=True)
class ClipPreprocessing:
    resize: int | tuple[int, int] | None  # the shortest edge, or (height, width)
    crop: tuple[int, int] | None  # (height, width)
    resample: int
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: dict) -> "ClipPreprocessing":
        """From preprocessor_config.json, in either of its formats (sizes as numbers or as dictionaries)."""
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if isinstance(size, dict):
            size = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        normalize = config.get("do_normalize", True)
        return cls(
            resize=size if config.get("do_resize", True) else None,
            crop=crop if config.get("do_center_crop", True) else None,
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else None,
            mean=tuple(config["image_mean"]) if normalize else None,
            std=tuple(config["image_std"]) if normalize else None,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(1, 3, height, width) float32, as the feature extractor's `pixel_values`."""
        image = image.convert("RGB")
        if isinstance(self.resize, int):
            short, long = sorted(image.size)
            scaled = (self.resize, int(self.resize * long / short))
            image = image.resize(scaled if image.width <= image.height else scaled[::-1], self.resample)
        elif self.resize is not None:
            image = image.resize(self.resize[::-1], self.resample)
        pixels = np.asarray(image, dtype=np.float32)
        if self.crop is not None:
            top, left = (pixels.shape[0] - self.crop[0]) // 2, (pixels.shape[1] - self.crop[1]) // 2
            pixels = pixels[top : top + self.crop[0], left : left + self.crop[1]]
        if self.rescale_factor is not None:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.mean is not None:
            pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return pixels.transpose(2, 0, 1)[None]


class SafetyChecker:
    """`checker(image) -> (image or a black one, flagged)`, on a SafetyChecker package."""

    def __init__(self, model: Model, feature_extractor: dict):
        self.model = model
        self.preprocess = ClipPreprocessing.from_config(feature_extractor)
        self.dtypes = {name: dtype for name, (_, dtype) in model.input_description.items()}

    def scores(self, image: Image.Image) -> dict[str, np.ndarray]:
        """The package's outputs for `image`: `filtered_images`, `has_nsfw_concepts`, `concept_scores`. The CLIP
        input is prepared from the image itself; `images` takes it at the package's size (resized when the image
        was made larger, in tiles)."""
        height, width = self.model.input_description["images"][0][1:3]
        shown = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
        rgb = np.asarray(shown.convert("RGB"), dtype=np.float32)[None] / 255  # channels last in [0, 1], as decoded
        return self.model.predict({
            "clip_input": self.preprocess(image).astype(self.dtypes["clip_input"]),
            "images": rgb.astype(self.dtypes["images"]),
            "adjustment": np.array([NO_ADJUSTMENT], dtype=self.dtypes["adjustment"]),
        })

    def __call__(self, image: Image.Image) -> tuple[Image.Image, bool]:
        outputs = self.scores(image)
        flagged = bool(outputs["has_nsfw_concepts"].any())
        filtered = np.clip(outputs["filtered_images"][0] * 255, 0, 255).round().astype(np.uint8)
        if filtered.shape[1::-1] != image.size:  # checked at the package's size: black or the image as it was
            return (Image.new("RGB", image.size) if flagged else image), flagged
        return Image.fromarray(filtered), flagged
