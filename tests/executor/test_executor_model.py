"""ReferenceModel's contract: description, input checks, float16 numerics, load-time errors, memory release."""
import re

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from coreml_sd.runtime.executor import ReferenceModel, UnsupportedOperationError, psnr

from executor_testing import mil_program, random, run_mil, save_program


@pytest.fixture(scope="module")
def two_input_package(tmp_path_factory):
    x, t = random((2, 3, 4), dtype=np.float16), random((2,), dtype=np.float32)
    def body(x, t):
        return (mb.mul(x=x, y=mb.cast(x=mb.reshape(x=t, shape=[2, 1, 1]), dtype="fp16")), mb.reduce_sum(x=t))
    return save_program(mil_program(body, dict(x=x, t=t)), tmp_path_factory.mktemp("model"))


def test_description_and_outputs(two_input_package):
    model = ReferenceModel(two_input_package)
    assert model.input_description == {"x": ((2, 3, 4), np.float16), "t": ((2,), np.float32)}
    (product, (product_shape, product_dtype)), (total, (total_shape, total_dtype)) = model.output_description.items()
    assert (product_shape, product_dtype, total_dtype) == ((2, 3, 4), np.float16, np.float32)
    x, t = random((2, 3, 4), seed=1, dtype=np.float16), np.array([2.0, -0.5], np.float32)
    outputs = model.predict(dict(x=x, t=t))
    assert outputs[product].dtype == np.float16 and outputs[total].dtype == np.float32
    np.testing.assert_array_equal(outputs[product], x * t.astype(np.float16).reshape(2, 1, 1))
    np.testing.assert_allclose(outputs[total].reshape(()), 1.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {**i, "y": i["x"]}, r"has no input named 'y'; it takes x float16\[2, 3, 4\], t float32\[2\]"),
        (lambda i: {"x": i["x"]}, r"input 't' is missing"),
        (lambda i: {**i, "x": i["x"][:1]}, r"input 'x' has shape \(1, 3, 4\); expected \(2, 3, 4\)"),
        (lambda i: {**i, "x": i["x"].astype(np.float32)}, r"input 'x' has dtype float32; expected float16"),
        (lambda i: {**i, "t": i["t"].tolist()}, r"input 't' must be a numpy array, not list"),
    ],
)
def test_bad_inputs_raise_one_clear_line(two_input_package, change, message):
    model = ReferenceModel(two_input_package)
    inputs = dict(x=random((2, 3, 4), dtype=np.float16), t=random((2,)))
    with pytest.raises(ValueError, match=message) as error:
        model.predict(change(inputs))
    assert "\n" not in str(error.value)


def test_unsupported_op_fails_at_load_naming_op_and_package(tmp_path):
    x = random((1, 2, 4, 4))
    weight = np.arange(6, dtype=np.uint8).reshape(3, 2, 1, 1)
    scale, offset = np.array([0.1], np.float32), np.array([-1.0], np.float32)
    # conv_quantized belongs to the neural-network backend; coremltools still writes it into a program.
    def body(x):
        return mb.conv_quantized(x=x, weight=weight, quantization_type="linear", quant_scale=scale, quant_bias=offset)
    path = save_program(mil_program(body, dict(x=x)), tmp_path)
    with pytest.raises(UnsupportedOperationError, match=rf"{path.name} uses MIL op conv_quantized, which"):
        ReferenceModel(path)


def test_bad_package_and_precision(tmp_path, two_input_package):
    with pytest.raises(FileNotFoundError, match="not an .mlpackage"):
        ReferenceModel(tmp_path / "missing.mlpackage")
    with pytest.raises(ValueError, match="precision must be one of float16, float32, not 'float64'"):
        ReferenceModel(two_input_package, precision="float64")


def overflow_program(x, big):
    """x * big overflows float16 for |x| > 65504 / big; dividing back only restores it in float32."""
    scaled = mb.mul(x=x, y=big)
    restored = mb.real_div(x=scaled, y=big)
    return restored, mb.sub(x=scaled, y=scaled), mb.reduce_mean(x=mb.mul(x=x, y=np.float16(600.0)), axes=[-1])


def test_float16_overflow_gives_inf_and_nan_like_a_device_and_float32_does_not(tmp_path):
    x = np.array([[100.0, 32.0, -100.0]], np.float16)
    big = np.array([1024.0], np.float16)
    path = save_program(mil_program(overflow_program, dict(x=x, big=big)), tmp_path)
    restored, difference, mean = ReferenceModel(path).predict(dict(x=x, big=big)).values()
    np.testing.assert_array_equal(restored, [[np.inf, 32.0, -np.inf]])
    np.testing.assert_array_equal(np.isnan(difference), [[True, False, True]])
    # 60000 + 19200 overflows float16, but reductions accumulate in float32, as Core ML's do.
    np.testing.assert_allclose(mean, [(60000 + 19200 - 60000) / 3], rtol=1e-3)
    restored, difference, mean = ReferenceModel(path, precision="float32").predict(dict(x=x, big=big)).values()
    np.testing.assert_array_equal(restored, x)
    np.testing.assert_array_equal(difference, np.zeros_like(x))


def test_float16_values_are_rounded_at_every_op_output(tmp_path):
    a, b = random((64,), seed=1, dtype=np.float16), random((64,), seed=2, dtype=np.float16)
    def body(a, b):
        return mb.mul(x=mb.add(x=a, y=b), y=mb.real_div(x=a, y=b))
    (fp16,) = run_mil(body, dict(a=a, b=b), tmp_path)
    (fp32,) = run_mil(body, dict(a=a, b=b), tmp_path, precision="float32")
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(fp16, (a + b) * (a / b))  # NumPy's float16 ufuncs round each result
    wide = (a.astype(np.float32) + b) * (a.astype(np.float32) / b)
    np.testing.assert_allclose(fp32.astype(np.float32), wide.astype(np.float16), rtol=1e-3)


def test_each_intermediate_is_released_by_its_last_reader(tmp_path):
    x = random((4, 4))
    def body(x):
        return (lambda a: (mb.add(x=mb.relu(x=a), y=mb.sigmoid(x=a)), mb.exp(x=a)))(mb.mul(x=x, y=2.0))
    function = ReferenceModel(save_program(mil_program(body, dict(x=x)), tmp_path))._function
    outputs = {slot for _, slot in function.output_slots}
    released = {}
    for index, step in enumerate(function.steps):
        for slot in step.release:
            released[slot] = index
    for index, step in enumerate(function.steps):
        for slot in step.slots_used():
            assert released.get(slot, len(function.steps)) >= index  # never read after release
    produced = {output.slot for step in function.steps for output in step.outputs}
    assert produced - outputs <= set(released)  # every non-output value is released
    assert not outputs & set(released)


def test_psnr_is_apples_formula():
    reference = np.array([0.5, -2.0, 1.0])
    actual = reference + np.array([0.1, -0.1, 0.1])
    assert psnr(reference, actual) == pytest.approx(20 * np.log10((2.0 + 1e-5) / (0.1 + 1e-10)))
    assert psnr(reference, reference) == pytest.approx(20 * np.log10((2.0 + 1e-5) / 1e-10))


def flexible_package(directory, shape):
    """x [?, 4] (rows from `shape`) -> x * 2 and its row sums, the program built for any row count."""
    from coremltools.converters.mil.mil import get_new_symbol, types

    rows = get_new_symbol()
    program = mb.program(input_specs=[mb.TensorSpec(shape=(rows, 4), dtype=types.fp32)])(
        lambda x: (mb.mul(x=x, y=2.0), mb.reduce_sum(x=x, axes=[1]))
    )
    return save_program(program, directory, inputs=[ct.TensorType(name="x", shape=shape)])


@pytest.mark.parametrize(
    "shape, accepted, refused, message",
    [
        (
            ct.EnumeratedShapes(shapes=[[1, 4], [3, 4]], default=[1, 4]),
            [(1, 4), (3, 4)],
            (2, 4),
            r"expected \(1, 4\) or \(3, 4\)",
        ),
        (ct.Shape(shape=(ct.RangeDim(2, 5, default=2), 4)), [(2, 4), (5, 4)], (6, 4), r"expected \(2\.\.5, 4\)"),
        (ct.Shape(shape=(ct.RangeDim(1, 40, default=1), 4)), [(1, 4), (40, 4)], (3, 5), r"expected \(1\.\.40, 4\)"),
    ],
)
def test_flexible_input_shapes(tmp_path, shape, accepted, refused, message):
    model = ReferenceModel(flexible_package(tmp_path, shape), precision="float32")
    for rows, columns in accepted:
        x = random((rows, columns), seed=rows)
        doubled, sums = model.predict(dict(x=x)).values()
        np.testing.assert_array_equal(doubled, 2 * x)
        np.testing.assert_allclose(sums, x.sum(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match=rf"input 'x' has shape {re.escape(str(refused))}; {message}$") as error:
        model.predict(dict(x=random(refused)))
    assert "\n" not in str(error.value)


def test_small_integer_types_load_and_compute(tmp_path):
    """uint16 and the other iOS 17 integer types are held exactly (PyTorch computes them wider)."""
    x = np.array([0, 1, 40000, 65535], np.int32)
    codes = np.array([3, 2, 1, 0], np.uint16)

    def body(x):
        return (
            mb.cast(x=mb.cast(x=x, dtype="uint16"), dtype="int32"),
            mb.gather(x=x, indices=codes),
            mb.cast(x=mb.cast(x=x, dtype="int16"), dtype="fp32"),
        )

    round_trip, gathered, narrowed = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS17)
    np.testing.assert_array_equal(round_trip, x)
    np.testing.assert_array_equal(gathered, x[::-1])
    np.testing.assert_array_equal(narrowed, x.astype(np.int16))
