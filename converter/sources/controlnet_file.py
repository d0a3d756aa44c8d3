"""Single-file ControlNets (`--controlnet control_v11p_sd15_canny.safetensors`), as model sites publish them:
lllyasviel's original layout (`control_model.` keys; some SD 2.x ControlNets ship the same keys bare) or diffusers'
keys in one file, as `.safetensors` or as a `.pth`/`.ckpt` read through the restricted unpickler.

Such a file holds weights only. A ControlNet is a copy of its Unet's encoder, so its config is the model's Unet's
with what the weights themselves say (input channels, text width, the control image's embedding), built offline. A
file whose tensors do not fit that config is refused, in one line, before anything converts; the keys are renamed by
diffusers' own single-file conversion.
"""
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from ..errors import ConversionError
from .folders import empty_module, fill_module, sha256
from .single_file import FIRST_CONV, UNET_PREFIXES, Checkpoint

ORIGINAL_PREFIX = "control_model."
ORIGINAL_HINT = "input_hint_block."  # the control image's embedding, in the original layout
DIFFUSERS_HINT = "controlnet_cond_embedding."
CONTROLNET_SETTINGS = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
HINT_INDEX = re.compile(r"^input_hint_block\.(\d+)\.weight$")
BLOCK_INDEX = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.weight$")
TEXT_KEY = re.compile(r"attn2\.to_k\.weight$")


def key_prefix(shapes: dict[str, tuple]) -> str | None:
    """Where a file's ControlNet weights begin: `control_model.`, nothing (bare original keys or diffusers' keys),
    or None when the file holds no ControlNet."""
    if ORIGINAL_PREFIX + ORIGINAL_HINT + "0.weight" in shapes:
        return ORIGINAL_PREFIX
    if ORIGINAL_HINT + "0.weight" in shapes or DIFFUSERS_HINT + "conv_in.weight" in shapes:
        return ""
    return None


def embedding_channels(shapes: dict[str, tuple]) -> tuple[int, list[int]]:
    """The control image's channels and the embedding's widths (`conditioning_embedding_out_channels`): the first
    convolution's, then every second block's, whose stride-2 convolutions change the width."""
    if DIFFUSERS_HINT + "conv_in.weight" in shapes:
        first = shapes[DIFFUSERS_HINT + "conv_in.weight"]
        blocks = sorted(int(m[1]) for name in shapes if (m := BLOCK_INDEX.match(name)))
        widths = [shapes[f"{DIFFUSERS_HINT}blocks.{index}.weight"][0] for index in blocks]
    else:
        first = shapes[ORIGINAL_HINT + "0.weight"]
        convolutions = sorted(int(m[1]) for name in shapes if (m := HINT_INDEX.match(name)))
        widths = [shapes[f"{ORIGINAL_HINT}{index}.weight"][0] for index in convolutions[1:-1]]  # not in nor out
    return first[1], [first[0], *widths[1::2]]


def file_config(shapes: dict[str, tuple], unet_config: dict) -> dict:
    """The ControlNet's diffusers config: the Unet's encoder settings, and what the weights say."""
    config = {key: value for key, value in unet_config.items() if key in CONTROLNET_SETTINGS}
    conditioning_channels, widths = embedding_channels(shapes)
    first_conv = shapes.get("conv_in.weight") or shapes.get("input_blocks.0.0.weight")
    config.update(conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=widths)
    if first_conv:
        config["in_channels"] = first_conv[1]
    text_widths = {shape[-1] for name, shape in shapes.items() if TEXT_KEY.search(name)}
    if len(text_widths) == 1:
        config["cross_attention_dim"] = text_widths.pop()
    return config


@dataclass
class ControlNetFileReader:
    """A ControlNet in one file: its tensors read (after `prefix`) and renamed when converted."""

    checkpoint: Checkpoint
    prefix: str
    config: dict

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        state = self.checkpoint.read((self.prefix,), dtype)
        state = convert_controlnet_checkpoint({name.removeprefix(self.prefix): t for name, t in state.items()},
                                              self.config)
        try:
            return fill_module(self.empty(module_name), state, "the ControlNet config")
        except (ValueError, RuntimeError) as error:
            raise ConversionError(f"cannot load the ControlNet from {self.checkpoint.path.name}: "
                                  f"{str(error).splitlines()[0]}") from error

    def empty(self, module_name: str) -> torch.nn.Module:
        return empty_module(ControlNetModel, self.config)

    def file_hashes(self, modules: set[str]) -> dict[str, str]:
        return {self.checkpoint.path.name: sha256(self.checkpoint.path)}

    def write_tokenizer_files(self, destination: Path) -> None:
        raise NotImplementedError("a ControlNet has no tokenizer")

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str):
        raise NotImplementedError("a ControlNet has no safety checker")

    def check_weights_fit(self, argument: str, model_name: str) -> None:
        """Refuse, in one line, a file whose tensors (renamed, by shape alone) do not fit the config."""
        shapes = {name.removeprefix(self.prefix): torch.empty(shape, device="meta")
                  for name, shape in self.checkpoint.shapes.items() if name.startswith(self.prefix)}
        found = {name: tuple(t.shape) for name, t in convert_controlnet_checkpoint(shapes, self.config).items()
                 if t is not None}
        expected = {name: tuple(t.shape) for name, t in self.empty("controlnet").state_dict().items()}
        problems = [f"it lacks {name}" for name in expected if name not in found]
        problems += [f"its {name} is {found[name]}, the Unet's layout needs {expected[name]}" for name in expected
                     if name in found and found[name] != expected[name]]
        problems += [f"it has {name}, which the Unet's layout lacks" for name in found if name not in expected]
        if problems:
            raise ConversionError(f"--controlnet {argument} does not fit {model_name}'s Unet ({problems[0]}); pass a "
                                  "ControlNet trained for this model's family")


def controlnet_file_reader(path: Path, argument: str, unet_config: dict,
                           check_fits: Callable[[dict], None], model_name: str) -> ControlNetFileReader:
    """The reader of a single-file ControlNet, once the file is known to hold one that fits the model's Unet:
    `check_fits(config)` judges the settings the weights say, then every tensor's shape is checked."""
    checkpoint = Checkpoint(path)
    prefix = key_prefix(checkpoint.shapes)
    if prefix is None:
        if FIRST_CONV in checkpoint.shapes or checkpoint.has(UNET_PREFIXES):
            raise ConversionError(f"--controlnet {argument} is a Stable Diffusion checkpoint, not a ControlNet: pass "
                                  "it with --model, and --controlnet a ControlNet (e.g. control_v11p_sd15_canny)")
        raise ConversionError(f"--controlnet {argument} holds no ControlNet (no {ORIGINAL_PREFIX}{ORIGINAL_HINT}0 or "
                              f"{DIFFUSERS_HINT}conv_in weights): pass a ControlNet file, folder or Hugging Face id")
    shapes = {name.removeprefix(prefix): shape for name, shape in checkpoint.shapes.items() if name.startswith(prefix)}
    config = file_config(shapes, unet_config)
    check_fits(config)
    reader = ControlNetFileReader(checkpoint, prefix, config)
    reader.check_weights_fit(argument, model_name)
    return reader
