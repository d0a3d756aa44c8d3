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

coremltools' `layer_norm` converter also builds an fp32 epsilon for fp16 inputs, and no cast can
reach inside it, so layer norms are decomposed into explicit arithmetic before conversion.
"""
import torch
from torch.export import ExportedProgram

LOW_PRECISION = (torch.float16, torch.bfloat16)
CAST = torch.ops.aten._to_copy.default


def layer_norm(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, cudnn_enable: bool = True) -> torch.Tensor:
    """aten.layer_norm as arithmetic: normalise over the trailing `normalized_shape` axes."""
    axes = list(range(-len(normalized_shape), 0))
    centered = x - x.mean(axes, keepdim=True)
    normalized = centered * torch.rsqrt((centered * centered).mean(axes, keepdim=True) + eps)
    if weight is not None:
        normalized = normalized * weight
    if bias is not None:
        normalized = normalized + bias
    return normalized


DECOMPOSITIONS = {torch.ops.aten.layer_norm.default: layer_norm}


def export_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedProgram:
    """torch.export with static shapes, then the dtype pinning described above."""
    program = torch.export.export(module, example_inputs, strict=False).run_decompositions(DECOMPOSITIONS)
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
