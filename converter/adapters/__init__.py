"""What is merged into a model before conversion: LoRAs (`lora`) and textual-inversion embeddings
(`embeddings`, with the tokenizer files that make their tokens one id each).

An adapter changes pipeline modules as the source loads them (`apply`), says what it changed in a module
so that the component's settings (and so reruns) follow it (`settings`), and may add to the package's
tokenizer files (`extend_tokenizer_files`).
"""
from pathlib import Path

import torch

from ..errors import ConversionError


class Adapter:
    def apply(self, module_name: str, module: torch.nn.Module) -> None:
        """Change `module` (a pipeline module, loaded in any dtype) in place."""

    def check(self, module_name: str, layout: torch.nn.Module) -> None:
        """Refuse, in one line, what does not fit `layout` (the module on the meta device)."""

    def settings(self, module_name: str) -> list[dict]:
        """What this adapter does to `module_name`: empty when it leaves it alone."""
        return []

    def extend_tokenizer_files(self, folder: Path) -> None:
        """Add to the vocab.json and merges.txt in `folder`."""

    def describe(self) -> list[dict]:
        """What the manifest records of this adapter (enough to apply it again for --validate-only)."""
        return []


def split_argument(argument: str, option: str, kind: str) -> tuple[Path, str | None]:
    """`PATH[:VALUE]` as --lora and --embedding take it (a Windows-free world: ':' never starts a path)."""
    path, _, value = argument.rpartition(":") if ":" in argument else (argument, "", "")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{option} {argument}: {path} is not a file; pass the {kind} file (PATH or "
                              f"PATH:{'SCALE' if kind == 'LoRA' else 'TOKEN'})")
    return path, value or None
