"""What a package's files should be: the manifest records the size and SHA-256 of every file of every model.

Sizes are checked on every load (a stat per file), hashes on request (`--verify`, `coreml-convert --validate-only`),
so that a damaged or half-copied package is named before Core ML or the executor read a byte of it. A file's
path must stay inside the package folder, through symlinks too.
"""
import hashlib
from pathlib import Path, PurePosixPath

from .errors import GenerationError

HASH_CHUNK = 1 << 22


class DamagedPackage(GenerationError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inventory(model: Path) -> dict[str, dict]:
    """Every file under a model folder (an .mlpackage or .mlmodelc), by POSIX path relative to it."""
    return {
        path.relative_to(model).as_posix(): {"size": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(model.rglob("*"))
        if path.is_file()
    }


def content_hash(model: Path) -> str:
    """One SHA-256 for a model folder's contents: its files' relative paths and their SHA-256s."""
    digest = hashlib.sha256()
    for relative, record in inventory(model).items():
        digest.update(f"{relative}\0{record['sha256']}\n".encode())
    return digest.hexdigest()


def inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refusing names that leave the folder (absolute, `..`, or a symlink pointing out)."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise DamagedPackage(f"{what} names {relative!r}, outside the package folder; the manifest is damaged or was "
                             "tampered with: convert the package again")
    path = folder / pure
    root = folder.resolve()
    if path.exists() and not path.resolve().is_relative_to(root):
        raise DamagedPackage(f"{path} is a link to {path.resolve()}, outside the package folder; replace it with the "
                             "file itself (copy the package without links)")
    return path


def check_files(folder: Path, model_file: str, recorded: dict[str, dict], hashes: bool = False) -> None:
    """Compare a model's files with what the manifest recorded: present, inside the folder, of the recorded size,
    and with `hashes`, of the recorded SHA-256. Raises DamagedPackage naming the first file that differs."""
    model = inside(folder, model_file, "the manifest")
    advice = "the package is damaged; convert again or copy it again"
    for relative, expected in recorded.items():
        path = inside(model, relative, model_file)
        name = f"{model_file}: {relative}"
        if not path.is_file():
            raise DamagedPackage(f"{name} is missing: {advice}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise DamagedPackage(f"{name} is {size:,} bytes, expected {expected['size']:,}: {advice}")
        if hashes and (actual := sha256(path)) != expected["sha256"]:
            raise DamagedPackage(f"{name} has SHA-256 {actual[:12]}…, expected {expected['sha256'][:12]}…: {advice}")
