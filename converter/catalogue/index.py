"""`catalogue.json` in the output root: per package its status, its manifest's summary, validation figures
and sizes, and the last error line of a failed one. It is rewritten atomically after every task, so an
interrupted run leaves an index that says what is finished, and a rerun reads it to skip those packages.
"""
import json
import os
import time
from pathlib import Path

from coreml_sd.runtime.contract import MANIFEST_FILE
from coreml_sd.runtime.integrity import DamagedPackage, check_files

from .. import __version__
from .plan import Catalogue, PackagePlan

INDEX = "catalogue.json"
DONE, FAILED, INTERRUPTED, PENDING = "done", "failed", "interrupted", "pending"
MIB = 2**20


class CatalogueIndex:
    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue
        self.path = catalogue.output / INDEX
        previous = self._read()
        self.packages = {plan.name: previous.get(plan.name, {}) for plan in catalogue.packages}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()).get("packages", {})
        except (OSError, ValueError, AttributeError):
            return {}  # none yet, or unreadable: every package is looked at again

    def finished_components(self, plan: PackagePlan) -> list[str]:
        """The components an earlier run of the same entries finished, whose files are still as installed."""
        entry = self.packages[plan.name]
        if entry.get("key") != plan.key:
            return []
        try:
            manifest = json.loads((plan.folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return []
        finished = []
        for component in plan.memory_gib:
            recorded = manifest.get("components", {}).get(component)
            if entry.get("components", {}).get(component, {}).get("status") != DONE or recorded is None:
                continue
            try:
                check_files(plan.folder, recorded["file"], recorded.get("files", {}))
            except (OSError, KeyError, DamagedPackage):
                continue
            finished.append(component)
        return finished

    def start(self, plan: PackagePlan, finished: list[str]) -> None:
        """A package about to run: its finished components' records are kept, the others' begin anew."""
        previous = self.packages[plan.name].get("components", {})
        self.packages[plan.name] = {
            "folder": str(plan.folder), "status": PENDING, "key": plan.key, "model": plan.model,
            "variant": plan.variant,
            "components": {c: previous[c] if c in finished else {"status": PENDING, "memory_gib": gib}
                           for c, gib in plan.memory_gib.items()},
        }

    def record(self, plan: PackagePlan, component: str, result: dict | None, error: str | None = None,
               status: str | None = None) -> None:
        """One task's outcome; the package is done when its last component is, failed at its first failure."""
        entry = self.packages[plan.name]
        task = entry["components"][component]
        if result is not None:  # its validation figures are in the package summary, from the manifest
            task.update(status=DONE, **{key: value for key, value in result.items() if key != "validation"})
        else:
            task.update(status=status or FAILED, error=error)
            entry.update(status=status or FAILED, error=f"{component}: {error}")
        if all(t["status"] == DONE for t in entry["components"].values()):
            entry["status"] = DONE
            entry.pop("error", None)
            entry.update(package_summary(plan.folder))
        self.write()

    def counts(self) -> dict[str, int]:
        counts = {DONE: 0, FAILED: 0, INTERRUPTED: 0, PENDING: 0}
        for entry in self.packages.values():
            counts[entry.get("status", PENDING)] += 1
        return counts

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        index = {
            "catalogue": str(self.catalogue.path.resolve()), "converter_version": __version__,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": self.counts(),
            "packages": self.packages,
        }
        temporary = self.path.with_name(f".partial-{INDEX}")
        temporary.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(temporary, self.path)


def package_summary(folder: Path) -> dict:
    """What the index shows of a finished package: its manifest's dimensions, each component's file, size and
    validation figures, and the folder's size."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    components = {}
    for name, entry in manifest["components"].items():
        size = sum(f["size"] for f in entry.get("files", {}).values())
        components[name] = {"file": entry["file"], "size_mib": round(size / MIB, 2),
                            "validation": entry.get("validation")}
    return {
        "manifest": {key: manifest.get(key) for key in ("family", "attention_implementation", "width", "height",
                                                        "unet_batch_size", "source", "adapters")},
        "files": components,
        "size_mib": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MIB, 2),
    }
