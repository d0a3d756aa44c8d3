"""Export a PyTorch module in its weights' dtype into a graph that coremltools converts as it is.

Converting from fp16 weights directly means no fp32 copy of the model is ever held, which is what
lets the full-size Unet convert in a laptop's memory. coremltools' torch frontend, however, was
written for fp32 graphs: several of its op converters compute in fp32 whatever their inputs (`div`
casts both operands to fp32) and turn Python scalars into fp32 constants that promote fp16
tensors, so downstream ops meet fp16 weights with fp32 activations and fail its type checks.

The fix keeps PyTorch's own typing: after every node that PyTorch computes in a low-precision
float type, the graph gets an explicit cast back to that type. coremltools converts each cast into
a `cast` op and removes the ones that turn out to be no-ops, so the final program is the same as
one converted from fp32, without the fp32 weights.

Norm layers are not covered: coremltools' `layer_norm` and `group_norm` converters build fp32
epsilons for fp16 inputs; the Neural Engine modules write both norms as explicit arithmetic.
"""
import torch
from torch.export import ExportedProgram

LOW_PRECISION = (torch.float16, torch.bfloat16)
CAST = torch.ops.aten._to_copy.default


def export_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedProgram:
    """torch.export with static shapes, then the dtype pinning described above."""
    program = torch.export.export(module, example_inputs, strict=False).run_decompositions({})
    pin_low_precision_dtypes(program)
    return program


def pin_low_precision_dtypes(program: ExportedProgram) -> int:
    """Insert a cast to the PyTorch dtype after each low-precision node; returns how many."""
    graph = program.graph
    pinned = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is CAST:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype not in LOW_PRECISION:
            continue
        with graph.inserting_after(node):
            cast = graph.call_function(CAST, (node,), {"dtype": value.dtype})
        cast.meta["val"] = value
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        pinned += 1
    graph.lint()
    program.graph_module.recompile()
    return pinned
