"""One model interface over two backends: Core ML on macOS, the reference executor everywhere.

A model has `input_description` (input name -> (shape, dtype)) and `predict(inputs) -> outputs`, both keyed
by the I/O contract's names; the pipeline never knows which backend runs it.
"""
import json
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import GenerationError

BACKENDS = ("auto", "coreml", "reference")
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
# Split-einsum attention is laid out for the Neural Engine; the original attention runs best on the GPU.
COMPUTE_UNIT_BY_ATTENTION = {
    "split_einsum": "CPU_AND_NE",
    "split_einsum_v2": "CPU_AND_NE",
    "original": "CPU_AND_GPU",
}
InputDescription = dict[str, tuple[tuple[int, ...], np.dtype]]


class Model(Protocol):
    input_description: InputDescription

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise GenerationError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "coreml" if sys.platform == "darwin" else "reference"
    if backend == "coreml" and sys.platform != "darwin":
        raise GenerationError("the Core ML backend runs only on macOS; use --backend reference")
    return backend


def default_compute_unit(attention_implementation: str | None) -> str:
    return COMPUTE_UNIT_BY_ATTENTION.get(attention_implementation, "ALL")


# Core ML's multi-array data types by their names in compiled models' metadata.json (and in the spec's enum).
_ARRAY_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "DOUBLE": np.float64, "INT32": np.int32}
_METADATA_DTYPES = {"Float16": np.float16, "Float32": np.float32, "Double": np.float64, "Int32": np.int32}


def _description_from_spec(spec) -> InputDescription:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    described = {}
    for feature in spec.description.input:
        array = feature.type.multiArrayType
        dtype = _ARRAY_DTYPES[ArrayFeatureType.ArrayDataType.Name(array.dataType)]
        described[feature.name] = (tuple(array.shape), np.dtype(dtype))
    return described


def _description_from_compiled(path: Path) -> InputDescription:
    """A compiled model keeps no spec; its metadata.json lists the inputs (shape as text, e.g. "[2, 4, 64, 64]")."""
    schema = json.loads((path / "metadata.json").read_text())[0]["inputSchema"]
    return {
        entry["name"]: (tuple(json.loads(entry["shape"])), np.dtype(_METADATA_DTYPES[entry["dataType"]]))
        for entry in schema
    }


class CoreMLModel:
    """coremltools' MLModel (for .mlpackage) or CompiledMLModel (for .mlmodelc) on the chosen compute units."""

    def __init__(self, path: Path, compute_unit: str):
        import coremltools as ct

        units = ct.ComputeUnit[compute_unit]
        if path.suffix == ".mlmodelc":
            self._model = ct.models.CompiledMLModel(str(path), compute_units=units)
            self.input_description = _description_from_compiled(path)
        else:
            self._model = ct.models.MLModel(str(path), compute_units=units)
            self.input_description = _description_from_spec(self._model.get_spec())

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, (_, dtype) in self.input_description.items()}
        return {name: np.asarray(value) for name, value in self._model.predict(cast).items()}


def load_model(path: Path, backend: str, compute_unit: str) -> Model:
    """Load one component; `backend` is "coreml" or "reference" (see `resolve_backend`)."""
    if compute_unit not in COMPUTE_UNITS:
        raise GenerationError(f"unknown compute unit {compute_unit!r}; choose from {', '.join(COMPUTE_UNITS)}")
    if backend == "reference" and path.suffix == ".mlmodelc":
        raise GenerationError(
            f"{path.name} is compiled, which only Core ML on macOS runs; for --backend reference use "
            "the .mlpackage files (coreml-convert writes them)"
        )
    try:
        if backend == "coreml":
            return CoreMLModel(path, compute_unit)
        from .executor import ReferenceModel

        return ReferenceModel(path)
    except GenerationError:
        raise
    except Exception as exc:  # loaders of foreign files fail in many ways; all mean the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GenerationError(f"cannot load {path} ({reason}); reconvert the package with coreml-convert") from None
