"""Quiet libraries for the command line: the stage lines are the progress report."""
import logging
import os
import warnings


def quiet_libraries() -> None:
    """The libraries warn at import about things that don't matter here (untested torch versions, missing macOS
    frameworks, optional image backends). --verbose keeps them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
