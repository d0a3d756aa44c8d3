"""MIL classify (coremltools `ops/defs/iOS15/classify.py`): the outputs of a classifier model.

coremltools appends it to a program converted with a `ClassifierConfig`; its outputs, a label and a
dictionary, are the model's outputs and no op reads them, so `ReferenceModel` applies it to the
probabilities the program computes (see `classifier.py`) rather than running it as a step.
"""
import torch

from ..registry import register


@register("classify")
def classify(probabilities: torch.Tensor, classes: list[str] | list[int]) -> tuple[str | int, dict]:
    """The class of the highest probability (the first of equal ones) and {class: probability}
    for every class; `probabilities` holds one value per class, in any shape."""
    values = probabilities.reshape(-1).double().cpu()
    if values.numel() != len(classes):
        raise ValueError(f"classify: {values.numel()} probabilities for {len(classes)} classes")
    return classes[int(torch.argmax(values))], dict(zip(classes, values.tolist()))
