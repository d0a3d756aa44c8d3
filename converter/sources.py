"""Where a model comes from: an alias, a Hugging Face id, a local diffusers folder, or `tiny`.

Every source is resolved to a `ModelSource`, which loads one component's modules at a time, in the
dtype asked for, so a conversion holds only what the component it converts needs.

diffusers modules (Unet, VAE) are built without weights on PyTorch's meta device and then given their
weights tensor by tensor, each cast to the asked dtype as it is read. The file is read with ordinary
reads, not memory-mapped: mapped pages count in the process's resident memory for as long as the
mapping lives, so `from_pretrained` holds the fp32 file (3.4 GB for SD's Unet) beside the fp16 module
it fills, while read pages stay in the kernel's page cache.
"""
import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .errors import ConversionError
from .families import Family, detect_family

ALIASES = {
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2-base": "stabilityai/stable-diffusion-2-base",
    "sd-2-1-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
}
# The embedded models: name -> (what it is, the module and function that build its diffusers pipeline).
BUILT_IN = {
    "tiny": ("embedded SD-architecture model with random weights, for trying things out", "tiny", "build_tiny_pipeline"),
    "tiny-xl": ("embedded SDXL-architecture base with random weights", "tiny_xl", "build_tiny_xl_pipeline"),
    "tiny-xl-refiner": ("embedded SDXL-architecture refiner with random weights", "tiny_xl", "build_tiny_xl_refiner_pipeline"),
}

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
WEIGHTS_INDEX = WEIGHTS_FILE + ".index.json"
# What --vae reads from a hub repo: a VAE repo's own files, or a model repo's vae/.
VAE_HUB_PATTERNS = ["config.json", WEIGHTS_FILE, "vae/config.json", f"vae/{WEIGHTS_FILE}"]

# Checkpoints saved before diffusers' `Attention` (every SD v1/v2 VAE on the hub) name the VAE's attention
# projections as the old `AttentionBlock` did.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

@dataclass
class ModelParts:
    """The subset of a StableDiffusionPipeline that the Neural Engine modules are built from."""

    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    safety_checker: torch.nn.Module | None = None
    feature_extractor: dict | None = None  # the safety checker's preprocessing, as preprocessor_config.json holds it


@dataclass
class ModelSource:
    """A resolved model: its configuration is read eagerly, its weights only per component."""

    name: str
    description: dict
    folder: Path | None
    scheduler_config: dict
    conditioning: dict  # the ModelDimensions fields of the text conditioning (Family.conditioning)
    sample_size: int
    latent_scaling_factor: float
    prediction_type: str
    family: Family
    safety_checker: str | None = None  # --safety-checker: another model's checker, by folder or id
    force_zeros_for_empty_prompt: bool | None = None  # as the model's pipeline config (model_index.json) says
    vae_folder: Path | None = None  # a VAE swapped in for the model's own (--vae)
    _tiny_pipeline: object = field(default=None, repr=False)

    def use_vae(self, vae: str) -> None:
        """Take the VAE from `vae` (a diffusers VAE folder, a model folder with vae/, or a Hugging Face id of
        either), with its latent scale."""
        self.vae_folder, self.description["vae"] = _vae_folder(vae)
        self.latent_scaling_factor = float(_read_json(self.vae_folder / "config.json").get(
            "scaling_factor", self.family.defaults.latent_scaling_factor))

    def load(self, component: str, dtype: torch.dtype) -> ModelParts:
        """The pipeline modules `component` needs, in `dtype`, in eval mode."""
        parts = ModelParts()
        module_name = self.family.component(component).module
        if module_name == "safety_checker":
            checker, parts.feature_extractor = self._load_safety_checker(dtype)
            parts.safety_checker = checker.eval().requires_grad_(False)
            return parts
        module = self._load_module(module_name, dtype)
        setattr(parts, module_name, module.eval().requires_grad_(False))
        return parts

    def _load_module(self, module_name: str, dtype: torch.dtype) -> torch.nn.Module:
        if module_name == "vae" and self.vae_folder is not None:
            from diffusers import AutoencoderKL

            try:
                return load_diffusers_module(AutoencoderKL, self.vae_folder, dtype)
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ConversionError(f"cannot load the VAE from {self.vae_folder}: {error}".splitlines()[0]) from error
        if self._tiny_pipeline is not None:
            # A copy: the float32 original must survive for validation after an fp16 conversion.
            return copy.deepcopy(getattr(self._tiny_pipeline, module_name)).to(dtype=dtype)
        try:
            if module_name in self.family.text_encoder_classes:
                # transformers already builds its models empty and casts the weights as it loads them.
                import transformers

                loader = getattr(transformers, self.family.text_encoder_classes[module_name])
                return loader.from_pretrained(self.folder, subfolder=module_name, torch_dtype=dtype)
            from diffusers import AutoencoderKL, UNet2DConditionModel

            loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[module_name]
            return load_diffusers_module(loader, self.folder / module_name, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConversionError(f"cannot load {module_name} from {self.folder}: {error}".splitlines()[0]) from error

    def _load_safety_checker(self, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
        from . import safety_checker

        if self.safety_checker is not None:
            return safety_checker.locate(self.safety_checker, partial(_download, revision=None)).load(dtype)
        if self._tiny_pipeline is not None:
            from .tiny import build_tiny_safety_checker

            checker, feature_extractor = build_tiny_safety_checker()
            return checker.to(dtype=dtype), feature_extractor
        folder = self.folder
        if "id" in self.description:  # the conversion's download left the checker out
            folder = _download(self.description["id"], self.description.get("revision"), safety_checker.HUB_PATTERNS)
        return safety_checker.in_model_folder(folder, self.name).load(dtype)

    def file_hashes(self, components: list[str]) -> dict[str, str]:
        """SHA-256 of the configuration files and of the weights the given components are built from."""
        if self.folder is None:
            return {}
        subfolders = {"scheduler", "tokenizer"} | self.family.modules(components)
        hashes = {}
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            if path.is_file() and (len(relative.parts) == 1 or relative.parts[0] in subfolders):
                hashes[str(relative)] = _sha256(path)
        return hashes

    def write_tokenizer_files(self, destination: Path) -> None:
        """vocab.json and merges.txt, as the Swift package reads them."""
        if self._tiny_pipeline is not None:
            from .tiny import clip_vocabulary_files  # every built-in model's tokenizers use them

            for path in clip_vocabulary_files():
                (destination / Path(path).name).write_bytes(Path(path).read_bytes())
            return
        # SDXL's two tokenizers share the BPE files (the second pads with "!"); a refiner has only the second.
        only_second = not (self.folder / "tokenizer").is_dir() and (self.folder / "tokenizer_2").is_dir()
        tokenizer_folder = self.folder / ("tokenizer_2" if only_second else "tokenizer")
        if (tokenizer_folder / "vocab.json").is_file() and (tokenizer_folder / "merges.txt").is_file():
            for name in ("vocab.json", "merges.txt"):
                (destination / name).write_bytes((tokenizer_folder / name).read_bytes())
            return
        if (tokenizer_folder / "tokenizer.json").is_file():
            # Folders saved by transformers 5 keep only tokenizer.json; its BPE model writes both files back.
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json")).model.save(str(destination))
            return
        raise ConversionError(f"{tokenizer_folder} has neither vocab.json + merges.txt nor tokenizer.json")


def load_diffusers_module(loader, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model from its folder (config.json and safetensors weights), its floating-point
    weights in `dtype`; the same module as `loader.from_pretrained(folder, torch_dtype=dtype)`."""
    with torch.device("meta"):
        module = loader.from_config(loader.load_config(folder))
    expected = set(module.state_dict())
    state = {}
    for path in weight_files(folder):
        for name, tensor in read_safetensors(path, dtype).items():
            legacy = LEGACY_ATTENTION_KEY.match(name)
            if name not in expected and legacy:
                prefix, old_name, kind = legacy.groups()
                name = f"{prefix}.{LEGACY_ATTENTION_NAMES[old_name]}.{kind}"
            state[name] = tensor
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    unloaded = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing or unexpected or unloaded:
        problems = [f"missing {', '.join(sorted(set(missing) | set(unloaded))[:3])}" if missing or unloaded else "",
                    f"unexpected {', '.join(sorted(unexpected)[:3])}" if unexpected else ""]
        raise ValueError(f"its weights do not fit its config.json ({'; '.join(p for p in problems if p)})")
    return module


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder, sharded or not."""
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    if (folder / WEIGHTS_INDEX).is_file():
        shards = sorted(set(_read_json(folder / WEIGHTS_INDEX)["weight_map"].values()))
        return [folder / shard for shard in shards]
    raise OSError(f"no {WEIGHTS_FILE} in {folder} (save the model with safe_serialization=True)")


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, the floating-point ones cast to `dtype`, read one at a time
    (the format: an 8-byte little-endian header size, a JSON header of name → dtype, shape and byte
    range, then the little-endian data). A file already in `dtype` is memory-mapped instead: its
    tensors are then the module's weights, with nothing copied."""
    state = {}
    with path.open("rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_size))
        header.pop("__metadata__", None)
        stored_dtypes = {SAFETENSORS_DTYPES[entry["dtype"]] for entry in header.values()}
        if all(stored == dtype or not stored.is_floating_point for stored in stored_dtypes):
            from safetensors.torch import load_file

            return load_file(path)
        data_start = 8 + header_size
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


def list_models() -> list[tuple[str, str]]:
    return [(name, what) for name, (what, _, _) in BUILT_IN.items()] + list(ALIASES.items())


def resolve(model: str, revision: str | None = None) -> ModelSource:
    """Turn `--model` into a ModelSource: a built-in model, an alias, a local folder or a Hugging Face id."""
    if model in BUILT_IN:
        return _built_in_source(model)
    if Path(model).expanduser().is_dir():
        folder = Path(model).expanduser().resolve()
        return _folder_source(folder, name=folder.name, description={"path": str(folder)})
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConversionError(f"{model} is not a folder; pass a diffusers model folder, a Hugging Face id or an alias (coreml-convert --list-models)")
    hub_id = ALIASES.get(model, model)
    if "/" not in hub_id:
        known = ", ".join(name for name, _ in list_models())
        raise ConversionError(f"unknown model {model!r}: use one of {known}, a Hugging Face id (org/name) or a local folder")
    folder = _download(hub_id, revision)
    name = model if model in ALIASES else hub_id.split("/")[-1]
    return _folder_source(folder, name=name, description={"id": hub_id, "revision": revision})


def _vae_folder(vae: str) -> tuple[Path, dict]:
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
        raise ConversionError(f"--vae {vae}: no config.json in {folder} or its vae/ folder; pass a diffusers VAE (AutoencoderKL) folder")
    return folder, description


def _download(hub_id: str, revision: str | None, patterns: list[str] = HUB_PATTERNS) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ConversionError(f"{hub_id} is gated: accept its license on huggingface.co and log in (hf auth login), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{hub_id} was not found on the Hugging Face hub (or is private: log in with hf auth login), or pass a local folder") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{hub_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise ConversionError(f"cannot reach the Hugging Face hub to download {hub_id}, and it is not in the local cache: connect to the network (or log in and accept the model's license), or pass a local diffusers folder") from None
    except HfHubHTTPError as error:
        raise ConversionError(f"downloading {hub_id} failed: {str(error).splitlines()[0]}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: is {path.parent.parent} a diffusers Stable Diffusion folder?") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error})") from None


def _folder_source(folder: Path, name: str, description: dict) -> ModelSource:
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise ConversionError(f"{folder} is not a diffusers model folder (no model_index.json): convert a folder saved with save_pretrained")
    unet_config = _read_json(folder / "unet" / "config.json")
    model_index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    family = detect_family(model_index, unet_config)
    text_configs = {module: _read_json(folder / module / "config.json") for module in family.text_encoder_classes}
    vae_config = _read_json(folder / "vae" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    return ModelSource(
        name=name,
        description=description,
        folder=folder,
        scheduler_config=scheduler_config,
        conditioning=family.conditioning(unet_config, text_configs),
        sample_size=int(unet_config["sample_size"]),
        latent_scaling_factor=float(vae_config.get("scaling_factor", family.defaults.latent_scaling_factor)),
        prediction_type=scheduler_config.get("prediction_type", family.defaults.prediction_type),
        family=family,
        force_zeros_for_empty_prompt=_pipeline_setting(model_index, family),
    )


def _pipeline_setting(model_index: dict, family: Family) -> bool | None:
    default = family.defaults.force_zeros_for_empty_prompt
    return None if default is None else bool(model_index.get("force_zeros_for_empty_prompt", default))


def _built_in_source(name: str) -> ModelSource:
    from importlib import import_module

    _, module, builder = BUILT_IN[name]
    pipeline = getattr(import_module(f"{__package__}.{module}"), builder)()
    unet_config = dict(pipeline.unet.config)
    family = detect_family(dict(pipeline.config), unet_config)
    text_configs = {module: getattr(pipeline, module).config.to_dict() for module in family.text_encoder_classes}
    return ModelSource(
        name=name,
        description={"model": name, "seed": 0},
        folder=None,
        # As scheduler_config.json holds it: a scheduler built from it for another class keeps that class's own
        # defaults for the values listed in `_use_default_values`, as diffusers does.
        scheduler_config=dict(pipeline.scheduler.config, _class_name=type(pipeline.scheduler).__name__),
        conditioning=family.conditioning(unet_config, text_configs),
        sample_size=pipeline.unet.config.sample_size,
        latent_scaling_factor=pipeline.vae.config.scaling_factor,
        prediction_type=pipeline.scheduler.config.prediction_type,
        family=family,
        force_zeros_for_empty_prompt=_pipeline_setting(dict(pipeline.config), family),
        _tiny_pipeline=pipeline,
    )


def _sha256(path: Path) -> str:
    # In the Hugging Face cache a file links to a blob named by its SHA-256 (for weights): reuse it.
    blob = path.resolve().name
    if path.is_symlink() and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()
