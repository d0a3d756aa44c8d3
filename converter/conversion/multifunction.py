"""A Unet that serves guided and unguided sampling from one set of weights: a multifunction package
(coremltools' `save_multifunction`) whose default function `main` takes batch 2, as Apple's Swift package loads
it, and whose function `unguided` takes batch 1, which coreml-generate runs at guidance 1 or below.

Both functions have fixed shapes: Apple's users measured enumerated shapes about 5x slower
(apple/ml-stable-diffusion#306). Their weights are equal, so the package stores them once; multifunction
packages load from macOS 15 / iOS 18.
"""
import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import coremltools as ct
import torch

from coreml_sd.runtime.contract import ComponentSpec, MinimumOS, ModelDimensions
from coreml_sd.runtime.memory import release_memory

from ..sources import ModelSource

UNGUIDED_FUNCTION = "unguided"
MULTIFUNCTION_MINIMUM_OS = MinimumOS(macos="15", ios="18")


def unguided_spec(source: ModelSource, component: str, dims: ModelDimensions) -> ComponentSpec:
    return source.family.spec(component, replace(dims, unet_batch_size=1))


def converted_model(source: ModelSource, component: str, spec: ComponentSpec, precision: str, nbits: int | None,
                    attention_implementation: str, verbose: bool) -> ct.models.MLModel:
    """The component converted for `spec`, each step as the main conversion takes it."""
    from ..ane import component_module
    from ..compression.palettize import palettize_parts
    from .convert import to_mil_program, to_ml_program, trace

    parts = source.load(component, torch.float32 if precision == "float32" else torch.float16)
    if nbits:
        palettize_parts(parts, nbits)  # deterministic: the same palettes as the main function's
    program = trace(component_module(parts, source.family.component(component), attention_implementation), spec)
    del parts
    release_memory()
    mil_program = to_mil_program(program, spec, precision, verbose)
    del program
    release_memory()
    return to_ml_program(mil_program, nbits, verbose)


def add_unguided_function(staged: Path, unguided: ct.models.MLModel, describe: Callable[[ct.models.MLModel], None],
                          staging: Path, verbose: bool = False) -> None:
    """Replace the staged batch-2 package by one with `main` (it) and `unguided` (the batch-1 model), described
    as the main package was (save_multifunction keeps each function's feature descriptions, not the model's)."""
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    batch_1, combined = staging / "unguided.mlpackage", staging / "multifunction.mlpackage"
    unguided.save(str(batch_1))
    functions = MultiFunctionDescriptor()
    functions.add_function(str(staged), "main", "main")
    functions.add_function(str(batch_1), "main", UNGUIDED_FUNCTION)
    functions.default_function_name = "main"
    # it runs coremltools' pass pipeline again, with its progress bars
    with contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO()):
        save_multifunction(functions, str(combined))
    model = ct.models.MLModel(str(combined), skip_model_load=True)
    describe(model)
    shutil.rmtree(staged)
    model.save(str(staged))
    shutil.rmtree(batch_1)
    shutil.rmtree(combined)


def manifest_entry(spec: ComponentSpec) -> dict:
    """What the manifest records of the unguided function, beside the component's entry."""
    unguided = spec.to_json()
    return {"unguided_function": UNGUIDED_FUNCTION, "minimum_os": str(MULTIFUNCTION_MINIMUM_OS),
            "functions": {UNGUIDED_FUNCTION: {"inputs": unguided["inputs"], "outputs": unguided["outputs"]}}}
