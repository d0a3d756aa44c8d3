"""LoRAs by Hugging Face id: `ORG/NAME[:FILE][:SCALE]`, downloaded through huggingface_hub (its cache serves
them offline once downloaded). Without FILE, the file diffusers' `load_lora_weights` loads by default."""
import re
from pathlib import Path

from ..errors import ConversionError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def is_hub_argument(argument: str) -> bool:
    """Whether `--lora ARGUMENT` names a Hugging Face repository rather than a local file."""
    name = argument.split(":", 1)[0]
    return bool(HUB_ID.fullmatch(name)) and not name.endswith(WEIGHT_SUFFIXES) and not Path(name).expanduser().exists()


def hub_lora(argument: str) -> tuple[Path, str | None, str]:
    """The downloaded file, the scale text (None: 1) and the LoRA's key (`ORG/NAME`, or `ORG/NAME:FILE` when a
    file is named) for `ORG/NAME[:FILE][:SCALE]`."""
    hub_id, *rest = argument.split(":")
    file = rest.pop(0) if rest and rest[0].endswith(WEIGHT_SUFFIXES) else None
    scale = rest.pop(0) if rest else None
    if rest:
        raise ConversionError(f"--lora {argument}: too many ':' parts; pass ORG/NAME[:FILE][:SCALE] or PATH[:SCALE]")
    return download(hub_id, file or DEFAULT_LORA_FILE), scale, hub_id if file is None else f"{hub_id}:{file}"


def download(hub_id: str, file: str) -> Path:
    from huggingface_hub import hf_hub_download

    from ..sources.hub import hub_refusals

    with hub_refusals(f"--lora {hub_id}", "pass the LoRA file", file=file,
                      name_a_file=f"name the file: --lora {hub_id}:FILE"):
        return Path(hf_hub_download(hub_id, file))
