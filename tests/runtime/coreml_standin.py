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
  model holds the package itself and a `metadata.json` in the layout of a compiled model's (COMPILED_METADATA, from
  Apple's published SD v1.5 Unet), filled from the package's spec as coremltools reads it, so that the adapter's
  reading of compiled models runs against Core ML's format, not against the project's own writer.
"""
import json
import shutil
from pathlib import Path

import coremltools as ct
import numpy as np

from coreml_sd.runtime.backends import CoreMLFunctions
from coreml_sd.runtime.executor import ReferenceModel

SOURCE = "model.mlpackage"  # where the fake compiler keeps the package inside a compiled model
CORE_ML_ARRAY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32))


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


# The metadata.json of a compiled model, as in the `split_einsum/compiled/Unet.mlmodelc` that Apple publishes for
# SD v1.5 (coreml-stable-diffusion-v1-5, coremltools 7): a list of one description; sizes and types as text; every
# field the adapter skips kept, so that it is seen skipping them. Descriptions and the op histogram are shortened.
COMPILED_METADATA = [{
    "metadataOutputVersion": "3.0",
    "storagePrecision": "Float16",
    "outputSchema": [{
        "hasShapeFlexibility": "0", "isOptional": "0", "dataType": "Float16",
        "formattedType": "MultiArray (Float16 2 × 4 × 64 × 64)",
        "shortDescription": "Same shape and dtype as the `sample` input. The predicted noise to facilitate the reverse "
                            "diffusion (denoising) process",
        "shape": "[2, 4, 64, 64]", "name": "noise_pred", "type": "MultiArray",
    }],
    "modelParameters": [],
    "specificationVersion": 7,
    "mlProgramOperationTypeHistogram": {"Ios16.einsum": 512, "Ios16.softmax": 256, "Ios16.conv": 282},
    "computePrecision": "Mixed (Float16, Int32)",
    "isUpdatable": "0",
    "availability": {"macOS": "13.0", "tvOS": "16.0", "visionOS": "1.0", "watchOS": "9.0", "iOS": "16.0",
                     "macCatalyst": "16.0"},
    "modelType": {"name": "MLModelType_mlProgram"},
    "inputSchema": [
        {"hasShapeFlexibility": "0", "isOptional": "0", "dataType": "Float16",
         "formattedType": "MultiArray (Float16 2 × 4 × 64 × 64)",
         "shortDescription": "The low resolution latent feature maps being denoised through reverse diffusion",
         "shape": "[2, 4, 64, 64]", "name": "sample", "type": "MultiArray"},
        {"hasShapeFlexibility": "0", "isOptional": "0", "dataType": "Float16",
         "formattedType": "MultiArray (Float16 2)",
         "shortDescription": "A value emitted by the associated scheduler object to condition the model on a given "
                             "noise schedule",
         "shape": "[2]", "name": "timestep", "type": "MultiArray"},
        {"hasShapeFlexibility": "0", "isOptional": "0", "dataType": "Float16",
         "formattedType": "MultiArray (Float16 2 × 768 × 1 × 77)",
         "shortDescription": "Output embeddings from the associated text_encoder model to condition to generated "
                             "image on text.",
         "shape": "[2, 768, 1, 77]", "name": "encoder_hidden_states", "type": "MultiArray"},
    ],
    "userDefinedMetadata": {"com.github.apple.coremltools.version": "7.0", "com.github.apple.coremltools.source":
                            "torch==2.0.1", "com.github.apple.ml-stable-diffusion.version": "1.0.0"},
    "generatedClassName": "Stable_Diffusion_version_runwayml_stable_diffusion_v1_5_unet",
    "method": "predict",
}]
# coremltools' enum names -> metadata.json's
SCHEMA_TYPES = {"FLOAT16": "Float16", "FLOAT32": "Float32", "DOUBLE": "Double", "INT32": "Int32"}


def _schema(features, template: dict) -> list[dict]:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    entries = []
    for feature in features:
        array = feature.type.multiArrayType
        data_type = SCHEMA_TYPES[ArrayFeatureType.ArrayDataType.Name(array.dataType)]
        shape = list(array.shape)
        entries.append(dict(template, name=feature.name, dataType=data_type, shape=json.dumps(shape),
                            formattedType=f"MultiArray ({data_type} {' × '.join(map(str, shape))})",
                            shortDescription=feature.shortDescription))
    return entries


def compiled_metadata(package: Path) -> list[dict]:
    """COMPILED_METADATA's layout with the package's inputs, outputs and user metadata, read by coremltools."""
    spec = ct.utils.load_spec(str(package))
    template = COMPILED_METADATA[0]
    return [dict(template, inputSchema=_schema(spec.description.input, template["inputSchema"][0]),
                 outputSchema=_schema(spec.description.output, template["outputSchema"][0]),
                 userDefinedMetadata=dict(spec.description.metadata.userDefined),
                 generatedClassName=package.stem)]


class Compiler:
    """`compile_model` that counts its compilations."""

    def __init__(self):
        self.compiled: list[Path] = []

    def __call__(self, package: str, destination: str) -> str:
        self.compiled.append(Path(package))
        target = Path(destination)
        target.mkdir(parents=True)
        shutil.copytree(package, target / SOURCE)
        metadata = compiled_metadata(Path(package))
        (target / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        return str(target)


def core_ml_standin(compiler: Compiler, os_version: str = "14.5") -> CoreMLFunctions:
    return CoreMLFunctions(compiled_model=CompiledMLModel, compile_model=compiler,
                           compute_unit=lambda name: ct.ComputeUnit[name], os_version=os_version, available=True)
