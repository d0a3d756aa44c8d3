"""Weight palettization (`--quantize-nbits N`): each large weight of the TextEncoder and Unet is
stored as a palette of 2^N float16 values plus an N-bit index per element, which Core ML expands
when it loads the model (`constexpr_lut_to_dense`, macOS 13 / iOS 16). 6 bits make the Unet's
weights 0.75 bytes per parameter instead of 2.

A weight's palette is a weighted one-dimensional k-means of its float16 values. It is applied to the
PyTorch module before export, for two reasons:
* the converted program's weights then take at most 2^N distinct values each, and storing them as
  palette + indices is lossless;
* validation can compare the package with the original module carrying the same palettized
  weights in float32, so the PSNR gate keeps meaning "converted correctly", while what quantization
  itself costs is measured, and recorded, against the unmodified original.

The VAE is left in float16: it is small, and its errors land directly in the image's pixels.
"""
import dataclasses
import gc

import numpy as np
import torch
from coremltools.converters.mil.mil.passes.pass_pipeline import (
    PassPipeline,
    PassPipelineManager,
)
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig

from . import NBITS_CHOICES

WEIGHT_THRESHOLD = 2048  # smaller weights (biases, norms) stay float16, as coremltools' default
MAX_ITERATIONS = 1000
DENSITY_BINS = 4096
FLOAT16_CODES = 1 << 16
GROUP_BYTES = 128 << 20  # float16 weights palettized per pass over the program


def _distinct_float16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct float16 values of `values` (ascending, as float64), how often each occurs, and
    for each element the position of its value among them. A histogram over the 65536 float16 bit
    patterns: linear time, where sorting the elements would not be."""
    codes = np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint16)
    counts = np.bincount(codes, minlength=FLOAT16_CODES)
    present = np.flatnonzero(counts)
    distinct = present.astype(np.uint16).view(np.float16).astype(np.float64)
    if not np.isfinite(distinct).all():
        raise ValueError("a weight holds inf or NaN")
    order = np.argsort(distinct, kind="stable")
    position_of_code = np.zeros(FLOAT16_CODES, dtype=np.uint16)  # at most 65536 distinct values
    position_of_code[present[order]] = np.arange(len(order))
    return distinct[order], counts[present[order]], position_of_code[codes]


def weighted_kmeans(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Lloyd's k-means of ascending distinct `values` occurring `weights` times each: ascending
    centroids (fewer than k where clusters empty out). In one dimension every cluster is a run of
    consecutive values, so an iteration costs O(k log n) with prefix sums. It starts where an optimal
    quantizer puts its levels when they are many, at equal steps of the cumulative cube root of the
    density (Panter and Dite), which leaves few iterations to do and avoids the poor local optima
    that starting from quantiles converges to (on a 921k-element Gaussian weight, 0.3 dB worse at
    6 bits and 4.4 dB at 8)."""
    edges = np.linspace(values[0], values[-1], DENSITY_BINS + 1)
    density, _ = np.histogram(values, bins=edges, weights=weights)
    levels = np.cumsum(np.cbrt(density))
    bins = np.searchsorted(levels, (np.arange(k) + 0.5) / k * levels[-1])
    centroids = np.unique((edges[bins] + edges[bins + 1]) / 2)
    total_weight = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    total_moment = np.concatenate([[0.0], np.cumsum(weights * values)])
    for _ in range(MAX_ITERATIONS):
        edges = np.concatenate([[0], np.searchsorted(values, (centroids[1:] + centroids[:-1]) / 2), [len(values)]])
        mass = total_weight[edges[1:]] - total_weight[edges[:-1]]
        moment = total_moment[edges[1:]] - total_moment[edges[:-1]]
        updated = moment[mass > 0] / mass[mass > 0]
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def palette(weight: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(ascending centroids as float64, each element's centroid index as uint8) of `weight`'s float16
    values; weights of at most 2^nbits distinct values are represented exactly."""
    distinct, counts, position = _distinct_float16(weight)
    k = 1 << nbits
    if len(distinct) <= k:
        return distinct, position.astype(np.uint8)
    centroids = weighted_kmeans(distinct, counts, k)
    cluster_of_distinct = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, distinct, side="right")
    return centroids, cluster_of_distinct.astype(np.uint8)[position]


def centroids_by_bits(weight: np.ndarray, bits) -> dict[int, np.ndarray]:
    """palette()'s centroids of `weight` at each of `bits`, its float16 values counted once."""
    distinct, counts, _ = _distinct_float16(weight)
    return {nbits: distinct if len(distinct) <= 1 << nbits else weighted_kmeans(distinct, counts, 1 << nbits)
            for nbits in bits}


def palettizable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.numel() > WEIGHT_THRESHOLD


@torch.no_grad()
def palettize_module(module: torch.nn.Module, nbits: int, group: int | None = None) -> int:
    """Replace, in place, every large Linear and Conv2d weight of `module` by its palette values (in
    the weight's own dtype), a palette per `group` output channels with `group`; the number of parameters
    palettized."""
    if nbits not in NBITS_CHOICES:
        raise ValueError(f"nbits must be one of {', '.join(map(str, NBITS_CHOICES))}, not {nbits}")
    return sum(palettize_layer(layer, nbits, group) for layer in filter(palettizable, module.modules()))


def grouped(shape: tuple[int, ...], group: int | None) -> bool:
    """Whether a weight of `shape` gets a palette per `group` output channels (else one palette)."""
    return bool(group) and shape[0] % group == 0


@torch.no_grad()
def palettize_layer(layer: torch.nn.Module, nbits: int, group: int | None = None) -> int:
    """Replace, in place, `layer`'s weight by its palette values (in the weight's own dtype); its size."""
    weight = layer.weight
    values = weight.detach().cpu().numpy()
    chunks = np.split(values, values.shape[0] // group) if grouped(values.shape, group) else [values]
    snapped = []
    for chunk in chunks:
        centroids, indices = palette(chunk, nbits)
        snapped.append(centroids[indices].reshape(chunk.shape))
    weight.copy_(torch.from_numpy(np.concatenate(snapped)).to(weight.dtype))
    return weight.numel()


def palettize_parts(parts, nbits: int, group: int | None = None) -> int:
    """palettize_module on each module a component was loaded with (a `sources.ModelParts`)."""
    modules = [getattr(parts, field.name) for field in dataclasses.fields(parts)]
    return sum(palettize_module(module, nbits, group) for module in modules if module is not None)


def _exact_lut(nbits: int):
    """coremltools' custom palettization: the weight's own distinct values (padded to 2^nbits)."""

    def lut_function(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct, _, position = _distinct_float16(weight)
        if len(distinct) > 1 << nbits:
            raise ValueError(f"a weight of {weight.size} elements has {len(distinct)} distinct values, "
                             f"more than {nbits} bits index (it was not palettized before export)")
        lut = np.zeros(1 << nbits, dtype=weight.dtype)
        lut[: len(distinct)] = distinct
        return lut, position.astype(np.uint8)

    return lut_function


def _fitting_nbits(weight: np.ndarray) -> int | None:
    """The smallest palette that holds `weight`'s distinct float16 values exactly, or None when none does (a weight
    left in float16)."""
    distinct = np.count_nonzero(np.bincount(np.ascontiguousarray(weight, dtype=np.float16).reshape(-1).view(np.uint16),
                                            minlength=FLOAT16_CODES))
    return next((nbits for nbits in NBITS_CHOICES if distinct <= 1 << nbits), None)


def _weights(program, names: set[str]) -> dict[str, np.ndarray]:
    return {op.name: op.outputs[0].val for function in program.functions.values()
            for op in function.operations if op.name in names}


def palettize_program(program, nbits: int | None, group: int | None = None) -> None:
    """Store every convolution and linear weight of a MIL program (palettized in PyTorch) as palette + indices,
    after coremltools' default passes, where each weight is one constant feeding its conv or linear. With `nbits`,
    every such weight must fit 2^nbits entries (per `group` output channels with `group`, which needs an iOS 18
    program); without (layers palettized at their own sizes, by a recipe), each weight gets the smallest palette that
    holds its distinct values, and a weight of more than 256 stays float16.

    coremltools' palettization pass holds every constant it will replace until it has replaced them all, so the
    float16 weights would all stay beside their palettes (2.1 GiB more than the float16 conversion's peak for
    SDXL's Unet). Run over groups of weights in turn, each group's float16 weights are freed before the next is
    palettized."""
    for names in _weight_groups(program):
        configs = {}
        for name, weight in _weights(program, set(names)).items():
            size = nbits or _fitting_nbits(weight)
            if size is not None:
                configs[name] = OpPalettizerConfig(
                    mode="custom", lut_function=_exact_lut(size), weight_threshold=WEIGHT_THRESHOLD,
                    **({"granularity": "per_grouped_channel", "group_size": group, "channel_axis": 0}
                       if grouped(weight.shape, group) else {}))
            del weight
        pipeline = PassPipeline.EMPTY
        pipeline.append_pass("compression::palettize_weights")
        pipeline.set_options("compression::palettize_weights", {"config": OptimizationConfig(op_name_configs=configs)})
        PassPipelineManager.apply_pipeline(program, pipeline)
        gc.collect()  # a replaced constant and its output refer to each other


def _weight_groups(program) -> list[list[str]]:
    """The names of the constants that are only convolutions' and linears' weights (the program's functions have no
    nested blocks), in groups of about GROUP_BYTES."""
    groups, size = [[]], 0
    for function in program.functions.values():
        for op in function.operations:
            children = op.outputs[0].child_ops if op.op_type == "const" else ()
            if children and all(child.op_type in ("conv", "linear") and child.inputs["weight"] is op.outputs[0]
                                for child in children):
                if size >= GROUP_BYTES:
                    groups.append([])
                    size = 0
                groups[-1].append(op.name)
                size += op.outputs[0].val.nbytes
    return groups
