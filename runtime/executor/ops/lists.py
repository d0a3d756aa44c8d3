"""MIL's lists (iOS 15 control_flow): growable arrays of same-shaped tensors, most often carried
through a while_loop.

A list is held as a `TensorList`, which the ops never change: `list_write` and `list_scatter`
return a new one, so a value read from an older list stays what it was. Elements never written
read as zeros of the element shape. A write or scatter at an index past the end grows a list of
`dynamic_length` with zero elements up to that index; a list of fixed length refuses it.
"""
from dataclasses import dataclass

import torch

from ..registry import register

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int32": torch.int32, "bool": torch.bool}


@dataclass(frozen=True)
class TensorList:
    elements: tuple[torch.Tensor | None, ...]  # None: not written yet (its shape may be unknown)
    element_shape: tuple[int, ...] | None  # None while a dim is symbolic and nothing was written
    dtype: torch.dtype
    dynamic_length: bool

    def read(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.elements):
            raise IndexError(f"list index {index} is out of range for a list of length {len(self.elements)}")
        element = self.elements[index]
        if element is not None:
            return element
        if self.element_shape is None:
            raise ValueError(f"list element {index} was never written and the list's element shape is not known")
        return torch.zeros(self.element_shape, dtype=self.dtype)

    def written(self, updates: dict[int, torch.Tensor]) -> "TensorList":
        end = max([len(self.elements)] + [index + 1 for index in updates])
        if end > len(self.elements) and not self.dynamic_length:
            raise IndexError(f"index {end - 1} is out of range for a list of fixed length {len(self.elements)}")
        elements = list(self.elements) + [None] * (end - len(self.elements))
        for index, value in updates.items():
            elements[index] = value.to(self.dtype)
        shape = tuple(next(iter(updates.values())).shape) if updates else self.element_shape
        return TensorList(tuple(elements), shape, self.dtype, self.dynamic_length)


def _int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


@register("make_list")
def make_list(elem_shape, init_length=1, dynamic_length=True, dtype="fp32"):
    # A string dim is a symbol: the shape is learnt from the first element written.
    dims = [d if isinstance(d, str) else _int(d) for d in elem_shape]
    shape = None if any(isinstance(d, str) for d in dims) else tuple(dims)
    return TensorList((None,) * _int(init_length), shape, _DTYPES[dtype], bool(dynamic_length))


@register("list_length")
def list_length(ls):
    return torch.tensor(len(ls.elements), dtype=torch.int32)


@register("list_write")
def list_write(ls, index, value):
    return ls.written({_int(index): value})


@register("list_read")
def list_read(ls, index):
    return ls.read(_int(index))


@register("list_gather")
def list_gather(ls, indices):
    return torch.stack([ls.read(int(i)) for i in indices.reshape(-1).tolist()])


@register("list_scatter")
def list_scatter(ls, indices, value):
    return ls.written({int(i): element for i, element in zip(indices.reshape(-1).tolist(), value)})
