"""Faults for the catalogue's tests, put into every Ray worker of the test session when it starts. A package
whose folder is named `crash-once-*` has its worker process die in the middle of its conversion (after the
trace, with the component staged in the folder) on the first attempt only; one named `crash-always-*` dies at
the start of every attempt. Other packages convert as usual."""
import os
from pathlib import Path

EXIT_CODE = 41
STOP_CRASHING = ".stop-crashing"


def install() -> None:
    from coreml_sd.converter.catalogue import tasks
    from coreml_sd.converter.conversion import run

    to_ml_program, convert_model = run.to_ml_program, tasks.convert_model

    def die(*args, **kwargs):
        os._exit(EXIT_CODE)

    def convert_model_with_faults(options):
        folder = Path(options.output)
        if folder.name.startswith("crash-always-") and not (folder.parent / STOP_CRASHING).exists():
            die()
        marker = crash_marker(folder, options.components[0])
        first_attempt = folder.name.startswith("crash-once-") and not marker.exists()
        if first_attempt:
            marker.touch()
        run.to_ml_program = die if first_attempt else to_ml_program
        return convert_model(options)

    tasks.convert_model = convert_model_with_faults


def crash_marker(folder: Path, component: str) -> Path:
    """Left beside the package by the attempt that died."""
    return folder.parent / f".{folder.name}-{component}-crashed"
