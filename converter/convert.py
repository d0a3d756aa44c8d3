"""One component, from PyTorch module to Core ML ML Program."""
import contextlib
import io

import coremltools as ct
import numpy as np
import torch

from .families.contract import COMPONENT_SUMMARIES, PACKAGE_MINIMUM_OS, ComponentSpec
from .export import export_module
from .palettize import palettizing_pipeline

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}
MINIMUM_DEPLOYMENT_TARGET = getattr(ct.target, f"iOS{PACKAGE_MINIMUM_OS.ios}")  # = macOS 13


def example_inputs(spec: ComponentSpec) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype]) for t in spec.inputs)


def trace(module: torch.nn.Module, spec: ComponentSpec) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return export_module(module, example_inputs(spec))


def computes_in_float16(op) -> bool:
    """All ops but the timestep embedding's sinusoids: there t × frequency reaches 1000 rad, where
    float16's spacing of 0.5 would move the phases by up to a third of a radian."""
    if op.op_type in ("sin", "cos"):
        return False
    return not (op.op_type == "mul" and any(child.op_type in ("sin", "cos") for child in op.outputs[0].child_ops))


def to_ml_program(program: torch.export.ExportedProgram, spec: ComponentSpec,
                  quantize_nbits: int | None = None, precision: str = "float16",
                  verbose: bool = False) -> ct.models.MLModel:
    """Convert with float16 compute (or float32, for a program traced with float32 weights) and the
    contract's input and output names and dtypes; with `quantize_nbits`, weights palettized by
    `palettize_module` are stored as palette + indices. coremltools' progress bars (hundreds of
    carriage-return updates) are kept out of the stage lines unless `verbose`."""
    if precision == "float32":
        compute_precision = ct.precision.FLOAT32
    else:
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=computes_in_float16)
    bars = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    with bars:
        return ct.convert(
            program,
            inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=NUMPY_DTYPES[t.dtype]) for t in spec.inputs],
            outputs=[ct.TensorType(name=t.name, dtype=NUMPY_DTYPES[t.dtype]) for t in spec.outputs],
            convert_to="mlprogram",
            compute_precision=compute_precision,
            minimum_deployment_target=MINIMUM_DEPLOYMENT_TARGET,
            skip_model_load=True,
            pass_pipeline=palettizing_pipeline(quantize_nbits) if quantize_nbits else ct.PassPipeline.DEFAULT,
        )


def describe(model: ct.models.MLModel, spec: ComponentSpec, kind: str, version: str, licence: str | None,
             metadata: dict[str, str]) -> None:
    """What Xcode shows of a package (a summary, each input's and output's meaning, layout and dtype, the
    version and licence of the model it was converted from, as Apple's packages carry them), and the
    `coreml_sd.*` metadata that records what it was made from."""
    model.short_description = f"{COMPONENT_SUMMARIES[kind]} ({spec.name}, converted by coreml-sd)"
    model.author = "coreml-sd"
    model.version = version
    if licence:
        model.license = licence
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for name in model.input_description:
        model.input_description[name] = tensors[name].description
    for name in model.output_description:
        model.output_description[name] = tensors[name].description
    model.user_defined_metadata.update(metadata)
