"""A Unet package split in two (`--chunk-unet`), for devices that cannot load a ~1.7 GB model at once.

Apple's Swift package runs `UnetChunk1` on the Unet's inputs, then `UnetChunk2` on chunk 1's outputs merged
with the same inputs, and takes chunk 2's output as the noise prediction. So chunk 1 computes the program up to
a cut, its outputs are every value that crosses the cut (activations and skip connections, widened to float32
as coremltools' `bisect_model` widens them), and chunk 2 computes the rest from them and the inputs it uses.

Where to cut. coremltools' `bisect_model` counts weights in the order their `const` ops are declared, but a
converted program declares many weights long before their use, so for our programs its cut leaves chunk 1
without weights. Here each weight counts at the ops that use it (through any `constexpr_*` that expands a
palettized one), and the cut is the op that best balances the two chunks' weights; among cuts within
`BALANCE_TOLERANCE` of the best, the one with the fewest bytes crossing it wins. The two programs themselves are
built by coremltools' own chunk builders, the ones `bisect_model` uses.
"""
import contextlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import types
from coremltools.models import utils as ct_utils

from coreml_sd.runtime.backends import load_model
from coreml_sd.runtime.contract import (
    PACKAGE_SUFFIX,
    ComponentSpec,
    TensorSpec,
    chunk_contract_problems,
    chunk_names,
)
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.memory import release_memory

from .errors import ConversionError
from .package_folder import PackageFolder

BALANCE_TOLERANCE = 0.02  # of the total weights: cuts this close to the best balance compete on crossing bytes
MAX_CHUNK_FRACTION = 0.55  # of the whole model's weights: half, and 5% for where ops allow the cut
CHUNK_PSNR_THRESHOLD_DB = 60.0  # chunk 1 -> chunk 2 against the whole model, both through the executor
WEIGHTS_FILE = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
_FEATURE_DTYPES = {
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "float16",
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32",
}


@dataclass(frozen=True)
class Cut:
    op_index: int  # the last op of chunk 1, in program order
    chunk_weight_bytes: tuple[int, int]
    crossing_bytes: int


def _load(path: Path):
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, model.weights_dir)
    block = program.functions["main"]
    block.operations = list(block.operations)  # coremltools' chunk builders index into a list
    return program, spec


def _weight_bytes(op) -> int:
    value = op.outputs[0].val if op.op_type == "const" else None
    return value.nbytes if isinstance(value, np.ndarray) else 0


def _users(var, position: dict[int, int]) -> list[int]:
    """Positions of the ops that compute with `var`, looking through `constexpr_*` ops that expand it."""
    found = []
    for child in var.child_ops:
        if child.op_type.startswith("const"):
            for output in child.outputs:
                found += _users(output, position)
        else:
            found.append(position[id(child)])
    return found


def _var_bytes(var) -> int:
    if var.shape is None or any(not isinstance(d, int) for d in var.shape):
        return 0
    return int(np.prod(var.shape)) * max(types.type_mapping.nptype_from_builtin(var.dtype)().itemsize, 4)


def find_cut(program) -> Cut:
    """The op after which to cut: see the module's docstring."""
    operations = program.functions["main"].operations
    count = len(operations)
    position = {id(op): index for index, op in enumerate(operations)}
    in_first = np.zeros(count + 1, dtype=np.int64)  # difference arrays over the cut's position
    in_second = np.zeros(count + 1, dtype=np.int64)
    crossing = np.zeros(count + 1, dtype=np.int64)
    total = 0
    for index, op in enumerate(operations):
        size = _weight_bytes(op)
        if size:
            users = _users(op.outputs[0], position)
            if users:
                total += size
                in_first[min(users)] += size  # chunk 1 holds it when its first user is at or before the cut
                in_second[0] += size  # chunk 2 holds it while its last user is after the cut
                in_second[max(users)] -= size
        elif not op.op_type.startswith("const"):
            for var in op.outputs:
                users = [position[id(child)] for child in var.child_ops]
                if users and max(users) > index:
                    crossing[index] += _var_bytes(var)
                    crossing[max(users)] -= _var_bytes(var)
    first, second, crossing = np.cumsum(in_first)[:count], np.cumsum(in_second)[:count], np.cumsum(crossing)[:count]
    cuttable = np.array([not op.op_type.startswith("const") for op in operations])
    cuttable[-1] = False  # chunk 2 must compute something
    if not cuttable.any() or total == 0:
        raise ConversionError("the Unet's program has no weights to split between chunks")
    larger = np.where(cuttable, np.maximum(first, second), np.iinfo(np.int64).max)
    candidates = np.flatnonzero(larger <= larger.min() + BALANCE_TOLERANCE * total)
    best = int(candidates[np.argmin(crossing[candidates])])
    return Cut(best, (int(first[best]), int(second[best])), int(crossing[best]))


def package_spec(description, name: str) -> ComponentSpec:
    """The contract a saved model declares (its model description's features), under `name`."""
    def tensors(features):
        return tuple(TensorSpec(f.name, tuple(int(d) for d in f.type.multiArrayType.shape),
                                _FEATURE_DTYPES[f.type.multiArrayType.dataType]) for f in features)

    return ComponentSpec(name, tensors(description.input), tensors(description.output))


def split_package(package: Path, folder: Path, component: str,
                  describe: Callable[[ct.models.MLModel, ComponentSpec], None]
                  ) -> tuple[Cut, tuple[ComponentSpec, ...]]:
    """Write `package`'s program as `<component>Chunk1/2.mlpackage` in `folder`, chained as the Swift package
    chains them, each described by `describe(model, its contract)`; returns the cut and the chunks' contracts."""
    program, spec = _load(package)
    cut = find_cut(program)
    chunk_programs = (
        ct_utils._make_first_chunk_prog(program, cut.op_index),
        ct_utils._make_second_chunk_prog(_load(package)[0], cut.op_index),
    )
    first_block = chunk_programs[0].functions["main"]
    first_block.set_outputs(sorted(first_block.outputs, key=lambda var: var.name))  # the same order every time
    del program
    target = ct.target(spec.specificationVersion)
    specs = []
    for chunk_program, name in zip(chunk_programs, chunk_names(component)):
        # The program is already optimized and typed float16 where it computes so: no passes, no casts.
        with contextlib.redirect_stderr(io.StringIO()):  # coremltools' progress bars
            model = ct.convert(chunk_program, convert_to="mlprogram", minimum_deployment_target=target,
                               compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                               skip_model_load=True)
        specs.append(package_spec(model.get_spec().description, name))
        describe(model, specs[-1])
        model.save(str(folder / (name + PACKAGE_SUFFIX)))
        del model
        release_memory()
    return cut, tuple(specs)


def weight_bytes(package: Path) -> int:
    weights = Path(package) / WEIGHTS_FILE
    return weights.stat().st_size if weights.is_file() else 0


def chunked_reference_model(chunks: tuple[Path, ...]):
    """The chunks run through the reference executor as the runtime (and the Swift package) chains them."""
    return load_model(chunks, "reference", "CPU_ONLY")


def check_chunks(whole: Path, whole_spec: ComponentSpec, chunks: tuple[Path, ...],
                 chunk_specs: tuple[ComponentSpec, ...],
                 inputs: dict[str, np.ndarray] | None) -> dict:
    """The chunks follow the chaining contract and hold at most `MAX_CHUNK_FRACTION` of the weights each; with
    `inputs`, chunk 1 -> chunk 2 through the executor gives the whole model's outputs (PSNR, worst output)."""
    problems = chunk_contract_problems(whole_spec, *chunk_specs)
    if problems:
        raise ConversionError(f"{whole_spec.name}: the chunks break the Swift package's contract: {problems[0]}")
    total = weight_bytes(whole)
    sizes = [weight_bytes(chunk) for chunk in chunks]
    result = {"weight_bytes": sizes, "whole_weight_bytes": total,
              "weight_fractions": [round(size / total, 4) for size in sizes]}
    if max(sizes) > MAX_CHUNK_FRACTION * total:
        raise ConversionError(f"{whole_spec.name}: a chunk holds {max(sizes) / total:.0%} of the weights, more than "
                              f"{MAX_CHUNK_FRACTION:.0%}; convert without --chunk-unet")
    if inputs is not None:
        model = ReferenceModel(whole)
        expected = model.predict(inputs)
        del model
        release_memory()
        actual = chunked_reference_model(chunks).predict(inputs)
        result["psnr_db"] = round(min(psnr(expected[name], actual[name]) for name in expected), 2)
        if not result["psnr_db"] >= CHUNK_PSNR_THRESHOLD_DB:
            raise ConversionError(f"{whole_spec.name}: chunk 1 -> chunk 2 gives PSNR {result['psnr_db']:.1f} dB "
                                  f"against the whole model, below {CHUNK_PSNR_THRESHOLD_DB:.0f} dB")
    return result


def install_chunks(folder: PackageFolder, staged: Path, spec: ComponentSpec, entry: dict,
                   describe: Callable[[ct.models.MLModel, ComponentSpec], None], inputs: dict[str, np.ndarray] | None,
                   timed: Callable[[str], contextlib.AbstractContextManager]) -> None:
    """Split the staged (and validated) package `spec.name` into its chunks beside it, check them against it, and
    install them in `folder` in its place, each entry naming the model it is a chunk of; `timed(stage)` times a
    stage."""
    with timed("chunk"):
        cut, chunk_specs = split_package(staged, staged.parent, spec.name, describe)
    chunks = tuple(staged.parent / chunk_spec.file_name for chunk_spec in chunk_specs)
    with timed("check"):
        checked = check_chunks(staged, spec, chunks, chunk_specs, inputs)
    checked.update(cut_after_op=cut.op_index, crossing_bytes=cut.crossing_bytes)
    print(f"{spec.name:<11} chunks of {', '.join(f'{size / 2**20:.1f}' for size in checked['weight_bytes'])} MiB "
          f"of weights" + (f", PSNR {checked['psnr_db']:.1f} dB against the whole model" if inputs else ""),
          file=sys.stderr)
    for chunk_spec, chunk in zip(chunk_specs, chunks):
        folder.install(chunk, chunk_spec.name, dict(entry, **chunk_spec.to_json(), chunk_of=spec.name,
                                                    chunk_validation=checked))
