"""A classifier's outputs: Core ML predicts a classifier's class label and a {class: probability}
dictionary besides its tensors. Its program ends in a `classify` op that makes them; the executor
runs the program up to the probabilities and applies the op's function to them."""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import implementation_for
from .steps import python_value


@dataclass(frozen=True)
class Classifier:
    """A classifier's `classify` op, applied to the probabilities its program computes: the op's
    outputs (the predicted class, {class: probability}) are Python values, not tensors."""

    label: str  # the output names
    probabilities: str
    source: str  # the program's value that classify reads
    classes: list
    function: Callable

    @property
    def outputs(self) -> tuple[str, str]:
        return self.label, self.probabilities

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
        label, probabilities = self.function(probabilities=tensors[self.source], classes=self.classes)
        return {self.label: label, self.probabilities: probabilities}


def detach_classifier(function) -> Classifier | None:
    """Take a classifier's `classify` op out of `function`, whose outputs then hold the
    probabilities it reads instead of the op's own outputs."""
    ops = [op for op in function.operations if op.op_type == "classify"]
    if not ops:
        return None
    (op,) = ops
    label, probabilities = op.outputs
    source = op.inputs["probabilities"]
    outputs = [var for var in function.outputs if var not in op.outputs]
    function.set_outputs(outputs + ([source] if source not in outputs else []))
    function.remove_ops([op])
    implementation = implementation_for(op)
    return Classifier(label.name, probabilities.name, source.name, python_value(op.inputs["classes"].val),
                      implementation.function)
