"""Reading `.ckpt` files (PyTorch pickles) without running anything they contain.

A pickle names the functions that rebuild its objects, and plain unpickling calls them, so a `.ckpt` can
run any code (`os.system(...)` in a `__reduce__`). Here every global a pickle names is looked up in an
allow-list of what checkpoints really hold: tensors and their storages, containers, numbers. Classes
that are only data in real checkpoints (PyTorch Lightning's callback and trainer state, pickled beside the
weights in SD 1.x's official files) become inert placeholders, made without importing anything. Any
other global stops the load before it is called, with one line naming it.

`torch.load(weights_only=True)` refuses those Lightning objects, so it cannot read SD 1.5's own `.ckpt`.
"""
import pickle
import types
from pathlib import Path

import torch

from ..errors import ConversionError

SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "object"), ("builtins", "bytearray"),
    ("copyreg", "_reconstructor"),  # object.__new__(cls) for a class this list allows
    ("_codecs", "encode"),  # how protocol 2 pickles bytes
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
# Training-framework state pickled beside the weights: only data, never needed for conversion.
INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class InertObject:
    """A placeholder for a class a checkpoint pickles as data: it takes any arguments and state and does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


_placeholders: dict[tuple[str, str], type] = {}


def placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(name, (InertObject,), {"__module__": module, "__qualname__": name})
    return _placeholders[key]


def is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class RestrictedUnpickler(pickle.Unpickler):
    source = "the checkpoint"

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS or is_dtype(module, name):
            return super().find_class(module, name)
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        if module.startswith(INERT_MODULE_PREFIXES) and name.isidentifier() and name[:1].isupper():
            return placeholder(module, name)
        raise ConversionError(f"refusing to load {self.source}: its pickle calls {module}.{name}, which could run "
                              "code; use a .safetensors version of the model (or re-save it as one with a tool you "
                              "trust)")


def restricted_pickle_module(source: str) -> types.ModuleType:
    """A stand-in for the `pickle` module, as `torch.load(pickle_module=...)` takes one."""
    module = types.ModuleType("restricted_pickle")
    module.Unpickler = type("Unpickler", (RestrictedUnpickler,), {"source": source})
    module.load = lambda file, **kwargs: module.Unpickler(file, **kwargs).load()
    return module


def load_checkpoint(path: Path) -> dict:
    """A `.ckpt`'s top-level dictionary; tensors are memory-mapped (read when used) where the format allows."""
    pickle_module = restricted_pickle_module(path.name)
    try:
        try:
            loaded = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # The legacy (pre-zip) format cannot be mapped.
            loaded = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    except ConversionError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"cannot read {path.name} as a PyTorch checkpoint: "
                              f"{str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path.name} holds a {type(loaded).__name__}, not a checkpoint's dictionary of weights")
    return loaded
