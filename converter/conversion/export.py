"""Export a PyTorch module in its weights' dtype into the graph coremltools converts.

Converting from fp16 weights directly means no fp32 copy of the model is ever held, which is what
lets the full-size Unet convert in a laptop's memory. coremltools' torch frontend, however, was
written for fp32 graphs: several of its op converters compute in fp32 whatever their inputs (`div`
casts both operands to fp32), turn Python scalars into fp32 constants that promote fp16 tensors,
and build fp32 epsilons inside `layer_norm`. The Neural Engine modules (`coreml_sd.converter.ane`)
are written so that none of that happens: constants are typed tensors, divisions are products and
normalizations are written out. Their graphs therefore convert as they are, every op in the
weights' dtype, and a graph that breaks the rule fails coremltools' type checks rather than
converting into something else.
"""
import torch
from torch.export import ExportedProgram


def export_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedProgram:
    """torch.export with static shapes, lowered to the ATen dialect that coremltools converts."""
    return torch.export.export(module, example_inputs, strict=False).run_decompositions({})
