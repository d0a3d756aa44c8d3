"""Where the SafetyChecker's weights and its CLIP preprocessing come from.

A model carries its checker in `safety_checker/` with the preprocessing in `feature_extractor/`; a model that
carries none (most fine-tunes) borrows one with `--safety-checker PATH_OR_ID`: a diffusers model folder or id
that has one, or a transformers model folder or id such as `CompVis/stable-diffusion-safety-checker`
(config.json and weights beside preprocessor_config.json).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
)

from coreml_sd.runtime.safety import SD_FEATURE_EXTRACTOR

from ..errors import ConversionError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# What a download fetches, for both layouts; PyTorch pickles only where a repository has no safetensors.
HUB_PATTERNS = ["config.json", PREPROCESSOR_CONFIG, "model.safetensors", "safety_checker/config.json",
                "safety_checker/model.safetensors", f"feature_extractor/{PREPROCESSOR_CONFIG}"]
PICKLE_PATTERNS = ["pytorch_model.bin", "safety_checker/pytorch_model.bin"]


@dataclass(frozen=True)
class SafetyCheckerLocation:
    weights: Path  # a transformers model folder: config.json and the weights
    preprocessor_config: Path  # may be missing: then CLIP's own preprocessing applies

    def load(self, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
        """The checker in `dtype` and its feature extractor's configuration, as the files hold it."""
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(self.weights, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConversionError(f"cannot load a safety checker from {self.weights}: {error}".splitlines()[0]
                                  ) from error
        config = dict(SD_FEATURE_EXTRACTOR)
        if self.preprocessor_config.is_file():
            config = json.loads(self.preprocessor_config.read_text())
        return checker, config


def in_model_folder(folder: Path, hint: str) -> SafetyCheckerLocation:
    """The checker a diffusers model folder carries; `hint` names the model in the error for one without."""
    if not (folder / "safety_checker" / "config.json").is_file():
        raise ConversionError(f"{hint} has no safety checker: pass --safety-checker PATH_OR_ID "
                              "(e.g. CompVis/stable-diffusion-safety-checker) or leave SafetyChecker out of "
                              "--components")
    return SafetyCheckerLocation(folder / "safety_checker", folder / "feature_extractor" / PREPROCESSOR_CONFIG)


def locate(path_or_id: str, download) -> SafetyCheckerLocation:
    """`--safety-checker`: a local folder or a Hugging Face id, in either layout; `download(id, patterns=...)`
    fetches."""
    folder = Path(path_or_id).expanduser()
    if not folder.is_dir():
        if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
            raise ConversionError(f"--safety-checker {path_or_id}: no such folder, "
                                  "and not a Hugging Face id (org/name)")
        folder = download(path_or_id, patterns=HUB_PATTERNS)
        weights = folder / "safety_checker" if (folder / "safety_checker").is_dir() else folder
        if not any(weights.glob("*.safetensors")):
            folder = download(path_or_id, patterns=PICKLE_PATTERNS)
    if (folder / "safety_checker").is_dir():
        return in_model_folder(folder, path_or_id)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"--safety-checker {path_or_id}: "
                              "neither a safety_checker/ folder nor a config.json there")
    return SafetyCheckerLocation(folder, folder / PREPROCESSOR_CONFIG)
