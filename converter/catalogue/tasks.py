"""What one Ray task runs: the converter's own `convert_model` for one component of one package folder.

The folder's lock, the staged install and the manifest are the converter's: a task killed part way leaves the
components installed before it and a hidden staging folder that the next run on the folder clears.
"""
import time

from ..conversion import ConversionOptions, convert_model
from ..conversion.package import PackageFolder
from ..quiet import quiet_libraries


def convert_component(options: ConversionOptions) -> dict:
    """Convert (and validate) `options.components`' one component; what the index records of it."""
    quiet_libraries()
    start = time.perf_counter()
    report = convert_model(options)
    (component,) = options.components
    entry = PackageFolder(report.folder).manifest["components"][component]
    return {"converted": bool(report.converted), "seconds": round(time.perf_counter() - start, 1),
            "validation": entry.get("validation")}
