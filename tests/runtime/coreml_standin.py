"""Core ML as the tests' stand-in: coremltools' `CompiledMLModel` and `compile_model`, computed by the reference
executor, so that the Core ML adapter (runtime/backends.py) runs line for line where Core ML does not exist.

The stand-in keeps the contract the adapter relies on:
* `CompiledMLModel(path, compute_units=ComputeUnit.ALL, function_name=None, optimization_hints=None)` loads a
  compiled model folder (of a multifunction model, the function `function_name` names); `compute_units` must be
  a `coremltools.ComputeUnit`.
* `predict(dict) -> dict`: input names must be the model's (coremltools raises KeyError otherwise); coremltools
  widens float16 arrays to float32 before Core ML sees them; Core ML takes multi-arrays of float32, float64 and
  int32 and converts each to the type the input declares; the outputs are the declared ones, by name.
* `compile_model(package, destination)` writes a folder at `destination` and returns its path. The fake compiled
  model holds the package itself and a `metadata.json` as Core ML writes one (input and output schemas, user
  metadata), so that the adapter's reading of compiled models runs too.
"""
import json
import shutil
from pathlib import Path

import coremltools as ct
import numpy as np

from coreml_sd.runtime.backends import CoreMLFunctions, describe_model, model_metadata
from coreml_sd.runtime.executor import ReferenceModel

SOURCE = "model.mlpackage"  # where the fake compiler keeps the package inside a compiled model
CORE_ML_ARRAY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32))
SCHEMA_DTYPES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32", np.dtype(np.float64): "Double",
                 np.dtype(np.int32): "Int32"}


class CompiledMLModel:
    def __init__(self, path: str, compute_units=ct.ComputeUnit.ALL, function_name=None, optimization_hints=None):
        if not isinstance(compute_units, ct.ComputeUnit):
            raise TypeError(f"compute_units must be a coremltools.ComputeUnit, not {compute_units!r}")
        self.path, self.compute_units, self.function_name = Path(path), compute_units, function_name
        self._model = ReferenceModel(self.path / SOURCE, function_name=function_name)

    def predict(self, data: dict) -> dict:
        declared = self._model.input_description
        for name in data:
            if name not in declared:
                raise KeyError(f'Provided key "{name}", in the input dict, does not match any of the model input '
                               f"name(s), which are: {set(declared)}")
        inputs = {}
        for name, (_, dtype) in declared.items():
            value = np.asarray(data[name])
            if value.dtype == np.float16:
                value = value.astype(np.float32)
            if value.dtype not in CORE_ML_ARRAY_DTYPES:
                raise TypeError(f"input {name!r}: Core ML takes no multi-array of {value.dtype}")
            inputs[name] = value.astype(dtype)
        return self._model.predict(inputs)


def _schema(description) -> list[dict]:
    return [{"name": name, "shape": json.dumps(list(shape)), "dataType": SCHEMA_DTYPES[dtype], "type": "MultiArray"}
            for name, (shape, dtype) in description.items()]


class Compiler:
    """`compile_model` that counts its compilations."""

    def __init__(self):
        self.compiled: list[Path] = []

    def __call__(self, package: str, destination: str) -> str:
        self.compiled.append(Path(package))
        target = Path(destination)
        target.mkdir(parents=True)
        shutil.copytree(package, target / SOURCE)
        inputs, outputs = describe_model(Path(package))
        (target / "metadata.json").write_text(json.dumps([{
            "inputSchema": _schema(inputs), "outputSchema": _schema(outputs),
            "userDefinedMetadata": model_metadata(Path(package)),
        }]))
        return str(target)


def core_ml_standin(compiler: Compiler, os_version: str = "14.5") -> CoreMLFunctions:
    return CoreMLFunctions(compiled_model=CompiledMLModel, compile_model=compiler,
                           compute_unit=lambda name: ct.ComputeUnit[name], os_version=os_version, available=True)
