"""Figures about a converted ML Program, read from coremltools' own program objects.

What matters for the Neural Engine and is checked here: the highest tensor rank (rank > 4 falls off the
engine), the largest intermediate tensor (memory traffic), the attention scores' size (the `softmax`
inputs) and how many data-moving ops (transpose, reshape) the program has.
"""
import math
from collections import Counter
from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import Program, types
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from coreml_sd.runtime.executor.program import all_operations


def load_program(mlmodel_or_path: "ct.models.MLModel | Program | str | Path") -> Program:
    """The MIL program of a converted model (kept by coremltools) or of a saved `.mlpackage`."""
    if isinstance(mlmodel_or_path, Program):
        return mlmodel_or_path
    if isinstance(mlmodel_or_path, ct.models.MLModel):
        model = mlmodel_or_path
    else:
        path = Path(mlmodel_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}")
        model = ct.models.MLModel(str(path), skip_model_load=True)
    if getattr(model, "_mil_program", None) is not None:
        return model._mil_program
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError("program statistics need an ML Program (convert_to='mlprogram'), not a neural network")
    return milproto.load(spec, spec.specificationVersion, model.weights_dir)


def tensor_summary(var, op_type: str) -> dict:
    shape = [str(d) if is_symbolic(d) else int(d) for d in var.shape]
    elements = None if any(isinstance(d, str) for d in shape) else math.prod(shape)
    return {"name": var.name, "op": op_type, "shape": shape, "elements": elements}


def larger(current: dict | None, candidate: dict) -> dict:
    if current is None or (candidate["elements"] or 0) > (current["elements"] or 0):
        return candidate
    return current


def program_stats(mlmodel_or_path: "ct.models.MLModel | Program | str | Path") -> dict:
    """Statistics over every function of the program.

    Returns `max_rank` (over inputs, constants and op outputs), `largest_intermediate` (weights
    excluded, compressed ones too) and
    `largest_attention_scores` (each {"name", "op", "shape", "elements"}, or None), `op_counts`
    (op type → count, constants excluded) and the `transposes` and `reshapes` counts.
    """
    program = load_program(mlmodel_or_path)
    max_rank = 0
    largest = None
    largest_scores = None
    op_counts = Counter()
    for function in program.functions.values():
        for var in function.inputs.values():
            max_rank = max(max_rank, var.rank)
        for op in all_operations(function):
            for var in op.outputs:
                if types.is_tensor(var.sym_type):
                    max_rank = max(max_rank, var.rank)
            if op.op_type == "const":
                continue
            op_counts[op.op_type] += 1
            if op.op_type.startswith("constexpr_"):
                continue  # a compressed weight, expanded once at load: not an intermediate
            for var in op.outputs:
                if types.is_tensor(var.sym_type):
                    largest = larger(largest, tensor_summary(var, op.op_type))
            if op.op_type == "softmax":
                largest_scores = larger(largest_scores, tensor_summary(op.x, op.op_type))
    return {
        "max_rank": max_rank,
        "largest_intermediate": largest,
        "largest_attention_scores": largest_scores,
        "op_counts": dict(sorted(op_counts.items())),
        "transposes": op_counts["transpose"],
        "reshapes": op_counts["reshape"],
    }
