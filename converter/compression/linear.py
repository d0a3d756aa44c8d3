"""Linear weight quantization (`--quantize-linear int8|int4[:BLOCK]`): each large weight of the TextEncoder and Unet
as signed integers times a float16 scale, symmetric around zero, per output channel or per block of input channels
(`constexpr_affine_dequantize`, iOS 16, for int8 per channel; `constexpr_blockwise_shift_scale`, iOS 18, for int4
or blocks).

As with palettes (palettize.py), the weights are quantized in PyTorch before export, so validation compares the
package with the original carrying the same quantized weights; coremltools' linear quantizer then finds exactly
those integers again in the program (each channel's or block's largest weight sets the scale, so it maps to the
largest integer, and every other weight lands within float16 rounding of an integer step)."""
import dataclasses
import gc

import numpy as np
import torch
from coremltools.converters.mil.mil.passes.pass_pipeline import (
    PassPipeline,
    PassPipelineManager,
)
from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

from . import LinearQuantization
from .palettize import WEIGHT_THRESHOLD, _weight_groups, palettizable


def block_size(shape: tuple[int, ...], quantization: LinearQuantization) -> int | None:
    """The block of input channels a weight of `shape` is quantized by: None (per output channel) when it has no
    blocks or its input channels do not divide into them."""
    block = quantization.block
    return block if block and len(shape) > 1 and shape[1] % block == 0 and shape[1] > block else None


def quantized(weight: np.ndarray, quantization: LinearQuantization) -> np.ndarray:
    """`weight` (Cout, Cin, ...) snapped to its integer grid, as float64."""
    values = weight.astype(np.float64)
    limit = (1 << (quantization.bits - 1)) - 1  # symmetric: int8 in [-127, 127], int4 in [-7, 7]
    block = block_size(weight.shape, quantization)
    # (Cout, blocks, elements of a block): a block of a convolution spans its input channels' whole kernels.
    grouped = values.reshape(weight.shape[0], weight.shape[1] // block if block else 1, -1)
    largest = np.abs(grouped).max(axis=2, keepdims=True)
    scale = np.where(largest > 0, largest / limit, 1.0)
    return (np.clip(np.round(grouped / scale), -limit, limit) * scale).reshape(weight.shape)


@torch.no_grad()
def quantize_module(module: torch.nn.Module, quantization: LinearQuantization) -> int:
    """Replace, in place, every large Linear and Conv2d weight of `module` by its quantized values (in the weight's
    own dtype, from its float16 values); the number of parameters quantized."""
    count = 0
    for layer in filter(palettizable, module.modules()):
        weight = layer.weight
        values = weight.detach().cpu().numpy().astype(np.float16)
        weight.copy_(torch.from_numpy(quantized(values, quantization)).to(weight.dtype))
        count += weight.numel()
    return count


def quantize_program(program, quantization: LinearQuantization) -> None:
    """Store every convolution and linear weight of a MIL program (quantized in PyTorch) as integers and scales,
    group after group of weights, as palettize_program does and for the same reason."""
    per_channel = OpLinearQuantizerConfig(mode="linear_symmetric", dtype=quantization.dtype,
                                          granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD)
    for group in _weight_groups(program):
        shapes = {op.name: op.outputs[0].shape for function in program.functions.values()
                  for op in function.operations if op.name in set(group)}
        configs = {}
        for name, shape in shapes.items():
            block = block_size(shape, quantization)
            configs[name] = per_channel if block is None else OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=quantization.dtype, granularity="per_block",
                block_size=[1, block] + [0] * (len(shape) - 2), weight_threshold=WEIGHT_THRESHOLD)
        pipeline = PassPipeline.EMPTY
        pipeline.append_pass("compression::linear_quantize_weights")
        pipeline.set_options("compression::linear_quantize_weights",
                             {"config": OptimizationConfig(op_name_configs=configs)})
        PassPipelineManager.apply_pipeline(program, pipeline)
        gc.collect()


def quantize_parts(parts, quantization: LinearQuantization) -> int:
    """quantize_module on each module a component was loaded with (a `sources.ModelParts`)."""
    modules = [getattr(parts, field.name) for field in dataclasses.fields(parts)]
    return sum(quantize_module(module, quantization) for module in modules if module is not None)
