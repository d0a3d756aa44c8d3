"""One compiled op: the arguments bound at load, the slots read and written at run time."""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Widened:
    """A float16 value that the op receives in float32: a runtime value's slot, or a constant that
    stays float16 in memory and is widened per call, so that no weight is held in both dtypes."""

    source: int | torch.Tensor


Argument = int | Widened | torch.Tensor  # a slot, a widened value, or a constant


def python_value(value):
    """Attribute constants as plain Python: str, scalars, or (nested) lists."""
    if isinstance(value, str):
        return value
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def read(argument: Argument, env: list) -> torch.Tensor:
    if isinstance(argument, torch.Tensor):
        return argument
    if isinstance(argument, Widened):
        source = argument.source
        return (source if isinstance(source, torch.Tensor) else env[source]).float()
    return env[argument]


@dataclass(frozen=True)
class Output:
    slot: int
    dtype: torch.dtype | None  # None for lists and states, which are not tensors
    shape: tuple[int, ...] | None  # None where the program leaves a dim symbolic

    def cast(self, value):
        """`value` in the declared dtype (lists and states pass as they are)."""
        return value if self.dtype is None or value.dtype == self.dtype else value.to(self.dtype)


class OpStep:
    """One op: its function from the op table, called with bound values and values read from slots."""

    def __init__(self, op_type: str, name: str, function: Callable):
        self.op_type, self.name, self.function = op_type, name, function
        self.bound: dict[str, object] = {}  # attribute values and constant tensors, fixed at load
        self.tensors: dict[str, int | Widened] = {}  # read per call
        self.sequences: dict[str, list[Argument]] = {}  # tuple inputs (concat's values, ...)
        self.outputs: list[Output] = []
        self.release: list[int] = []  # slots this step reads or writes for the last time

    def add_tensor(self, name: str, argument: Argument) -> None:
        if isinstance(argument, torch.Tensor):
            self.bound[name] = argument
        else:
            self.tensors[name] = argument

    def slots_used(self) -> list[int]:
        arguments = list(self.tensors.values()) + [a for items in self.sequences.values() for a in items]
        sources = [a.source if isinstance(a, Widened) else a for a in arguments]
        return [s for s in sources if isinstance(s, int)] + [output.slot for output in self.outputs]

    def arguments(self, env: list, skip: str | None = None) -> dict[str, object]:
        """The keyword arguments of the op's function (all but `skip`, which the caller provides)."""
        arguments = dict(self.bound)
        for name, argument in self.tensors.items():
            if name != skip:
                arguments[name] = read(argument, env)
        for name, items in self.sequences.items():
            arguments[name] = [read(item, env) for item in items]
        return arguments

    def results(self, arguments: dict[str, object], check_shapes: bool = True) -> list[torch.Tensor]:
        """The op's outputs, cast to the program's dtypes and checked against its shapes (unless
        the caller evaluates the op on a part of its inputs)."""
        results = self.function(**arguments)
        if not isinstance(results, tuple):
            results = (results,)
        converted = []
        for output, result in zip(self.outputs, results):
            if check_shapes and output.shape is not None and tuple(result.shape) != output.shape:
                raise RuntimeError(
                    f"executor bug: {self.op_type} {self.name!r} produced shape {tuple(result.shape)}, "
                    f"the program declares {output.shape}"
                )
            converted.append(output.cast(result))
        return converted

    def __call__(self, env: list) -> None:
        for output, result in zip(self.outputs, self.results(self.arguments(env))):
            env[output.slot] = result
        for slot in self.release:
            env[slot] = None
