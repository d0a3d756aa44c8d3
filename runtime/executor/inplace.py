"""Elementwise ops that write their result into an input's memory when nothing else needs it.

An elementwise op whose input is a fresh tensor (made by the op that produced it, no view of another
value) read by this op alone can overwrite it: the output has its shape and dtype, and PyTorch's
kernels give each element the same value whether or not the output aliases the input. At 512 x 512
with 128 channels each value is 64 MiB; a new one costs page faults and zeroing that take longer
than the arithmetic, and in place the step also holds one value fewer at its peak.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .steps import OpStep, Output

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": torch.true_divide,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}
_UNARY = {
    "relu": torch.relu_,
    "sigmoid": torch.sigmoid_,
    "silu": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh_,
}
# Ops whose outputs are new tensors that nothing but their slot refers to (never a view of an input).
_FRESH_OUTPUTS = frozenset(_BINARY) | frozenset(_UNARY) | {
    "attention", "concat", "conv", "gelu", "instance_norm", "layer_norm", "linear", "matmul",
    "reduce_mean", "softmax",
}


def _binary_into(function: Callable, target: str) -> Callable:
    def apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return function(x, y, out=x if target == "x" else y)

    return apply


def _candidate(step, target: str, producers: dict[int, Output], readers: dict[int, int], keep: set[int]) -> bool:
    slot = step.tensors.get(target) if isinstance(step, OpStep) else None
    if not isinstance(slot, int) or slot in keep or readers.get(slot) != 1 or slot not in producers:
        return False
    produced, (output,) = producers[slot], step.outputs
    return produced.shape is not None and produced.shape == output.shape and produced.dtype == output.dtype


def write_in_place(steps: list, keep: set[int]) -> list[str]:
    """Give eligible elementwise steps an in-place function (`keep`: slots the caller reads after the
    run); the names of the steps that got one."""
    producers: dict[int, Output] = {}
    readers: dict[int, int] = {}
    for step in steps:
        written = {output.slot for output in step.outputs}
        for slot in set(step.slots_used()) - written:
            readers[slot] = readers.get(slot, 0) + 1
        if step.op_type in _FRESH_OUTPUTS:
            producers.update({output.slot: output for output in step.outputs if output.dtype is not None})
    rewritten = []
    for step in steps:
        if step.op_type in _BINARY and len(step.outputs) == 1:
            target = next((name for name in ("x", "y") if _candidate(step, name, producers, readers, keep)), None)
            if target is not None:
                step.function = _binary_into(_BINARY[step.op_type], target)
                rewritten.append(step.name)
        elif step.op_type in _UNARY and len(step.outputs) == 1 and _candidate(step, "x", producers, readers, keep):
            step.function = _UNARY[step.op_type]
            rewritten.append(step.name)
    return rewritten
