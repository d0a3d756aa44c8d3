"""ReferenceModel: a saved ML Program package, run with PyTorch behind Core ML's predict() contract."""
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil.frontend.milproto.load import load as load_mil_program
from coremltools.proto import FeatureTypes_pb2

from .blobs import reading_weights
from .classifier import detach_classifier
from .ops.state import StateCell
from .program import CompiledFunction

TensorDescription = tuple[tuple[int, ...], np.dtype]


@dataclass(frozen=True)
class InputShapes:
    """The shapes an input accepts, as its feature declares them: the default shape alone, one of
    `enumerated` (EnumeratedShapes), or any shape within `ranges` (RangeDim: (lower, upper) per
    dim, upper None when unbounded)."""

    default: tuple[int, ...]
    enumerated: tuple[tuple[int, ...], ...] = ()
    ranges: tuple[tuple[int, int | None], ...] = ()

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.enumerated:
            return shape in self.enumerated
        if self.ranges:
            return len(shape) == len(self.ranges) and all(
                lower <= size and (upper is None or size <= upper) for size, (lower, upper) in zip(shape, self.ranges)
            )
        return shape == self.default

    def __str__(self) -> str:
        if self.enumerated:
            return " or ".join(str(shape) for shape in self.enumerated)
        if self.ranges:
            dims = [str(lower) if lower == upper else f"{lower}..{'' if upper is None else upper}"
                    for lower, upper in self.ranges]
            return f"({', '.join(dims)})"
        return str(self.default)


_ARRAY_DTYPES = {
    "FLOAT16": np.dtype(np.float16),
    "FLOAT32": np.dtype(np.float32),
    "DOUBLE": np.dtype(np.float64),
    "INT32": np.dtype(np.int32),
    "INT8": np.dtype(np.int8),
}
_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int8): torch.int8,
}


def default_device() -> torch.device:
    """CUDA or MPS when PyTorch sees one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class ReferenceModel:
    """Loads `path` (an ML Program `.mlpackage`) and evaluates it op by op.

    `precision="float16"` reproduces Core ML's float16 numerics (see the package docstring);
    `precision="float32"` holds every value in float32, to tell rounding effects from conversion
    errors. `device` defaults to `default_device()`.

    A classifier (converted with a `ClassifierConfig`) also predicts, as Core ML does, its class
    label and a dictionary of class probabilities; `classifier` names them, `output_description`
    describes the multi-array outputs alone.

    A multifunction package (coremltools' `save_multifunction`) runs the function `function_name`
    names, by default its default function, as Core ML's `function_name` argument chooses.
    """

    def __init__(self, path: str | Path, precision: str = "float16", device: str | torch.device | None = None,
                 function_name: str | None = None):
        self.path = Path(path)
        if not (self.path / "Manifest.json").is_file():
            raise FileNotFoundError(f"{self.path} is not an .mlpackage (no Manifest.json in it)")
        self.precision = precision
        self.device = torch.device(device) if device is not None else default_device()
        mlmodel = ct.models.MLModel(str(self.path), skip_model_load=True)
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise ValueError(f"{self.path.name} is a {spec.WhichOneof('Type')} model; only ML Programs can be run")
        with reading_weights():
            program = load_mil_program(spec, spec.specificationVersion, mlmodel.weights_dir or "")
        self.function_name = function_name or program.default_function_name
        if self.function_name not in program.functions:
            raise ValueError(f"{self.path.name} has no function {self.function_name!r}; it has "
                             f"{', '.join(sorted(program.functions))}")
        function = program.functions[self.function_name]
        description = _function_description(spec.description, self.function_name)
        self.classifier = detach_classifier(function)
        classifier_outputs = self.classifier.outputs if self.classifier else ()
        self.input_description = _describe(description.input, self.path.name)
        self.output_description = _describe(
            [feature for feature in description.output if feature.name not in classifier_outputs], self.path.name
        )
        self.input_shapes = {feature.name: _input_shapes(feature.type.multiArrayType) for feature in description.input}
        self.state_description = {
            feature.name: _array_description(feature.type.stateType.arrayType) for feature in description.state
        }
        self._function = CompiledFunction(function, precision, self.device, source=self.path.name)
        missing = set(self.output_description) - {name for name, _ in self._function.output_slots}
        if missing:
            raise ValueError(f"{self.path.name}: outputs {sorted(missing)} of the description are not produced by its "
                             "program")

    def make_state(self) -> "ModelState":
        """A new state for a stateful model (iOS 18 states), every tensor zero, for `predict` to read
        and update; one per independent sequence of predictions, as Core ML's make_state()."""
        return ModelState(
            {
                name: StateCell(torch.zeros(shape, dtype=_TORCH_DTYPES[dtype], device=self.device))
                for name, (shape, dtype) in self.state_description.items()
            }
        )

    def predict(self, inputs: dict[str, np.ndarray], state: "ModelState | None" = None) -> dict[str, object]:
        """Run the model on NumPy inputs named, shaped and typed as `input_description` says;
        returns the outputs as NumPy arrays in the dtypes `output_description` declares, and a
        classifier's label (str or int) and {class: probability} dictionary. A stateful model
        reads and updates `state` (from `make_state`)."""
        self._check_inputs(inputs)
        if bool(self.state_description) != (state is not None):
            raise ValueError(
                f"{self.path.name} has states ({', '.join(self.state_description)}): pass state=model.make_state()"
                if self.state_description
                else f"{self.path.name} has no states; call predict without state"
            )
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device, dtype)
            for name, (_, dtype) in self._function.input_slots.items()
        }
        with torch.inference_mode():
            outputs = self._function(tensors, state.cells if state is not None else None)
        results = {
            name: outputs[name].to(_TORCH_DTYPES[dtype]).cpu().numpy()
            for name, (_, dtype) in self.output_description.items()
        }
        return results | (self.classifier(outputs) if self.classifier else {})

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        expected = ", ".join(f"{name} {_format(d)}" for name, d in self.input_description.items())
        unknown = sorted(set(inputs) - set(self.input_description))
        if unknown:
            raise ValueError(f"{self.path.name} has no input named {unknown[0]!r}; it takes {expected}")
        for name, (shape, dtype) in self.input_description.items():
            if name not in inputs:
                raise ValueError(f"{self.path.name}: input {name!r} is missing; it takes {expected}")
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{self.path.name}: input {name!r} must be a numpy array, not {type(value).__name__}")
            if not self.input_shapes[name].accepts(value.shape):
                raise ValueError(f"{self.path.name}: input {name!r} has shape {value.shape}; expected "
                                 f"{self.input_shapes[name]}")
            if value.dtype != dtype:
                raise ValueError(
                    f"{self.path.name}: input {name!r} has dtype {value.dtype}; expected {dtype} "
                    f"(convert with .astype(np.{dtype}))"
                )


@dataclass(frozen=True)
class ModelState:
    """The states of one stateful model's predictions, by name."""

    cells: dict[str, StateCell]

    def read(self, name: str) -> np.ndarray:
        return self.cells[name].value.cpu().numpy()


def _function_description(description, function_name: str):
    """The features of one function: a multifunction model describes each in `functions`, a single-function
    model its one function in the description itself."""
    for function in description.functions:
        if function.name == function_name:
            return function
    return description


def _format(description: TensorDescription) -> str:
    shape, dtype = description
    return f"{dtype}{list(shape)}"


def _input_shapes(array) -> InputShapes:
    default = tuple(int(d) for d in array.shape)
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "enumeratedShapes":
        return InputShapes(default, enumerated=tuple(tuple(int(d) for d in s.shape)
                                                     for s in array.enumeratedShapes.shapes))
    if flexibility == "shapeRange":
        ranges = tuple((int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                       for r in array.shapeRange.sizeRanges)
        return InputShapes(default, ranges=ranges)
    return InputShapes(default)


def _describe(features, package: str) -> dict[str, TensorDescription]:
    """name -> (shape, numpy dtype) of the multi-array features of a model description."""
    described = {}
    for feature in features:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            raise ValueError(f"{package}: feature {feature.name!r} is not a multi-array; only multi-arrays are "
                             "supported")
        described[feature.name] = _array_description(feature.type.multiArrayType)
    return described


def _array_description(array) -> TensorDescription:
    dtype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    return tuple(int(d) for d in array.shape), _ARRAY_DTYPES[dtype_name]
