"""A Unet (or ControlNet) that serves several input shapes from one set of weights: a multifunction package
(coremltools' `save_multifunction`) whose default function `main` takes batch 2 and 77 tokens, as Apple's Swift
package loads it, and further functions named by `contract.function_name`: `unguided` (batch 1, which
coreml-generate runs at guidance 1 or below; --unguided-function) and `tokens_154`, `unguided_tokens_154`, ...
(the text conditioning of 2, 3, ... 77-token prompt chunks; --max-prompt-chunks). With --shared-controlled-unet
the Unet's package holds the ControlledUnet too, as `controlled` (and `controlled_tokens_154`, ...), in place of
Apple's second package ControlledUnet.mlpackage that stores the same weights again.

Every function has fixed shapes: Apple's users measured enumerated shapes about 5x slower
(apple/ml-stable-diffusion#306), and range shapes keep a model off the Neural Engine and GPU. Their weights are
equal, so the package stores them once; multifunction packages load from macOS 15 / iOS 18.
"""
import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import coremltools as ct
import torch

from coreml_sd.runtime.contract import (
    CONTROLLED_FUNCTION,
    CONTROLLED_UNET,
    MAIN_FUNCTION,
    MULTIFUNCTION_MINIMUM_OS,
    TEXT_LENGTH,
    UNGUIDED_FUNCTION,
    ComponentSpec,
    ModelDimensions,
    function_name,
)
from coreml_sd.runtime.memory import release_memory

from ..sources import ModelSource

TOKEN_FUNCTION_KINDS = ("unet", "controlled_unet", "controlnet")  # what takes the prompt's text conditioning


@dataclass(frozen=True)
class Function:
    """One function of a multifunction component: its name and the dimensions it is converted at."""

    name: str
    dims: ModelDimensions
    computes: str | None = None  # the component it is, where not the package's own (the Unet's ControlledUnet)

    def component(self, package_component: str) -> str:
        """The component this function computes, in the package of `package_component`."""
        return self.computes or package_component

    def spec(self, source: ModelSource, component: str) -> ComponentSpec:
        return source.family.spec(self.component(component), self.dims)


def component_functions(kind: str, dims: ModelDimensions, unguided_function: bool,
                        max_prompt_chunks: int, shared_controlled_unet: bool = False) -> list[Function]:
    """The functions of a component after `main` (none: it stays a single-function package): for a Unet with
    `unguided_function` its batch-1 function, and for each prompt length up to `max_prompt_chunks` chunks a
    function per batch (the Unet's, ControlledUnet's and ControlNets' text conditioning); for a Unet with
    `shared_controlled_unet` the ControlledUnet's functions, one per prompt length at the guided batch."""
    batches = [False, True] if unguided_function and kind == "unet" else [False]
    chunks = range(1, max_prompt_chunks + 1) if kind in TOKEN_FUNCTION_KINDS else range(1, 2)
    functions = [Function(function_name(unguided, count),
                          replace(dims, unet_batch_size=1 if unguided else dims.unet_batch_size, prompt_chunks=count))
                 for count in chunks for unguided in batches]
    if shared_controlled_unet and kind == "unet":
        functions += [Function(function_name(False, count, controlled=True), replace(dims, prompt_chunks=count),
                               CONTROLLED_UNET) for count in chunks]
    return [function for function in functions if function.name != MAIN_FUNCTION]


def recorded_functions(entry: dict, dims: ModelDimensions) -> list[Function]:
    """The further functions a component's manifest entry lists (the main function's `dims` give the rest)."""
    functions = []
    for name, recorded in entry.get("functions", {}).items():
        inputs = recorded["inputs"]
        batch = recorded.get("unet_batch_size", inputs["sample"]["shape"][0])
        chunks = recorded.get("prompt_chunks", inputs["encoder_hidden_states"]["shape"][-1] // TEXT_LENGTH)
        functions.append(Function(name, replace(dims, unet_batch_size=batch, prompt_chunks=chunks),
                                  recorded.get("component")))
    return functions


def converted_model(source: ModelSource, component: str, spec: ComponentSpec, precision: str, nbits: int | None,
                    attention_implementation: str, verbose: bool, target: int) -> ct.models.MLModel:
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
    mil_program = to_mil_program(program, spec, precision, verbose, target)
    del program
    release_memory()
    return to_ml_program(mil_program, nbits, verbose, target=target)


def combine_functions(staged: Path, models: dict[str, ct.models.MLModel],
                      describe: Callable[[ct.models.MLModel], None], staging: Path, verbose: bool = False) -> None:
    """Replace the staged package by one with `main` (it) and the further functions `models` (name -> model),
    described as the main package was (save_multifunction keeps each function's feature descriptions, not the
    model's)."""
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    functions = MultiFunctionDescriptor()
    functions.add_function(str(staged), "main", MAIN_FUNCTION)
    saved = []
    for name, model in models.items():
        path = staging / f"function-{name}.mlpackage"
        model.save(str(path))
        saved.append(path)
        functions.add_function(str(path), "main", name)
    functions.default_function_name = MAIN_FUNCTION
    combined = staging / "multifunction.mlpackage"
    # it runs coremltools' pass pipeline again, with its progress bars
    with contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO()):
        save_multifunction(functions, str(combined))
    model = ct.models.MLModel(str(combined), skip_model_load=True)
    describe(model)
    shutil.rmtree(staged)
    model.save(str(staged))
    for path in (*saved, combined):
        shutil.rmtree(path)


def manifest_entry(functions: list[Function], source: ModelSource, component: str, max_prompt_chunks: int) -> dict:
    """What the manifest records of a multifunction component beside its entry: each further function's batch,
    prompt chunks, inputs and outputs (and the component it computes, where not this one), the longest prompt it
    takes, the OS versions that load it, and which functions serve unguided sampling and the ControlledUnet."""
    entry = {"minimum_os": str(MULTIFUNCTION_MINIMUM_OS), "functions": {}}
    for function in functions:
        spec = function.spec(source, component).to_json()
        entry["functions"][function.name] = {"unet_batch_size": function.dims.unet_batch_size,
                                             "prompt_chunks": function.dims.prompt_chunks,
                                             **({"component": function.computes} if function.computes else {}),
                                             "inputs": spec["inputs"], "outputs": spec["outputs"]}
    if any(function.name == UNGUIDED_FUNCTION for function in functions):
        entry["unguided_function"] = UNGUIDED_FUNCTION
    if any(function.name == CONTROLLED_FUNCTION for function in functions):
        entry["controlled_unet_function"] = CONTROLLED_FUNCTION
    if max_prompt_chunks > 1:
        entry["max_prompt_chunks"] = max_prompt_chunks
    return entry
