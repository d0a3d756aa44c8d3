"""The op table: one PyTorch (or NumPy) function per MIL op type.

An implementation is a plain function whose keyword arguments are the op's MIL input names. What it
receives for each input is decided once, when a program is compiled (see `program.py`):

* a `torch.Tensor` for every tensor input (floating-point constants such as weights included);
* a Python value (`int`, `float`, `bool`, `str` or a nested list of them) for inputs that the MIL op
  definition declares compile-time constant and that are not floating point: `axes`, `perm`,
  `pad_type`, `strides`, `keep_dims`, ...;
* nothing for an optional input the program leaves out, so the function's default must be the MIL
  default.

It returns a tensor, or a tuple of tensors for ops with several outputs. The caller casts each result
to the dtype the program declares for that output, so implementations need not care about the
output dtype (that cast is where float16 rounding happens).

`widen=True` marks ops that Core ML accumulates in float32 (convolutions, matrix products,
reductions, normalisations, softmax): float16 inputs reach the function as float32.
`load_time=True` marks the `constexpr_*` ops, which decompress constants: they run once, in NumPy,
on NumPy inputs, when the package is loaded.
"""
from dataclasses import dataclass
from typing import Callable

from coremltools import target

# coremltools registers its base opset at iOS 13; ops revised later are registered again at their
# release, and a program's op reports the version it was built from.
BASE_OPSET = target.iOS13


@dataclass(frozen=True)
class OpImplementation:
    op_type: str
    function: Callable
    widen: bool
    load_time: bool


OP_TABLE: dict[str, dict[int, OpImplementation]] = {}


def register(op_type: str, *, since: int = BASE_OPSET, widen: bool = False, load_time: bool = False):
    """Decorator adding `function` to the table for `op_type`, from opset version `since` on."""

    def add(function: Callable) -> Callable:
        versions = OP_TABLE.setdefault(op_type, {})
        if since in versions:
            raise ValueError(f"MIL op {op_type!r} is already implemented for opset {since}")
        versions[since] = OpImplementation(op_type, function, widen, load_time)
        return function

    return add


def lookup(op_type: str, opset_version: int) -> OpImplementation | None:
    """The implementation for the newest registered version not newer than the op's, if any."""
    versions = OP_TABLE.get(op_type, {})
    usable = [v for v in versions if v <= opset_version]
    return versions[max(usable)] if usable else None


def implementation_for(op) -> OpImplementation | None:
    """The implementation for a program's op. Dialect ops (coreml_update_state) have no opset
    history of their own; they are registered at the base opset."""
    has_history = isinstance(type(op)._op_variants, dict)
    return lookup(op.op_type, op.opset_version if has_history else BASE_OPSET)
