"""One component, from PyTorch module to Core ML ML Program."""
import contextlib
import copy
import io

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil.mil import Program

from coreml_sd.runtime.contract import (
    COMPONENT_SUMMARIES,
    PACKAGE_MINIMUM_OS,
    ComponentSpec,
)

from ..compression import LinearQuantization
from ..compression.linear import quantize_program
from ..compression.palettize import palettize_program
from .export import export_module

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}
MINIMUM_IOS = int(PACKAGE_MINIMUM_OS.ios)  # = macOS 13
# export_module lowers to the ATen dialect, which a one-step conversion records as the source's
SOURCE_DIALECT = "TorchExport::ATEN"


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


def to_mil_program(program: torch.export.ExportedProgram, spec: ComponentSpec, precision: str = "float16",
                   verbose: bool = False, target: int = MINIMUM_IOS) -> Program:
    """coremltools' frontend and default passes: float16 compute (or float32, for a program traced with float32
    weights), the contract's input and output names and dtypes. The MIL program's constants share the traced
    program's weights: drop the traced program before `to_ml_program`, so that palettizing frees each float16
    weight as it stores its palette (otherwise the traced program keeps all of them beside the palettes). `target`:
    the minimum deployment target's iOS version (grouped palettes and int4 weights need 18)."""
    if precision == "float32":
        compute_precision = ct.precision.FLOAT32
    else:
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=computes_in_float16)
    with _quiet(verbose):
        return ct.convert(
            program,
            inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=NUMPY_DTYPES[t.dtype]) for t in spec.inputs],
            outputs=[ct.TensorType(name=t.name, dtype=NUMPY_DTYPES[t.dtype]) for t in spec.outputs],
            convert_to="milinternal",
            compute_precision=compute_precision,
            minimum_deployment_target=getattr(ct.target, f"iOS{target}"),
        )


def to_ml_program(program: Program, quantize_nbits: int | None = None, verbose: bool = False,
                  palettized_layers: bool = False, group: int | None = None,
                  linear: LinearQuantization | None = None, target: int = MINIMUM_IOS) -> ct.models.MLModel:
    """The ML Program of `to_mil_program`'s result; with `quantize_nbits`, weights palettized by `palettize_module`
    are stored as palette + indices; with `palettized_layers` (a recipe's, each at its own size), each weight whose
    distinct values fit a palette is (a palette per `group` output channels with `group`); with `linear`, weights
    quantized by `linear.quantize_module` are stored as integers and scales. Its metadata names the PyTorch program
    it was converted from, as a one-step conversion records it."""
    with _quiet(verbose):
        if quantize_nbits or palettized_layers:
            palettize_program(program, quantize_nbits, group)
        elif linear:
            quantize_program(program, linear)
        model = ct.convert(
            program,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32,  # leaves the precision to_mil_program chose as it is
            minimum_deployment_target=getattr(ct.target, f"iOS{target}"),
            skip_model_load=True,
            pass_pipeline=backend_cleanup_pipeline(),
        )
    record_torch_source(model)
    return model


def backend_cleanup_pipeline() -> ct.PassPipeline:
    """The default passes that coremltools' ML Program backend runs again after its own (dead code and constant
    elimination, cast optimization, name deduplication). The backend leaves out any default pass the main pipeline
    leaves out, so with an empty main pipeline the backend would skip them, and without name deduplication a
    program can hold two variables of one name."""
    default = set(ct.PassPipeline.DEFAULT.passes)
    backend = ct.PassPipeline.get_pipeline("backend_mlprogram").passes
    return ct.PassPipeline(pass_names=[name for name in dict.fromkeys(backend) if name in default])


def record_torch_source(model: ct.models.MLModel) -> None:
    """The source coremltools records, in the metadata and in the program's build info, when it converts the exported
    program in one step (converted from the MIL program, it records "milinternal")."""
    model.user_defined_metadata.update(
        {"com.github.apple.coremltools.source": f"torch=={torch.__version__}",
         "com.github.apple.coremltools.source_dialect": SOURCE_DIALECT}
    )
    entries = model._spec.mlProgram.attributes["buildInfo"].immediateValue.dictionary.values
    build_info = {entry.key.immediateValue.tensor.strings.values[0]: entry.value.immediateValue.tensor.strings.values[0]
                  for entry in entries}
    build_info.pop("coremltools-component-milinternal", None)
    build_info.update({"coremltools-component-torch": torch.__version__, "coremltools-source-dialect": SOURCE_DIALECT})
    template = copy.deepcopy(entries[0])
    del entries[:]
    for key, value in build_info.items():
        entry = entries.add()
        entry.CopyFrom(template)
        entry.key.immediateValue.tensor.strings.values[0] = key
        entry.value.immediateValue.tensor.strings.values[0] = value


def _quiet(verbose: bool):
    """coremltools' progress bars (hundreds of carriage-return updates) stay out of the stage lines unless
    `verbose`."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())


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
