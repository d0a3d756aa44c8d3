"""Single-file checkpoints (`.safetensors`, `.ckpt`) in the original CompVis/LDM key layout, as model sites
publish fine-tunes: converted offline, with the configs of `checkpoint_configs` (or of `--config FOLDER`).

Only the tensors of the module being loaded are read, one at a time, and cast as they are read, so a
component's conversion holds what it would hold from a diffusers folder. The LDM keys are renamed by
diffusers' own single-file conversion functions.
"""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import ConversionError
from . import ModelSource
from .builtin import copy_clip_vocabulary_files
from .checkpoint_configs import MODEL_TYPES, NOT_YET, PREDICTION_TYPES, ModelType
from .folders import (
    empty_module,
    fill_module,
    fill_text_encoder,
    read_json,
    read_safetensors,
    safetensors_header,
    sha256,
)
from .pickles import load_checkpoint

UNET_PREFIXES = ("model.diffusion_model.",)
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
CROSS_ATTENTION_KEY = re.compile(r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")
TEXT_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")
# SD 2.0-base's released checkpoint stopped at this step; diffusers' original conversion script reads it as
# "512 base, epsilon" and every other SD 2.x checkpoint as 768-v.
SD2_BASE_GLOBAL_STEP = 875000
SD2_BY_PREDICTION = {"epsilon": "sd2", "v_prediction": "sd2-v"}
# A text-to-image Unet takes the latents; an inpainting Unet also the mask and the masked image's latents.
UNET_INPUT_CHANNELS = (4, 9)
INPAINTING_CHANNELS = 9


class Checkpoint:
    """Tensor names and shapes of a single file, and its tensors read by name prefix."""

    def __init__(self, path: Path):
        self.path = path
        self.hints: dict = {}
        if path.suffix == ".safetensors":
            try:
                header, _ = safetensors_header(path)
            except (ValueError, UnicodeDecodeError, OSError) as error:
                raise ConversionError(f"{path.name} is not a readable .safetensors file ({error})") from None
            self.shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
            self.tensors = None
        else:
            loaded = load_checkpoint(path)
            state = loaded.get("state_dict", loaded)
            self.hints = {key: value for key, value in loaded.items() if isinstance(value, (int, float, str))}
            self.tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
            self.shapes = {name: tuple(tensor.shape) for name, tensor in self.tensors.items()}

    def has(self, prefixes: tuple[str, ...]) -> bool:
        return any(name.startswith(prefixes) for name in self.shapes)

    def read(self, prefixes: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        def wanted(name):
            return name.startswith(prefixes)

        if self.tensors is None:
            return read_safetensors(self.path, dtype, wanted)
        return {name: tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
                for name, tensor in self.tensors.items() if wanted(name)}


@dataclass
class SingleFileReader:
    checkpoint: Checkpoint
    configs: dict[str, dict]  # module name -> diffusers config

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        loader = getattr(self, f"_load_{module_name}")
        try:
            return loader(self.configs[module_name], dtype)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ConversionError(f"cannot load {module_name} from {self.checkpoint.path.name}: "
                                  f"{str(error).splitlines()[0]}") from error

    def empty(self, module_name: str) -> torch.nn.Module:
        if module_name == "text_encoder":
            return empty_module(CLIPTextModel, CLIPTextConfig(**self.configs[module_name]))
        return empty_module({"unet": UNet2DConditionModel, "vae": AutoencoderKL}[module_name],
                            self.configs[module_name])

    def _load_unet(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        state = convert_ldm_unet_checkpoint(self.checkpoint.read(UNET_PREFIXES, dtype), config)
        return fill_module(empty_module(UNet2DConditionModel, config), state, "the Unet config")

    def _load_vae(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        state = convert_ldm_vae_checkpoint(self.checkpoint.read(VAE_PREFIXES, dtype), config)
        return fill_module(empty_module(AutoencoderKL, config), state, "the VAE config")

    def _load_text_encoder(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        text_config = CLIPTextConfig(**config)
        module = empty_module(CLIPTextModel, text_config)
        if self.checkpoint.has((CLIP_PREFIX,)):
            state = convert_ldm_clip_checkpoint(self.checkpoint.read((CLIP_PREFIX,), dtype))
        else:
            state = convert_open_clip_checkpoint(module, self.checkpoint.read((OPEN_CLIP_PREFIX,), dtype),
                                                 OPEN_CLIP_PREFIX)
        # Not part of the module: OpenCLIP's projection and the layers after the one SD conditions on (OpenCLIP
        # has 24; SD 2.x reads the 23rd).
        state = {name: tensor for name, tensor in state.items() if not (
            "text_projection" in name or ((layer := TEXT_LAYER_KEY.match(name.removeprefix("text_model.")))
                                          and int(layer.group(1)) >= text_config.num_hidden_layers))}
        module = fill_text_encoder(module, state, "the text encoder config")
        return module.to(dtype=dtype)

    def file_hashes(self, modules: set[str]) -> dict[str, str]:
        return {self.checkpoint.path.name: sha256(self.checkpoint.path)}

    def write_tokenizer_files(self, destination: Path) -> None:
        copy_clip_vocabulary_files(destination)

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str) -> tuple[torch.nn.Module, dict]:
        raise ConversionError(f"{self.checkpoint.path.name} holds no safety checker; pass --safety-checker PATH_OR_ID "
                              "(e.g. CompVis/stable-diffusion-safety-checker)")


def check_supported(checkpoint: Checkpoint) -> None:
    """Refuse, in one line, the checkpoints this converter cannot convert from a single file."""
    if checkpoint.has((SDXL_PREFIX,)):
        raise ConversionError(f"{checkpoint.path.name} is an SDXL checkpoint, which single-file conversion does not "
                              "support yet: convert its diffusers folder instead")
    if FIRST_CONV not in checkpoint.shapes:
        raise ConversionError(f"{checkpoint.path.name} has no Stable Diffusion Unet ({FIRST_CONV}): is it a LoRA, an "
                              "embedding or a VAE? pass those with --lora/--embedding, and --model the model itself")
    if checkpoint.shapes[FIRST_CONV][1] not in UNET_INPUT_CHANNELS:
        raise ConversionError(f"{checkpoint.path.name}'s Unet takes {checkpoint.shapes[FIRST_CONV][1]} input channels "
                              "(an InstructPix2Pix or depth model?), which this converter does not run: convert a "
                              "text-to-image (4 channels) or inpainting (9 channels) model")


def detect_model_type(checkpoint: Checkpoint) -> tuple[str, str]:
    """The model type a checkpoint's tensor names and shapes say, and why."""
    if checkpoint.has((CLIP_PREFIX,)):
        return "sd1", "CLIP text encoder inside"
    if checkpoint.has((OPEN_CLIP_PREFIX,)):
        return "sd2", "OpenCLIP text encoder inside"
    widths = {checkpoint.shapes[name][-1] for name in checkpoint.shapes if CROSS_ATTENTION_KEY.match(name)}
    by_width = {768: "sd1", 1024: "sd2"}
    if len(widths) == 1 and widths <= by_width.keys():
        width = widths.pop()
        return by_width[width], f"cross-attention width {width}"
    raise ConversionError(f"cannot tell which model {checkpoint.path.name} is (cross-attention width "
                          f"{', '.join(map(str, sorted(widths))) or 'unknown'}): pass --model-type and --config")


def choose_prediction_type(model_type: str, checkpoint: Checkpoint, asked: str | None) -> tuple[str, str, str]:
    """The model type and prediction type, and why. SD 2.x comes as 512 base (epsilon) or 768-v
    (v-prediction) with the same tensors: the flag decides, else the checkpoint's own hints, else the 768-v
    default (as diffusers' single-file loader)."""
    is_sd2 = model_type in SD2_BY_PREDICTION.values()
    if asked:
        return (SD2_BY_PREDICTION[asked] if is_sd2 else model_type), asked, "--prediction-type"
    if "v_pred" in checkpoint.shapes:
        return ("sd2-v" if is_sd2 else model_type), "v_prediction", "the checkpoint's v_pred marker"
    if model_type == "sd2":
        if checkpoint.shapes[FIRST_CONV][1] == INPAINTING_CHANNELS:
            return "sd2", "epsilon", "SD 2 inpainting (512-inpainting-ema) is a 512 epsilon model"
        if checkpoint.hints.get("global_step") == SD2_BASE_GLOBAL_STEP:
            return "sd2", "epsilon", f"global_step {SD2_BASE_GLOBAL_STEP}, SD 2.0-base's checkpoint"
        return "sd2-v", "v_prediction", "the SD 2.x default; pass --prediction-type epsilon for a 512 base model"
    return model_type, MODEL_TYPES[model_type].scheduler["prediction_type"], "the model type's default"


def single_file_source(path: Path, model_type: str | None, prediction_type: str | None,
                       config_folder: Path | None) -> ModelSource:
    if model_type in NOT_YET:
        raise ConversionError(f"single-file checkpoints of {NOT_YET[model_type]} cannot be converted yet: convert its "
                              "diffusers folder instead")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ConversionError(f"unknown --model-type {model_type!r}: choose from {', '.join([*MODEL_TYPES, *NOT_YET])}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConversionError(f"unknown --prediction-type {prediction_type!r}: choose from "
                              f"{', '.join(PREDICTION_TYPES)}")
    checkpoint = Checkpoint(path)
    check_supported(checkpoint)
    if model_type and not prediction_type:
        why = prediction_why = "--model-type"
        prediction_type = MODEL_TYPES[model_type].scheduler["prediction_type"]
    else:
        why = "--model-type"
        if not model_type:
            model_type, why = detect_model_type(checkpoint)
        model_type, prediction_type, prediction_why = choose_prediction_type(model_type, checkpoint, prediction_type)
    chosen: ModelType = MODEL_TYPES[model_type]
    configs = {"unet": chosen.unet, "vae": chosen.vae, "text_encoder": chosen.text_encoder,
               "scheduler": chosen.scheduler}
    if config_folder is not None:
        configs = {module: read_json(Path(config_folder) / module / ("scheduler_config.json" if module == "scheduler"
                                                                     else "config.json")) for module in configs}
    scheduler = dict(configs["scheduler"], prediction_type=prediction_type)
    # The weights say whether the Unet inpaints, whatever config they come with.
    configs["unet"] = dict(configs["unet"], in_channels=checkpoint.shapes[FIRST_CONV][1])
    absent = frozenset(module for module, prefixes in (("vae", VAE_PREFIXES),
                                                        ("text_encoder", (CLIP_PREFIX, OPEN_CLIP_PREFIX)))
                       if not checkpoint.has(prefixes))
    inpainting = "; inpainting Unet (9 input channels)" if configs["unet"]["in_channels"] == INPAINTING_CHANNELS else ""
    print(f"{path.name}: {chosen.description} ({why}); {scheduler['prediction_type']} ({prediction_why}){inpainting}"
          + (f"; holds no {' or '.join(sorted(absent))} weights" if absent else ""), file=sys.stderr)
    description = {"path": str(path), "model_type": model_type, "prediction_type": scheduler["prediction_type"]}
    if config_folder is not None:
        description["config"] = str(Path(config_folder).resolve())
    return ModelSource(
        name=path.stem,
        description=description,
        scheduler_config=scheduler,
        conditioning=chosen.family.conditioning(configs["unet"], {"text_encoder": configs["text_encoder"]}),
        sample_size=int(configs["unet"]["sample_size"]),
        latent_scaling_factor=float(configs["vae"].get("scaling_factor", chosen.family.contract.latent_scaling_factor)),
        prediction_type=scheduler["prediction_type"],
        family=chosen.family,
        reader=SingleFileReader(checkpoint, configs),
        absent_modules=absent,
        pad_token=chosen.pad_token,
    )
