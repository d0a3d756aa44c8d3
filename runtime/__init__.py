"""coreml-sd runtime: generate images from the Core ML packages that coreml-convert writes."""

_EXPORTS = {"Pipeline": "pipeline", "GenerationResult": "pipeline", "GenerationError": "errors"}


def __getattr__(name: str):
    """`from coreml_sd.runtime import Pipeline` without importing diffusers for those who only need the executor."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
