"""Compressed weights: each constexpr op against its decompression formula, and packages compressed by
coremltools' own palettizer and quantizer against the dense weights they encode exactly."""
import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.runtime.executor import ReferenceModel

from executor_testing import mil_program, random, run_mil, save_program


def pack_lsb_first(values: np.ndarray, nbits: int) -> np.ndarray:
    """Unsigned nbits-wide integers packed into bytes, least significant bit first."""
    bits = (values.reshape(-1, 1).astype(np.int64) >> np.arange(nbits)) & 1
    return np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little")


def sub_byte(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(types.nptype_from_builtin(types.string_to_builtin(dtype)))


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_ios16_lut_to_dense(tmp_path, nbits):
    shape = (3, 5, 2)  # 30 elements: indices straddle byte boundaries for 4 of the 5 widths
    rng = np.random.default_rng(nbits)
    indices = rng.integers(0, 2**nbits, shape)
    lut = random((2**nbits,), seed=1)
    x = random(shape, seed=2)
    def body(x):
        return mb.add(
            x=x,
            y=mb.constexpr_lut_to_dense(
                indices=pack_lsb_first(indices, nbits), lut=lut, shape=np.array(shape, np.uint32)
            ),
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_array_equal(actual, x + lut[indices])


def test_ios16_affine_dequantize_sparse_and_cast(tmp_path):
    x = random((4, 3), seed=1)
    quantized = np.random.default_rng(2).integers(0, 256, (4, 3)).astype(np.uint8)
    zero_point = np.array([120, 128, 3], np.uint8)
    scale = np.array([0.5, 0.25, 2.0], np.float32)
    signed = np.random.default_rng(3).integers(-128, 128, (4, 3)).astype(np.int8)
    mask = np.random.default_rng(4).random((4, 3)) < 0.5
    nonzero = random((int(mask.sum()),), seed=5)
    source = random((4, 3), seed=6).astype(np.float16)

    def body(x):
        return (
            mb.add(
                x=x,
                y=mb.constexpr_affine_dequantize(quantized_data=quantized, zero_point=zero_point, scale=scale, axis=1),
            ),
            mb.add(
                x=x,
                y=mb.constexpr_affine_dequantize(
                    quantized_data=signed, zero_point=np.int8(-3), scale=np.float32(0.1), axis=0
                ),
            ),
            mb.add(
                x=x,
                y=mb.constexpr_sparse_to_dense(
                    nonzero_data=nonzero, mask=pack_lsb_first(mask, 1), shape=np.array([4, 3], np.uint32)
                ),
            ),
            mb.add(x=x, y=mb.constexpr_cast(source_val=source, output_dtype="fp32")),
        )

    per_channel, per_tensor, sparse, cast = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_allclose(per_channel, x + scale * (quantized.astype(np.float32) - zero_point), rtol=1e-6)
    np.testing.assert_allclose(per_tensor, x + np.float32(0.1) * (signed.astype(np.float32) + 3), rtol=1e-6)
    dense = np.zeros((4, 3), np.float32)
    dense[mask] = nonzero
    np.testing.assert_array_equal(sparse, x + dense)
    np.testing.assert_array_equal(cast, x + source.astype(np.float32))


def test_ios18_lut_to_dense(tmp_path):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, (6, 4))
    lut = random((2, 1, 16, 1), seed=1)  # rows 0-2 and 3-5 have a palette each
    vector_indices = rng.integers(0, 4, (2, 3, 2))
    vector_lut = random((1, 1, 1, 4, 3), seed=2)  # one palette of 4 entries, each a 3-vector
    x, y = random((6, 4), seed=3), random((2, 9, 2), seed=4)

    def body(x, y):
        return (
            mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=sub_byte(indices, "uint4"), lut=lut)),
            mb.add(
                x=y,
                y=mb.constexpr_lut_to_dense(indices=sub_byte(vector_indices, "uint2"), lut=vector_lut, vector_axis=1),
            ),
        )

    grouped, vectors = run_mil(body, dict(x=x, y=y), tmp_path, target=ct.target.iOS18)
    palette_of_row = np.arange(6)[:, None] // 3
    np.testing.assert_array_equal(grouped, x + lut[palette_of_row, 0, indices, 0])
    entries = vector_lut[0, 0, 0][vector_indices]  # (2, 3, 2, 3): the vector of each index
    np.testing.assert_array_equal(vectors, y + entries.transpose(0, 1, 3, 2).reshape(2, 9, 2))


def test_ios18_blockwise_shift_scale_and_sparse(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-8, 8, (4, 6))
    scale = random((2, 3), seed=1)  # blocks of 2 x 2
    offset = rng.integers(-8, 8, (2, 3))
    data8 = rng.integers(-128, 128, (4, 6)).astype(np.int8)
    scale8 = random((4, 1), seed=2)  # one scale per row
    mask = rng.random((4, 6)) < 0.5
    nonzero = random((int(mask.sum()),), seed=3)
    x = random((4, 6), seed=4)

    def body(x):
        return (
            mb.add(
                x=x,
                y=mb.constexpr_blockwise_shift_scale(
                    data=sub_byte(data, "int4"), scale=scale, offset=sub_byte(offset, "int4")
                ),
            ),
            mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data8, scale=scale8)),
            mb.add(x=x, y=mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=sub_byte(mask, "uint1"))),
        )

    int4, int8, sparse = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS18)

    def block(a):
        return a.repeat(2, axis=0).repeat(2, axis=1)

    np.testing.assert_allclose(int4, x + block(scale) * (data - block(offset)), rtol=1e-6)
    np.testing.assert_allclose(int8, x + scale8 * data8.astype(np.float32), rtol=1e-6)
    dense = np.zeros((4, 6), np.float32)
    dense[mask] = nonzero
    np.testing.assert_array_equal(sparse, x + dense)


def grid_weights(levels: np.ndarray, shape, seed: int) -> np.ndarray:
    """Weights drawn from `levels` (all of them present), which a compressor can represent exactly."""
    flat = np.random.default_rng(seed).choice(levels, int(np.prod(shape)))
    flat[: len(levels)] = levels
    return flat.reshape(shape).astype(np.float32)


@pytest.mark.parametrize("target", [ct.target.iOS16, ct.target.iOS18])
@pytest.mark.parametrize("compression", ["palettize", "quantize"])
def test_packages_compressed_by_coremltools(tmp_path, target, compression):
    if compression == "palettize":  # 16 evenly spaced levels: 4-bit uniform palettization is exact
        weight = grid_weights(np.linspace(-1.5, 0.375, 16), (8, 4, 3, 3), seed=1)
        config = cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=0)
        compress, expected_ops = cto.palettize_weights, {"constexpr_lut_to_dense"}
    else:  # multiples of 1/64 reaching 127/64 in every output channel: per-channel symmetric int8 is exact
        weight = grid_weights(np.arange(-127, 128) / 64, (8, 4, 3, 3), seed=1)
        weight[:, 0, 0, 0] = 127 / 64
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
        compress = cto.linear_quantize_weights
        expected_ops = (
            {"constexpr_affine_dequantize"} if target == ct.target.iOS16 else {"constexpr_blockwise_shift_scale"}
        )
    x = random((1, 4, 6, 6), seed=2)
    program = mil_program(lambda x: mb.conv(x=x, weight=weight, pad_type="same"), dict(x=x), target)
    dense_path = save_program(program, tmp_path, target)
    compressed = compress(
        ct.models.MLModel(str(dense_path), skip_model_load=True), cto.OptimizationConfig(global_config=config)
    )
    compressed_path = tmp_path / "compressed.mlpackage"
    compressed.save(str(compressed_path))
    used = {op.op_type for op in compressed._mil_program.functions["main"].operations}
    assert expected_ops <= used, used
    (name,) = ReferenceModel(dense_path).output_description
    expected = ReferenceModel(dense_path).predict(dict(x=x))[name]
    actual = ReferenceModel(compressed_path).predict(dict(x=x))[name]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
