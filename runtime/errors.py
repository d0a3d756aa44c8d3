"""The one error the runtime raises for problems the user can fix (bad options, bad or missing packages)."""


class GenerationError(Exception):
    """A one-line message saying what is wrong and how to fix it; `coreml-generate` prints it as `error: ...`."""
