"""A package folder on disk: atomic installs of components and the manifest that describes them.

Each component is saved into a hidden temporary folder beside its final place and renamed into
place only when complete, and the manifest is replaced atomically after each one, so an interrupted
conversion leaves the components that were finished and nothing half-written.
"""
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from coreml_sd.runtime.contract import MANIFEST_FILE
from coreml_sd.runtime.integrity import DamagedPackage, check_files, inventory

from . import __version__
from .errors import ConversionError

FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"
LOCK_FILE = ".lock"


class PackageFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = not self.path.exists()
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict | None:
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{manifest_path} is not valid JSON ({error}); "
                                  "remove the folder or pass another -o") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ConversionError(f"{manifest_path} has format version {manifest.get('format_version')}, this "
                                  f"converter writes {FORMAT_VERSION}: pass --force or another -o")
        return manifest

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One conversion per folder at a time. The kernel drops the lock when its process dies, however it dies,
        so a lock left by a killed run is simply taken over; the file holds the holder's pid for the message."""
        if self.path.exists() and not self.path.is_dir():
            raise ConversionError(f"{self.path} is a file, not a folder; pass a folder to -o")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConversionError(f"cannot create {self.path} ({error.strerror}); choose another -o") from None
        path = self.path / LOCK_FILE
        while True:
            lock_file = open(path, "a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "another process"
                lock_file.close()
                raise ConversionError(f"{self.path} is being converted by process {holder}; wait for it to finish "
                                      "or pass another -o") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(lock_file.fileno()).st_ino:
                break
            lock_file.close()  # its holder removed it as we opened it: lock the new one
        try:
            lock_file.truncate(0)
            lock_file.write(str(os.getpid()))
            lock_file.flush()
            yield
        finally:
            path.unlink(missing_ok=True)
            lock_file.close()

    def prepare(self, header: dict, force: bool) -> None:
        """Create the folder, clear leftovers of interrupted runs, and check the existing package fits."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        shared = ("source", "height", "width", "text_width")
        if self.manifest and any(self.manifest.get(key) != header[key] for key in shared):
            if not force:
                raise ConversionError(f"{self.path} holds a package converted from another model or resolution: pass "
                                      "--force to replace it, or another -o")
            for component in self.manifest["components"].values():
                shutil.rmtree(self.path / component["file"], ignore_errors=True)
            self.manifest = None
        components = self.manifest["components"] if self.manifest else {}
        self.manifest = dict(format_version=FORMAT_VERSION, converter_version=__version__, **header,
                             components=components)

    def is_current(self, component: str, settings: dict) -> bool:
        """Converted with these settings, and its files as they were installed."""
        entry = (self.manifest or {}).get("components", {}).get(component)
        if not entry or entry.get("settings") != settings or not (self.path / entry["file"]).is_dir():
            return False
        try:
            check_files(self.path, entry["file"], entry.get("files", {}))
        except DamagedPackage:
            return False
        return True

    def staging_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=self.path))

    def install(self, staged: Path, component: str, entry: dict) -> None:
        """Move a complete, staged .mlpackage into place and record it in the manifest."""
        final = self.path / entry["file"]
        files = inventory(staged)
        previous = None
        if final.exists():
            previous = staged.parent / (final.name + ".previous")
            final.rename(previous)
        final.parent.mkdir(parents=True, exist_ok=True)  # controlnet/<Name>.mlpackage
        staged.rename(final)
        if previous is not None:
            shutil.rmtree(previous)
        self.manifest["components"][component] = dict(entry, files=files)
        self.write_manifest()

    def remove(self, component: str) -> None:
        """Uninstall a component, if installed (a whole Unet replaced by its chunks, or the other way round)."""
        entry = self.manifest["components"].pop(component, None)
        if entry is not None:
            self.write_manifest()
            shutil.rmtree(self.path / entry["file"], ignore_errors=True)

    def write_manifest(self) -> None:
        self.write_text(MANIFEST_FILE, json.dumps(self.manifest, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        temporary = self.path / f"{PARTIAL_PREFIX}{name}"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path / name)

    def discard_if_empty(self) -> None:
        """After a failed run: remove the folder if this run created it and installed nothing."""
        if self.created and not (self.manifest or {}).get("components"):
            shutil.rmtree(self.path, ignore_errors=True)
