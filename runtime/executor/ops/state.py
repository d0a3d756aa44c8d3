"""iOS 18 states: tensors that persist across predictions (a KV cache, an accumulator).

A state input's slot holds its `StateCell`, which belongs to the caller's state object
(`ReferenceModel.make_state`); `coreml_update_state` replaces the cell's tensor, so the next op
that reads the state, in this prediction or a later one, sees the new value.
"""
from dataclasses import dataclass

import torch
from coremltools import target

from ..registry import register


@dataclass
class StateCell:
    value: torch.Tensor


@register("read_state", since=target.iOS18)
def read_state(input):
    return input.value


@register("coreml_update_state")
def coreml_update_state(state, value):
    state.value = value.to(state.value.dtype)
    return value
