"""What every package records about its origin: the version string and licence Xcode shows (as Apple's packages
carry them), and the `coreml_sd.*` user metadata the runtime reads when a folder has no manifest."""
import re
from pathlib import Path

from huggingface_hub import hf_hub_download

from .. import __version__
from ..sources import ModelSource

MODEL_CARD = "README.md"
# The licence in a Hugging Face model card's YAML header: `license: creativeml-openrail-m`; for `other`, the
# card names it in `license_name`.
_LICENCE_FIELD = re.compile(r"^(license|license_name):\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", re.MULTILINE)


def model_version(source: ModelSource) -> str:
    """The model a package was converted from, as Apple's packages name it (the Hugging Face id), with the
    revision when one was asked for; a local folder or file by its name."""
    described = source.description
    if "id" in described:
        return described["id"] + (f"@{described['revision']}" if described.get("revision") else "")
    if "path" in described:
        return Path(described["path"]).name
    return str(described.get("model", source.name))


def licence_in_card(text: str) -> str | None:
    """The licence a model card's YAML header names, or None."""
    if not text.startswith("---"):
        return None
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    fields = dict(match.groups() for match in _LICENCE_FIELD.finditer(header))
    licence = fields.get("license")
    return fields.get("license_name", licence) if licence == "other" else licence


def model_licence(source: ModelSource) -> str | None:
    """The licence of the source model when its model card is at hand (a folder's README.md, or the hub
    repository's), else None: nothing is guessed."""
    folder = getattr(source.reader, "folder", None)
    card = Path(folder) / MODEL_CARD if folder else None
    if card is None or not card.is_file():
        card = _hub_card(source.description)
    try:
        return licence_in_card(card.read_text(encoding="utf-8")) if card and card.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _hub_card(described: dict) -> Path | None:
    if "id" not in described:
        return None

    try:
        return Path(hf_hub_download(described["id"], MODEL_CARD, revision=described.get("revision")))
    except Exception:  # no card, or offline: the licence stays unknown, which is no reason to stop converting
        return None


def user_metadata(source: ModelSource, attention_implementation: str, nbits: int | None) -> dict[str, str]:
    """The `coreml_sd.*` entries: what the package was made from and how."""
    return {
        "coreml_sd.source": str(source.description.get("id") or source.description.get("path") or source.name),
        "coreml_sd.attention_implementation": attention_implementation,
        "coreml_sd.converter_version": __version__,
        **({"coreml_sd.quantize_nbits": str(nbits)} if nbits else {}),
    }
