"""One model interface over two backends: Core ML on macOS, the reference executor everywhere.

A model has `input_description` and `output_description` (name -> (shape, dtype)) and
`predict(inputs) -> outputs`, keyed by the I/O contract's names; the pipeline never knows which backend runs it.

Core ML runs compiled models (`.mlmodelc`). Compiling a Unet package takes minutes, so the Core ML backend
compiles each `.mlpackage` once into `CompiledModelCache` (the user's cache folder, keyed by the package's
content and the OS version) and loads the compiled model from there on any compute units. Everything the
adapter calls of coremltools goes through one `CoreMLFunctions` value, the seam where the tests put a stand-in.

Two wrappers make other layouts look like one model: `ChunkedModel` runs a Unet split in two (Apple's
`UnetChunk1`/`UnetChunk2`), `ManagedModel` loads a model when it is first run and unloads it on `release`
(`--reduce-memory`).
"""
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .contract import TEXT_LENGTH
from .errors import GenerationError
from .integrity import content_hash
from .memory import release_memory

BACKENDS = ("auto", "coreml", "reference")
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
# Split-einsum attention is laid out for the Neural Engine; the original attention runs best on the GPU.
COMPUTE_UNIT_BY_ATTENTION = {
    "split_einsum": "CPU_AND_NE",
    "split_einsum_v2": "CPU_AND_NE",
    "original": "CPU_AND_GPU",
}
CACHE_ENV = "COREML_SD_CACHE"
logger = logging.getLogger("coreml_sd.runtime")
TensorDescription = dict[str, tuple[tuple[int, ...], np.dtype]]


class Model(Protocol):
    input_description: TensorDescription

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class CoreMLFunctions:
    """What the Core ML adapter calls of coremltools and the OS, as one replaceable value."""

    compiled_model: Callable[..., Any]  # CompiledMLModel(path, compute_units=...): has predict(dict) -> dict
    compile_model: Callable[[str, str], str]  # (.mlpackage, destination .mlmodelc) -> the compiled model's path
    compute_unit: Callable[[str], Any]  # a name from COMPUTE_UNITS -> coremltools.ComputeUnit
    os_version: str  # a compiled model is valid for the OS version that compiled it
    available: bool  # whether Core ML runs here at all


def coremltools_functions() -> CoreMLFunctions:
    import coremltools as ct
    from coremltools.models.utils import compile_model

    return CoreMLFunctions(ct.models.CompiledMLModel, compile_model, lambda name: ct.ComputeUnit[name],
                           platform.mac_ver()[0] or platform.release(), sys.platform == "darwin")


core_ml_functions: CoreMLFunctions | None = None  # None: coremltools' own; the tests put a stand-in here


def core_ml() -> CoreMLFunctions:
    global core_ml_functions
    if core_ml_functions is None:
        core_ml_functions = coremltools_functions()
    return core_ml_functions


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise GenerationError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "coreml" if sys.platform == "darwin" else "reference"
    if backend == "coreml" and not core_ml().available:
        raise GenerationError("the Core ML backend runs only on macOS; use --backend reference")
    return backend


def default_compute_unit(attention_implementation: str | None) -> str:
    return COMPUTE_UNIT_BY_ATTENTION.get(attention_implementation, "ALL")


def cache_root() -> Path:
    """Where compiled models are kept: $COREML_SD_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "coreml-sd" / "compiled"


class CompiledModelCache:
    """Each `.mlpackage` compiled once per OS version: `<root>/<name>-<content hash>-<OS version>.mlmodelc`.
    The compute units are chosen when a compiled model is loaded, so changing them never recompiles."""

    def __init__(self, root: Path, functions: CoreMLFunctions):
        self.root = root
        self.functions = functions

    def path(self, package: Path) -> Path:
        version = self.functions.os_version.replace(os.sep, "_")
        return self.root / f"{package.stem}-{content_hash(package)[:20]}-os{version}.mlmodelc"

    def compiled(self, package: Path) -> Path:
        """The compiled model for `package`, compiled now when the cache has none. A compilation is moved into
        place only when complete, so an interrupted one leaves nothing that a later load would take."""
        target = self.path(package)
        if target.is_dir():
            return target
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".compiling-", dir=self.root))
        except OSError as exc:
            raise GenerationError(f"cannot write compiled models to {self.root} ({exc.strerror or exc}); set "
                                  f"{CACHE_ENV} to a writable folder") from None
        logger.info("compiling %s for Core ML, once for this OS version (a Unet takes minutes); kept in %s",
                    package.name, self.root)
        try:
            compiled = Path(self.functions.compile_model(str(package), str(staging / target.name)))
            try:
                compiled.rename(target)
            except OSError:
                if not target.is_dir():  # another process that compiled the same package at once won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


# Core ML's multi-array data types by their names in the spec's enum and in compiled models' metadata.json.
_ARRAY_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "DOUBLE": np.float64, "INT32": np.int32}
_METADATA_DTYPES = {"Float16": np.float16, "Float32": np.float32, "Double": np.float64, "Int32": np.int32}


def _spec(path: Path):
    from coremltools.models.utils import load_spec

    return load_spec(str(path))


def _described_features(features) -> TensorDescription:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    described = {}
    for feature in features:
        array = feature.type.multiArrayType
        dtype = _ARRAY_DTYPES[ArrayFeatureType.ArrayDataType.Name(array.dataType)]
        described[feature.name] = (tuple(array.shape), np.dtype(dtype))
    return described


def _compiled_metadata(path: Path) -> dict:
    """A compiled model keeps no spec; its metadata.json (a list of one description) says what it takes."""
    return json.loads((path / "metadata.json").read_text())[0]


def _described_schema(schema: list[dict]) -> TensorDescription:
    """Compiled models' feature lists, shapes as text (e.g. "[2, 4, 64, 64]")."""
    return {entry["name"]: (tuple(json.loads(entry["shape"])), np.dtype(_METADATA_DTYPES[entry["dataType"]]))
            for entry in schema}


def describe_model(path: Path, function_name: str | None = None) -> tuple[TensorDescription, TensorDescription]:
    """A model file's inputs and outputs (of a multifunction model, those of function `function_name`, by default
    its default function's), read without loading its weights."""
    if path.suffix == ".mlmodelc":
        metadata = _compiled_metadata(path)
        functions = {entry.get("name"): entry for entry in metadata.get("functions", []) if isinstance(entry, dict)}
        metadata = functions.get(function_name, metadata)
        return _described_schema(metadata["inputSchema"]), _described_schema(metadata.get("outputSchema", []))
    description = _spec(path).description
    name = function_name or description.defaultFunctionName  # a multifunction model describes each function
    description = next((f for f in description.functions if f.name == name), description)
    return _described_features(description.input), _described_features(description.output)


def model_metadata(path: Path) -> dict[str, str]:
    """A model file's user-defined metadata (what `coremltools`' `user_defined_metadata` holds)."""
    if path.suffix == ".mlmodelc":
        return dict(_compiled_metadata(path).get("userDefinedMetadata", {}))
    return dict(_spec(path).description.metadata.userDefined)


def chained_description(first: tuple[TensorDescription, TensorDescription],
                        second: tuple[TensorDescription, TensorDescription]
                        ) -> tuple[TensorDescription, TensorDescription]:
    """Two chunks as one model: the first chunk's inputs and those of the second that the first does not
    produce; the second chunk's outputs."""
    (first_inputs, first_outputs), (second_inputs, second_outputs) = first, second
    inputs = {**first_inputs, **{name: d for name, d in second_inputs.items() if name not in first_outputs}}
    return inputs, second_outputs


class CoreMLModel:
    """A model file on the chosen compute units through Core ML: a `.mlmodelc` as it is, a `.mlpackage` through
    the compiled-model cache. Inputs are cast to the dtypes the model declares before they go to Core ML. Of a
    multifunction model, `function_name` chooses the function (default: the model's default function)."""

    def __init__(self, path: Path, compute_unit: str, functions: CoreMLFunctions | None = None,
                 cache: CompiledModelCache | None = None, function_name: str | None = None):
        functions = functions or core_ml()
        self.input_description, self.output_description = describe_model(path, function_name)
        if path.suffix == ".mlmodelc":
            self.compiled_path = path
        else:
            self.compiled_path = (cache or CompiledModelCache(cache_root(), functions)).compiled(path)
        self.compute_unit = compute_unit
        chosen = {"function_name": function_name} if function_name else {}
        self._model = functions.compiled_model(str(self.compiled_path),
                                               compute_units=functions.compute_unit(compute_unit),
                                               **chosen)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {name: np.ascontiguousarray(inputs[name], dtype=dtype)
                for name, (_, dtype) in self.input_description.items()}
        outputs = self._model.predict(cast)
        return {name: np.asarray(outputs[name]) for name in self.output_description}


class ChunkedModel:
    """A model split in two, run as one, as Apple's Swift package chains `UnetChunk1` and `UnetChunk2`: the second
    chunk takes the first one's outputs and the original inputs (the outputs winning where names clash)."""

    def __init__(self, first: Model, second: Model):
        self.first, self.second = first, second
        self.input_description, self.output_description = chained_description(
            (first.input_description, first.output_description), (second.input_description, second.output_description))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        passed_on = {**inputs, **self.first.predict({name: inputs[name] for name in self.first.input_description})}
        return self.second.predict({name: passed_on[name] for name in self.second.input_description})


class ManagedModel:
    """A component that is loaded when first run and unloaded by `release()` (until run again), as the Swift
    package's ManagedMLModel: its description comes from the model files, without loading them."""

    def __init__(self, files: tuple[Path, ...], load: Callable[[], Model], function_name: str | None = None):
        descriptions = [describe_model(path, function_name) for path in files]
        self.input_description, self.output_description = (
            descriptions[0] if len(descriptions) == 1 else chained_description(*descriptions))
        self._load = load
        self._model: Model | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._model is None:
            self._model = self._load()
        return self._model.predict(inputs)

    def release(self) -> None:
        if self._model is not None:
            self._model = None
            release_memory()


class PromptLengthFunctions:
    """A multifunction Unet's (or ControlNet's) functions for text conditioning of 1, 2, ... K 77-token chunks, run
    as one model: `predict` runs the function whose `encoder_hidden_states` are as long as the inputs' (each has
    fixed shapes; the description is the 1-chunk function's)."""

    def __init__(self, models: dict[int, Model], name: str):
        self.models, self.name = models, name
        self.input_description, self.output_description = models[1].input_description, models[1].output_description

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = inputs["encoder_hidden_states"].shape[-1] // TEXT_LENGTH
        if chunks not in self.models:
            raise GenerationError(f"{self.name} takes text conditioning of {', '.join(map(str, self.models))} "
                                  f"77-token chunks, not {chunks}: convert it with the package's --max-prompt-chunks")
        return self.models[chunks].predict(inputs)

    def release(self) -> None:
        for model in self.models.values():
            release(model)


def release(model: Model) -> None:
    """Unload `model` if it loads on demand (a ManagedModel, or functions that are); other models stay as they are."""
    if isinstance(model, (ManagedModel, PromptLengthFunctions)):
        model.release()


def _load_file(path: Path, backend: str, compute_unit: str, function_name: str | None = None) -> Model:
    if backend == "reference" and path.suffix == ".mlmodelc":
        raise GenerationError(
            f"{path.name} is compiled (.mlmodelc), which only Core ML on macOS runs, not the reference executor; "
            "use the .mlpackage files (coreml-convert writes them)"
        )
    try:
        if backend == "coreml":
            return CoreMLModel(path, compute_unit, function_name=function_name)
        from .executor import ReferenceModel

        return ReferenceModel(path, function_name=function_name)
    except GenerationError:
        raise
    except Exception as exc:  # loaders of foreign files fail in many ways; all mean the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GenerationError(f"cannot load {path} ({reason}); reconvert the package with coreml-convert") from None


def load_model(files: tuple[Path, ...], backend: str, compute_unit: str, function_name: str | None = None) -> Model:
    """Load one component from its model file or its two chunks; `backend` is "coreml" or "reference" (see
    `resolve_backend`); `function_name` chooses a function of multifunction model files (default: their own)."""
    if compute_unit not in COMPUTE_UNITS:
        raise GenerationError(f"unknown compute unit {compute_unit!r}; choose from {', '.join(COMPUTE_UNITS)}")
    models = [_load_file(path, backend, compute_unit, function_name) for path in files]
    return models[0] if len(models) == 1 else ChunkedModel(*models)
