"""Loading a package's components: each on its compute units, now or (with `reduce_memory`) when its stage first
runs; of a multifunction Unet or ControlNet, the function a call needs: `unguided` for sampling without guidance,
and the function for the text conditioning's length (`tokens_154`, ...; --max-prompt-chunks), as the manifest
names them; a ControlledUnet held in the Unet's package (--shared-controlled-unet) as its functions `controlled`,
`controlled_tokens_154`, ...
"""
from functools import partial

from .backends import ManagedModel, Model, PromptLengthFunctions, default_compute_unit, load_model
from .package import Package


def compute_unit_of(package: Package, name: str, requested: str | None) -> str:
    """Where a component runs: on the compute units asked for, else where its manifest says it runs (a float32
    VAE: CPU_AND_GPU), else where its attention implementation runs best."""
    return requested or package.compute_units.get(name) or default_compute_unit(package.attention_implementation)


def load_component(package: Package, name: str, backend: str, compute_unit: str | None,
                   reduce_memory: bool = False, function_name: str | None = None) -> Model:
    """A component (of a multifunction model, function `function_name`, by default the one the component is of
    another's package), loaded now or, with `reduce_memory`, when it first runs (and unloaded after its stage). A
    Unet or ControlNet with functions for longer prompts runs the one the text conditioning's length asks for, each
    loaded when first run."""
    files = package.component(name)
    function_name = function_name or package.component_functions.get(name)
    load = partial(load_model, files, backend, compute_unit_of(package, name, compute_unit), function_name)
    model = ManagedModel(files, load, function_name) if reduce_memory else load()
    return by_prompt_length(package, name, model, backend, compute_unit)


def function_model(package: Package, name: str, backend: str, compute_unit: str | None, function_name: str) -> Model:
    """One function of a multifunction component, loaded when first run."""
    files = package.component(name)
    load = partial(load_model, files, backend, compute_unit_of(package, name, compute_unit), function_name)
    return ManagedModel(files, load, function_name)


def by_prompt_length(package: Package, name: str, model: Model, backend: str, compute_unit: str | None) -> Model:
    """`model` (a component's function for one 77-token chunk) with the component's functions for longer prompts
    at the same batch, where the package has them (the manifest names them)."""
    functions = package.prompt_length_functions(name, model.input_description["sample"][0][0]) \
        if "encoder_hidden_states" in model.input_description else {}
    if len(functions) < 2:
        return model
    return PromptLengthFunctions({chunks: model if chunks == 1 else
                                  function_model(package, name, backend, compute_unit, function)
                                  for chunks, function in sorted(functions.items())}, name)


def unguided_unet(package: Package, backend: str, compute_unit: str | None) -> Model | None:
    """The Unet's batch-1 function for sampling without guidance, where the package has one; loaded when first
    run, so that guided sampling never loads it."""
    if package.unguided_function is None:
        return None
    model = function_model(package, package.unet_name, backend, compute_unit, package.unguided_function)
    return by_prompt_length(package, package.unet_name, model, backend, compute_unit)
