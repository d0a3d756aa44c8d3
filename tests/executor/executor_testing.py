"""Helpers for the executor tests: build a MIL program, save it as a package, run it with the executor."""
import itertools
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.runtime.executor import ReferenceModel

_MIL_TYPES = {np.dtype(np.float32): types.fp32, np.dtype(np.float16): types.fp16, np.dtype(np.int32): types.int32}
_package_numbers = itertools.count()


def save_program(program, directory: Path, target=ct.target.iOS16, inputs: list | None = None) -> Path:
    """Save a MIL program as an ML Program package, exactly as built (no graph passes); `inputs`
    (ct.TensorType) declares flexible input shapes."""
    model = ct.convert(
        program,
        inputs=inputs,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=target,
        pass_pipeline=ct.PassPipeline.EMPTY,
    )
    path = directory / f"program{next(_package_numbers)}.mlpackage"
    model.save(str(path))
    return path


def mil_program(body, inputs: dict[str, np.ndarray], target=ct.target.iOS16):
    """A MIL program whose inputs are shaped and typed like `inputs`; `body` takes them by name, in
    order, and returns the output var(s)."""
    specs = [mb.TensorSpec(shape=value.shape, dtype=_MIL_TYPES[value.dtype]) for value in inputs.values()]
    return mb.program(input_specs=specs, opset_version=target)(body)


def run_mil(
    body, inputs: dict[str, np.ndarray], directory: Path, precision: str = "float16", target=ct.target.iOS16
) -> list[np.ndarray]:
    """Build, save, load and run a program; its outputs in the order `body` returns them."""
    model = ReferenceModel(save_program(mil_program(body, inputs, target), directory, target), precision=precision)
    outputs = model.predict(inputs)
    return [outputs[name] for name in model.output_description]


def random(shape, seed: int = 0, dtype=np.float32, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)
