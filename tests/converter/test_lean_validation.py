"""Validation within the memory a conversion takes: the float32 reference hands each layer's file-mapped weights
back after the layer runs, and the executor reads a package's weights without mapping the weight file. Both must
leave every figure as it was: the same reference outputs, bit for bit, and the same weights."""
import gc
import os

import numpy as np
import pytest
import torch
from coremltools.converters.mil.frontend.milproto.load import load as load_mil_program
from coremltools.models import MLModel
from diffusers import UNet2DConditionModel

from coreml_sd.converter.conversion.paging import page_out_after_use
from coreml_sd.converter.conversion.validate import reference_outputs, validation_inputs
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import TEXT_WIDTH
from coreml_sd.converter.sources import ModelParts
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.executor.blobs import reading_weights


def constants(package, reader=None) -> list[np.ndarray]:
    """Every const of the package's program in program order, as coremltools' MIL loader reads it (with `reader`
    if given); the loader numbers the names of a palettized program's consts anew on each load."""
    mlmodel = MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    if reader is None:
        program = load_mil_program(spec, spec.specificationVersion, mlmodel.weights_dir)
    else:
        with reader():
            program = load_mil_program(spec, spec.specificationVersion, mlmodel.weights_dir)
    function = program.functions[program.default_function_name]
    return [np.asarray(op.outputs[0].val) for op in function.operations if op.op_type == "const"]


@pytest.mark.parametrize("package", ["Unet", "TextEncoder", "palettized Unet"])
def test_weights_read_without_mapping_equal_coremltools_reads(tiny_packages, tiny_palettized_package, package):
    path = (tiny_palettized_package / "Unet.mlpackage" if package == "palettized Unet"
            else tiny_packages("split_einsum") / f"{package}.mlpackage")
    expected, actual = constants(path), constants(path, reading_weights)
    assert len(expected) == len(actual)
    assert sum(value.size > 1000 for value in expected) > 10  # weights (a palettized model's palettes and indices)
    for index, (value, read) in enumerate(zip(expected, actual)):
        assert value.dtype == read.dtype and value.shape == read.shape, index
        assert value.tobytes() == read.tobytes(), index


def resident_bytes(path) -> int:
    """How much of the file at `path` this process holds in memory through its mappings (smaps' Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@torch.no_grad()
def test_reference_hands_back_its_weights_and_computes_the_same(tiny_pipeline, tmp_path):
    """A float32 safetensors Unet, as diffusers maps it: with the pages handed back after each layer, the outputs
    are bit-identical, and after the run the process holds a small part of the weight file, not all of it."""
    tiny_pipeline.unet.save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    with open(weights, "rb+") as file:
        os.fsync(file.fileno())  # a model on disk, not pages just written: the kernel hands back clean pages only
    component = SD.component("Unet")
    spec = SD.spec("Unet", ModelDimensions(TEXT_WIDTH, 128, 128, unet_batch_size=2, clip_skip_layers=2))
    inputs = validation_inputs(spec, seed=0, latent_scaling_factor=0.18215)

    def outputs(handing_back: bool) -> tuple[dict[str, np.ndarray], int]:
        parts = ModelParts(unet=UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.float32))
        hooks = page_out_after_use(parts.unet) if handing_back else []
        assert len(hooks) > 20 or not handing_back  # the layers whose weights are mapped from the file
        result = reference_outputs(parts, component, spec, inputs), resident_bytes(weights)
        del parts, hooks
        gc.collect()  # the mapping goes with the module: the next run maps the file alone
        return result

    actual, resident_with = outputs(handing_back=True)
    expected, resident_without = outputs(handing_back=False)
    for name in expected:
        assert expected[name].tobytes() == actual[name].tobytes(), name
    size = weights.stat().st_size
    assert resident_without > 0.9 * size  # every weight was read: all of the file is held
    # measured 0.32: the tiny model's small tensors share pages, and a page comes back when a later layer reads a
    # neighbour (the full-size SD Unet's reference held 0.1-0.2 GiB of its 3.2 GiB file)
    assert resident_with < 0.5 * size, (resident_with, size)
