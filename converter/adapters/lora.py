"""LoRAs merged into the Unet and text encoder before conversion: W += scale · alpha/rank · up @ down.

Key names come in kohya's (`lora_unet_…`, `lora_te_…`, with `.alpha`; LoCon adds 3×3 convolutions),
diffusers' and PEFT's layouts; diffusers' own conversions turn each into PEFT's names (`<layer>.lora_A`,
`.lora_B`), which name the diffusers module each pair changes. The merge itself is the product above,
computed in float32 per layer, as PEFT's `merge` computes it.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from ..errors import ConversionError
from ..sources.folders import sha256
from . import Adapter, split_argument

PEFT_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")
LORA_MODULES = ("unet", "text_encoder")
# How diffusers' older layouts name a layer's down weight.
OLD_DOWN_SUFFIX = {"unet": ".lora.down.weight", "text_encoder": ".lora_linear_layer.down.weight"}


def parse_scale(text: str | None, argument: str) -> float:
    if text is None:
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise ConversionError(f"--lora {argument}: the scale {text!r} is not a number (PATH or PATH:SCALE)") from None


@dataclass
class LoraLayer:
    down: torch.Tensor  # lora_A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # lora_B: (out, rank) or (out, rank, 1, 1)
    alpha: float
    key: str  # the name in the file's converted layout, for messages


@dataclass
class Lora(Adapter):
    path: Path
    scale: float
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict, repr=False)  # module -> layer path -> pair
    digest: str = ""
    hub_id: str | None = None  # ORG/NAME[:FILE] for a LoRA downloaded by id

    @classmethod
    def from_argument(cls, argument: str) -> "Lora":
        from .hub import hub_lora, is_hub_argument

        hub_id = None
        if is_hub_argument(argument):
            path, scale, hub_id = hub_lora(argument)
        else:
            path, scale = split_argument(argument, "--lora", "LoRA")
        lora = cls(path=path, scale=parse_scale(scale, argument), hub_id=hub_id)
        lora.layers = read_lora(path)
        lora.digest = sha256(path)
        return lora

    def settings(self, module_name: str) -> list[dict]:
        if module_name not in self.layers:
            return []
        return [{"lora": self.path.name, "sha256": self.digest, "scale": self.scale}]

    def describe(self) -> list[dict]:
        # a hub file's resolved path is its cache blob, which has no suffix to tell its format by
        path = self.path if self.hub_id else self.path.resolve()
        return [{"lora": self.path.name, "path": str(path), "sha256": self.digest, "scale": self.scale,
                 "modules": sorted(self.layers), **({"id": self.hub_id} if self.hub_id else {})}]

    def check(self, module_name: str, layout: torch.nn.Module) -> None:
        for layer_path, layer in self.layers.get(module_name, {}).items():
            check_fits(self.target(module_name, layout, layer_path), layer, self.path.name)

    def apply(self, module_name: str, module: torch.nn.Module) -> None:
        for layer_path, layer in self.layers.get(module_name, {}).items():
            merge(self.target(module_name, module, layer_path), layer, self.scale, self.path.name)

    def target(self, module_name: str, module: torch.nn.Module, layer_path: str) -> torch.nn.Module:
        target = find_layer(module, layer_path)
        if target is None:
            raise ConversionError(f"LoRA {self.path.name}: {layer_path} matches no layer of the {module_name}; is it a "
                                  "LoRA for this model?")
        return target


def find_layer(module: torch.nn.Module, layer_path: str) -> torch.nn.Module | None:
    # transformers 5.6 flattened CLIPTextModel (no `text_model.` level); LoRA files keep the old names.
    candidates = [layer_path] + ([layer_path.removeprefix("text_model.")] if layer_path.startswith("text_model.")
                                 else [])
    for candidate in candidates:
        try:
            found = module.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(found, (torch.nn.Linear, torch.nn.Conv2d)):
            return found
    return None


def check_fits(target: torch.nn.Module, layer: LoraLayer, name: str) -> None:
    weight, rank = target.weight, layer.down.shape[0]
    if layer.up.flatten(1).shape != (weight.shape[0], rank) or layer.down.flatten(1).shape[1] != weight[0].numel():
        raise ConversionError(f"LoRA {name} is for another architecture: {layer.key} has shape "
                              f"{tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])} but the model's layer has "
                              f"{tuple(weight.shape)}")


@torch.no_grad()
def merge(target: torch.nn.Module, layer: LoraLayer, scale: float, name: str) -> None:
    check_fits(target, layer, name)
    weight, rank = target.weight, layer.down.shape[0]
    up, down = layer.up.float().flatten(1), layer.down.float().flatten(1)
    delta = (up @ down).reshape(weight.shape) * (scale * layer.alpha / rank)
    weight.copy_((weight.float() + delta).to(weight.dtype))


def read_lora(path: Path) -> dict[str, dict[str, LoraLayer]]:
    """The file's LoRA pairs by pipeline module and layer path, through diffusers' key conversions."""
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ConversionError(f"LoRA {path.name} cannot be read: {str(error).strip().splitlines()[-1]}") from None
    if not state:
        raise ConversionError(f"LoRA {path.name} holds no LoRA weights")
    others = sorted({key.split(".")[0] for key in state} - set(LORA_MODULES))
    if others:
        raise ConversionError(f"LoRA {path.name} is for another architecture: it changes {', '.join(others)}, which "
                              "SD 1.x/2.x models do not have")
    layers = {}
    for module_name in LORA_MODULES:
        prefix = module_name + "."
        part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        module_alphas = {key[len(prefix):-len(".alpha")]: value for key, value in (alphas or {}).items()
                         if key.startswith(prefix)}
        if part:
            config = {key[len(prefix):]: value for key, value in (metadata or {}).items() if key.startswith(prefix)}
            layers[module_name] = pair_layers(to_peft(part, module_name), to_peft_alphas(module_alphas, module_name),
                                              config, path.name)
    return layers


def to_peft(state: dict, module_name: str) -> dict:
    """diffusers' conversions from its older layouts (which its kohya conversion produces) to PEFT's names."""
    if all(PEFT_KEY.match(key) for key in state):
        return state
    if module_name == "unet":
        return convert_unet_state_dict_to_peft(state)
    # diffusers infers the old layout from an out-projection key, which a LoRA of q/k/v alone lacks.
    old = any(re.search(r"\.to_(q|k|v|out)_lora\.", key) for key in state)
    return convert_state_dict_to_peft(state, StateDictType.DIFFUSERS_OLD if old else None)


def to_peft_alphas(alphas: dict, module_name: str) -> dict[str, float]:
    """Alphas by layer path. Their keys name a layer by its down weight's old name, or the layer itself."""
    by_path = {}
    for key, value in alphas.items():
        down_key = key if key.endswith(".weight") else key + OLD_DOWN_SUFFIX[module_name]
        converted = PEFT_KEY.match(next(iter(to_peft({down_key: None}, module_name))))
        by_path[converted[1] if converted else key] = float(value)
    return by_path


def peft_alpha(layer_path: str, rank: int, config: dict) -> float:
    """The alpha PEFT's LoraConfig (saved as the file's metadata) gives a layer: its alpha_pattern's entry
    for the layer, else lora_alpha, else the rank (no scaling)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", layer_path):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def pair_layers(state: dict, alphas: dict[str, float], config: dict, name: str) -> dict[str, LoraLayer]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise ConversionError(f"LoRA {name}: {key} is not a LoRA weight this converter knows (lora_A/lora_B, "
                                  "lora_down/lora_up)")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    layers = {}
    for layer_path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConversionError(f"LoRA {name}: {layer_path} has only its lora_{''.join(pair)} weight")
        rank = pair["A"].shape[0]
        alpha = alphas[layer_path] if layer_path in alphas else peft_alpha(layer_path, rank, config)
        layers[layer_path] = LoraLayer(pair["A"], pair["B"], alpha, layer_path)
    return layers
