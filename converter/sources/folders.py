"""Diffusers folders, local or downloaded from the Hugging Face hub.

diffusers modules (Unet, VAE) are built without weights on PyTorch's meta device and then given their
weights tensor by tensor, each cast to the asked dtype as it is read. The file is read with ordinary
reads, not memory-mapped: mapped pages count in the process's resident memory for as long as the
mapping lives, so `from_pretrained` holds the fp32 file (3.4 GB for SD's Unet) beside the fp16 module
it fills, while read pages stay in the kernel's page cache.
"""
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub import snapshot_download
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import CLIPTextConfig

from ..errors import ConversionError
from ..families import Family, detect_family
from . import ModelSource, safety_checker
from .hub import hub_refusals

# What a conversion reads from a diffusers folder; weights in safetensors, else PyTorch pickles.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]

# safetensors' dtype names for the dtypes a diffusers checkpoint holds.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS_FILE = "model.safetensors"  # transformers'
# What --vae reads from a hub repo: a VAE repo's own files, or a model repo's vae/.
VAE_HUB_PATTERNS = ["config.json", WEIGHTS_FILE, "vae/config.json", f"vae/{WEIGHTS_FILE}"]

# Checkpoints saved before diffusers' `Attention` (every SD v1/v2 VAE on the hub) name the VAE's attention
# projections as the old `AttentionBlock` did.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

@dataclass
class FolderReader:
    """Modules from a diffusers folder (saved with save_pretrained, or a Hugging Face snapshot)."""

    folder: Path
    # transformers class of each text encoder module (the family's; SDXL's second has a projection)
    text_encoder_classes: dict[str, str] = field(default_factory=lambda: {"text_encoder": "CLIPTextModel"})

    def load(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        try:
            if module_name in self.text_encoder_classes:
                return load_text_encoder(self.text_encoder_classes[module_name], self.folder / module_name, dtype)

            loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[module_name]
            return load_diffusers_module(loader, self.folder / module_name, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConversionError(f"cannot load {module_name} from {self.folder}: {error}".splitlines()[0]) from error

    def empty(self, module_name: str) -> torch.nn.Module:
        if module_name in self.text_encoder_classes:
            loader = getattr(transformers, self.text_encoder_classes[module_name])
            return empty_module(loader, CLIPTextConfig.from_pretrained(self.folder / module_name))

        loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[module_name]
        return empty_module(loader, loader.load_config(self.folder / module_name))

    def load_safety_checker(self, dtype: torch.dtype, description: dict, name: str) -> tuple[torch.nn.Module, dict]:
        folder = self.folder
        if "id" in description:  # the conversion's download left the checker out
            folder = _download(description["id"], description.get("revision"), safety_checker.HUB_PATTERNS)
        return safety_checker.in_model_folder(folder, name).load(dtype)

    def file_hashes(self, modules: set[str]) -> dict[str, str]:
        subfolders = {"scheduler", "tokenizer"} | modules
        hashes = {}
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            if path.is_file() and (len(relative.parts) == 1 or relative.parts[0] in subfolders):
                hashes[str(relative)] = sha256(path)
        return hashes

    def write_tokenizer_files(self, destination: Path) -> None:
        # SDXL's two tokenizers share the BPE files (the second pads with "!"); a refiner has only the second.
        only_second = not (self.folder / "tokenizer").is_dir() and (self.folder / "tokenizer_2").is_dir()
        tokenizer_folder = self.folder / ("tokenizer_2" if only_second else "tokenizer")
        if (tokenizer_folder / "vocab.json").is_file() and (tokenizer_folder / "merges.txt").is_file():
            for name in ("vocab.json", "merges.txt"):
                (destination / name).write_bytes((tokenizer_folder / name).read_bytes())
            return
        if (tokenizer_folder / "tokenizer.json").is_file():
            # Folders saved by transformers 5 keep only tokenizer.json; its BPE model writes both files back.

            Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json")).model.save(str(destination))
            return
        raise ConversionError(f"{tokenizer_folder} has neither vocab.json + merges.txt nor tokenizer.json")


def load_diffusers_module(loader, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model from its folder (config.json and safetensors weights), its floating-point
    weights in `dtype`; the same module as `loader.from_pretrained(folder, torch_dtype=dtype)`."""
    module = empty_module(loader, loader.load_config(folder))
    expected = set(module.state_dict())
    state = {}
    for path in weight_files(folder):
        for name, tensor in read_safetensors(path, dtype).items():
            legacy = LEGACY_ATTENTION_KEY.match(name)
            if name not in expected and legacy:
                prefix, old_name, kind = legacy.groups()
                name = f"{prefix}.{LEGACY_ATTENTION_NAMES[old_name]}.{kind}"
            state[name] = tensor
    return fill_module(module, state, "its config.json")


def load_text_encoder(class_name: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers CLIP text model (`class_name`) from its folder, read as `load_diffusers_module` reads: the
    same module as `from_pretrained(folder, torch_dtype=dtype)`, whose memory-mapped float32 file counts in the
    process's RSS beside the cast copy (a 4.35 GiB peak for SDXL's 1.4 GB float16 TextEncoder2)."""
    module = empty_module(getattr(transformers, class_name), transformers.CLIPTextConfig.from_pretrained(folder))
    state = {}
    for path in weight_files(folder, TEXT_ENCODER_WEIGHTS_FILE):
        state.update(read_safetensors(path, dtype))
    return fill_text_encoder(module, state, "its config.json")


def fill_text_encoder(module: torch.nn.Module, state: dict[str, torch.Tensor], config_name: str) -> torch.nn.Module:
    """fill_module for a transformers CLIP text model built by empty_module, from weights named as files name them
    (`text_model.` first, which transformers from 5.6 no longer nests under)."""
    wrapped = hasattr(module, "text_model")
    state = {name if wrapped else name.removeprefix("text_model."): tensor for name, tensor in state.items()
             if not name.endswith("position_ids")}
    # A constant buffer that files need not hold (transformers makes it at construction).
    getattr(module, "text_model", module).embeddings.position_ids = torch.arange(
        module.config.max_position_embeddings)[None]
    return fill_module(module, state, config_name)


def empty_module(loader, config: dict) -> torch.nn.Module:
    """A diffusers or transformers model built from its config on the meta device: no memory for weights."""
    with torch.device("meta"):
        return loader.from_config(config) if hasattr(loader, "from_config") else loader(config)


def fill_module(module: torch.nn.Module, state: dict[str, torch.Tensor], config_name: str) -> torch.nn.Module:
    """Give an empty module its weights (the tensors themselves, not copies); every weight must be there."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    unloaded = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing or unexpected or unloaded:
        problems = [f"missing {', '.join(sorted(set(missing) | set(unloaded))[:3])}" if missing or unloaded else "",
                    f"unexpected {', '.join(sorted(unexpected)[:3])}" if unexpected else ""]
        raise ValueError(f"its weights do not fit {config_name} ({'; '.join(p for p in problems if p)})")
    return module


def weight_files(folder: Path, file_name: str = WEIGHTS_FILE) -> list[Path]:
    """The safetensors file(s) of a model folder, sharded or not (diffusers' file name, or transformers')."""
    if (folder / file_name).is_file():
        return [folder / file_name]
    index = folder / f"{file_name}.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [folder / shard for shard in shards]
    raise OSError(f"no {file_name} in {folder} (save the model with safe_serialization=True)")


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A .safetensors file's header (name → dtype, shape, byte range) and where its data starts
    (the format: an 8-byte little-endian header size, the JSON header, then the little-endian data)."""
    with path.open("rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


def read_safetensors(path: Path, dtype: torch.dtype,
                     names: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (those whose names `names` accepts, default all), the
    floating-point ones cast to `dtype`, read one at a time. A file already in `dtype` is memory-mapped
    instead: its tensors are then the module's weights, with nothing copied."""
    header, data_start = safetensors_header(path)
    if names is not None:
        header = {name: entry for name, entry in header.items() if names(name)}
    state = {}
    if not header:
        return state
    stored_dtypes = {SAFETENSORS_DTYPES[entry["dtype"]] for entry in header.values()}
    if all(stored == dtype or not stored.is_floating_point for stored in stored_dtypes):
        with safe_open(path, framework="pt") as mapped:
            return {name: mapped.get_tensor(name) for name in header}
    with path.open("rb") as stream:
        # One buffer, reused for every tensor, so that the file's bytes never fault in fresh memory.
        scratch = torch.empty(max(end - begin for begin, end in (e["data_offsets"] for e in header.values())),
                              dtype=torch.uint8)
        scratch_view = memoryview(scratch.numpy())
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            stored = SAFETENSORS_DTYPES[entry["dtype"]]
            stream.seek(data_start + begin)
            if stream.readinto(scratch_view[: end - begin]) != end - begin:
                raise ValueError(f"{path} is truncated")
            tensor = scratch[: end - begin].view(stored).reshape(entry["shape"])
            state[name] = tensor.to(dtype=dtype if stored.is_floating_point else stored, copy=True)
    return state


def hub_source(hub_id: str, revision: str | None, name: str) -> ModelSource:
    return folder_source(_download(hub_id, revision), name=name, description={"id": hub_id, "revision": revision})


def vae_folder(vae: str) -> tuple[Path, dict]:
    """The folder holding a VAE's config.json and weights, and how the manifest records where it came from."""
    if Path(vae).expanduser().is_dir():
        folder, description = Path(vae).expanduser().resolve(), {"path": str(Path(vae).expanduser().resolve())}
    elif vae.startswith((".", "/", "~")) or vae.count("/") != 1:
        raise ConversionError(f"--vae {vae} is neither a folder nor a Hugging Face id (org/name)")
    else:
        folder, description = _download(vae, None, VAE_HUB_PATTERNS), {"id": vae}
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ConversionError(f"--vae {vae}: no config.json in {folder} or its vae/ folder; pass a diffusers VAE "
                              "(AutoencoderKL) folder")
    return folder, description


def _download(hub_id: str, revision: str | None, patterns: list[str] = HUB_PATTERNS) -> Path:
    with hub_refusals(hub_id, "pass a local diffusers folder", revision=revision):
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: is {path.parent.parent} "
                              "a diffusers Stable Diffusion folder?") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error})") from None


def folder_source(folder: Path, name: str, description: dict) -> ModelSource:
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise ConversionError(f"{folder} is not a diffusers model folder (no model_index.json): convert a folder saved "
                              "with save_pretrained")
    unet_config = read_json(folder / "unet" / "config.json")
    model_index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    family = detect_family(model_index, unet_config)
    text_configs = {module: read_json(folder / module / "config.json") for module in family.text_encoder_classes}
    vae_config = read_json(folder / "vae" / "config.json")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    tokenizer = folder / ("tokenizer" if (folder / "tokenizer").is_dir() else "tokenizer_2")
    return ModelSource(
        name=name,
        description=description,
        scheduler_config=scheduler_config,
        conditioning=family.conditioning(unet_config, text_configs),
        sample_size=int(unet_config["sample_size"]),
        latent_scaling_factor=float(vae_config.get("scaling_factor", family.contract.latent_scaling_factor)),
        prediction_type=scheduler_config.get("prediction_type", family.contract.prediction_type),
        family=family,
        reader=FolderReader(folder, dict(family.text_encoder_classes)),
        pad_token=tokenizer_pad_token(tokenizer),
        force_zeros_for_empty_prompt=pipeline_setting(model_index, family),
    )


def pipeline_setting(model_index: dict, family: Family) -> bool | None:
    """force_zeros_for_empty_prompt, as the model's pipeline config says (None where the family has no such)."""
    default = family.contract.force_zeros_for_empty_prompt
    return None if default is None else bool(model_index.get("force_zeros_for_empty_prompt", default))


def tokenizer_pad_token(folder: Path) -> str:
    """The pad token a saved CLIPTokenizer names (special_tokens_map.json or tokenizer_config.json)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = read_json(folder / name).get("pad_token")
            if pad:
                return pad["content"] if isinstance(pad, dict) else str(pad)
    return "<|endoftext|>"


def sha256(path: Path) -> str:
    # In the Hugging Face cache a file links to a blob named by its SHA-256 (for weights): reuse it.
    blob = path.resolve().name
    if path.is_symlink() and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()
