"""The packages a server offers, by name.

A name from a request is looked up among the folders found when the list is read, never joined to a path, so no
request can reach a file outside the packages the server was started with.
"""
import json
from pathlib import Path
from typing import Any

from ..package import MANIFEST_FILE, list_packages, models_folder
from .errors import invalid


class Catalogue:
    """The packages under `root` (re-read on each listing, as A1111's refresh-checkpoints), and `pinned` ones the
    server was started with from elsewhere, by folder name."""

    def __init__(self, root: Path, pinned: dict[str, Path] | None = None):
        self.root = root
        self.pinned = dict(pinned or {})

    def folders(self) -> dict[str, Path]:
        found = {name: self.root / name for name in list_packages(self.root)}
        return {**found, **self.pinned}

    def names(self) -> list[str]:
        return sorted(self.folders())

    def folder(self, name: str) -> Path:
        folders = self.folders()
        if name not in folders:
            raise invalid(f"model {name!r} not found; choose one of {', '.join(sorted(folders)) or 'none'} "
                          "(GET /sdapi/v1/sd-models)")
        return folders[name]

    def sd_models(self) -> list[dict[str, Any]]:
        """A1111's checkpoint list: the title is the name clients send back as sd_model_checkpoint."""
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": str(folder),
                 "config": None} for name, folder in sorted(self.folders().items())]

    def loras(self) -> list[dict[str, Any]]:
        """The LoRAs baked into each package at conversion (its manifest's adapters): read-only, as converted."""
        items = []
        for name, folder in sorted(self.folders().items()):
            for adapter in _manifest(folder).get("adapters", []):
                if isinstance(adapter, dict) and "lora" in adapter:
                    items.append({"name": adapter["lora"], "alias": adapter["lora"], "path": None,
                                  "metadata": {"package": name, "scale": adapter.get("scale"),
                                               "sha256": adapter.get("sha256"), "modules": adapter.get("modules")}})
        return items


def _manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((models_folder(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):  # a Swift bundle has no manifest; a damaged one shows when the package loads
        return {}
    return manifest if isinstance(manifest, dict) else {}
