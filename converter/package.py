"""A package folder on disk: atomic installs of components and the manifest that describes them.

Each component is saved into a hidden temporary folder beside its final place and renamed into
place only when complete, and the manifest is replaced atomically after each one, so an interrupted
conversion leaves the components that were finished and nothing half-written.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .errors import ConversionError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"


class PackageFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = not self.path.exists()
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict | None:
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{manifest_path} is not valid JSON ({error}); remove the folder or pass another -o") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ConversionError(f"{manifest_path} has format version {manifest.get('format_version')}, this converter writes {FORMAT_VERSION}: pass --force or another -o")
        return manifest

    def prepare(self, header: dict, force: bool) -> None:
        """Create the folder, clear leftovers of interrupted runs, and check the existing package fits."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        shared = ("source", "height", "width", "text_width")
        if self.manifest and any(self.manifest.get(key) != header[key] for key in shared):
            if not force:
                raise ConversionError(f"{self.path} holds a package converted from another model or resolution: pass --force to replace it, or another -o")
            for component in self.manifest["components"].values():
                shutil.rmtree(self.path / component["file"], ignore_errors=True)
            self.manifest = None
        components = self.manifest["components"] if self.manifest else {}
        self.manifest = dict(format_version=FORMAT_VERSION, converter_version=__version__, **header, components=components)

    def is_current(self, component: str, settings: dict) -> bool:
        entry = (self.manifest or {}).get("components", {}).get(component)
        return bool(entry) and entry.get("settings") == settings and (self.path / entry["file"]).is_dir()

    def staging_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=self.path))

    def install(self, staged: Path, component: str, entry: dict) -> None:
        """Move a complete, staged .mlpackage into place and record it in the manifest."""
        final = self.path / entry["file"]
        previous = None
        if final.exists():
            previous = staged.parent / (final.name + ".previous")
            final.rename(previous)
        staged.rename(final)
        if previous is not None:
            shutil.rmtree(previous)
        self.manifest["components"][component] = entry
        self.write_manifest()

    def write_manifest(self) -> None:
        self.write_text(MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        temporary = self.path / f"{PARTIAL_PREFIX}{name}"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path / name)

    def discard_if_empty(self) -> None:
        """After a failed run: remove the folder if this run created it and installed nothing."""
        if self.created and not (self.manifest or {}).get("components"):
            shutil.rmtree(self.path, ignore_errors=True)
