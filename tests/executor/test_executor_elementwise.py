"""Elementwise and activation ops against NumPy formulas (float32 programs; tolerance 1e-5 relative)."""
import math

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

erf = np.vectorize(math.erf)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)

FLOAT_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
}
COMPARISONS = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
}


def test_float_binary_ops_broadcast_like_numpy(tmp_path):
    x, y = random((2, 3, 4), seed=1), random((3, 1), seed=2) + 3.0  # y away from 0 for the divisions
    def body(x, y):
        return tuple(getattr(mb, name)(x=x, y=y) for name in FLOAT_BINARY)
    for name, actual in zip(FLOAT_BINARY, run_mil(body, dict(x=x, y=y), tmp_path)):
        np.testing.assert_allclose(actual, FLOAT_BINARY[name](x, y), **TOLERANCE, err_msg=name)


def test_pow(tmp_path):
    x, y = random((3, 4), seed=1, low=0.1, high=3), random((4,), seed=2)
    (actual,) = run_mil(lambda x, y: mb.pow(x=x, y=y), dict(x=x, y=y), tmp_path)
    np.testing.assert_allclose(actual, np.power(x, y), **TOLERANCE)


def test_int_division_rounds_toward_negative_infinity(tmp_path):
    x = np.array([[-7, -6, -1, 0, 1, 6, 7]], np.int32)
    y = np.array([[2], [-3]], np.int32)
    def body(x, y):
        return (mb.floor_div(x=x, y=y), mb.mod(x=x, y=y), mb.add(x=x, y=y), mb.mul(x=x, y=y))
    floor_div, mod, add, mul = run_mil(body, dict(x=x, y=y), tmp_path)
    np.testing.assert_array_equal(floor_div, x // y)
    np.testing.assert_array_equal(mod, x % y)
    np.testing.assert_array_equal(add, x + y)
    np.testing.assert_array_equal(mul, x * y)
    assert floor_div.dtype == np.int32


def test_comparisons_and_logical_ops(tmp_path):
    x = np.array([[-1, 0, 1, 2]], np.float32)
    y = np.array([[0], [1]], np.float32)

    def body(x, y):
        compared = [mb.cast(x=getattr(mb, name)(x=x, y=y), dtype="fp32") for name in COMPARISONS]
        positive, small = mb.greater(x=x, y=0.0), mb.less(x=y, y=0.5)
        logical = [
            mb.logical_and(x=positive, y=small),
            mb.logical_or(x=positive, y=small),
            mb.logical_xor(x=positive, y=small),
            mb.logical_not(x=positive),
        ]
        return tuple(compared + [mb.cast(x=value, dtype="fp32") for value in logical])

    outputs = run_mil(body, dict(x=x, y=y), tmp_path)
    for name, actual in zip(COMPARISONS, outputs):
        np.testing.assert_array_equal(actual, COMPARISONS[name](x, y).astype(np.float32), err_msg=name)
    positive, small = x > 0, y < 0.5
    expected = [positive & small, positive | small, positive ^ small, ~positive]
    for actual, wanted in zip(outputs[len(COMPARISONS):], expected):
        np.testing.assert_array_equal(actual, np.broadcast_to(wanted, actual.shape).astype(np.float32))


UNARY_ON_UNIT_INTERVAL = {
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "cos": np.cos,
    "cosh": np.cosh,
    "sin": np.sin,
    "sinh": np.sinh,
    "tan": np.tan,
    "tanh": np.tanh,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "exp2": np.exp2,
    "erf": erf,
    "square": np.square,
}
UNARY_ON_REALS = {
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "round": np.round,
    "sign": np.sign,
}


def test_unary_ops(tmp_path):
    x = random((2, 50), low=0.05, high=0.95)
    outputs = run_mil(lambda x: tuple(getattr(mb, name)(x=x) for name in UNARY_ON_UNIT_INTERVAL), dict(x=x), tmp_path)
    for name, actual in zip(UNARY_ON_UNIT_INTERVAL, outputs):
        np.testing.assert_allclose(
            actual, UNARY_ON_UNIT_INTERVAL[name](x.astype(np.float64)), **TOLERANCE, err_msg=name
        )
    # Halfway cases and zero pin down round's and sign's conventions.
    reals = np.concatenate([random((40,), low=-4, high=4), [-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5]]).astype(np.float32)
    outputs = run_mil(lambda x: tuple(getattr(mb, name)(x=x) for name in UNARY_ON_REALS), dict(x=reals), tmp_path)
    for name, actual in zip(UNARY_ON_REALS, outputs):
        np.testing.assert_array_equal(actual, UNARY_ON_REALS[name](reals), err_msg=name)


def test_ops_with_epsilon(tmp_path):
    x = random((3, 5), low=0.0, high=2.0)

    def body(x):
        return (
            mb.log(x=x),
            mb.log(x=x, epsilon=0.5),
            mb.rsqrt(x=x, epsilon=0.25),
            mb.inverse(x=x),
            mb.inverse(x=x, epsilon=1.0),
        )

    log, log_eps, rsqrt, inverse, inverse_eps = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_allclose(log, np.log(x + 1e-45), **TOLERANCE)
    np.testing.assert_allclose(log_eps, np.log(x + 0.5), **TOLERANCE)
    np.testing.assert_allclose(rsqrt, 1 / np.sqrt(x + 0.25), **TOLERANCE)
    np.testing.assert_allclose(inverse, 1 / (x + 1e-4), **TOLERANCE)
    np.testing.assert_allclose(inverse_eps, 1 / (x + 1.0), **TOLERANCE)


def test_clip_threshold_select_cast(tmp_path):
    x = random((4, 6), low=-3, high=3)

    def body(x):
        return (
            mb.clip(x=x, alpha=-1.0, beta=0.5),
            mb.threshold(x=x, alpha=0.25),
            mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=mb.mul(x=x, y=-2.0)),
            mb.cast(x=x, dtype="int32"),
            mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"),
        )

    clip, threshold, select, to_int, through_fp16 = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_array_equal(clip, np.clip(x, -1.0, 0.5))
    np.testing.assert_array_equal(threshold, np.maximum(x, 0.25))
    np.testing.assert_allclose(select, np.where(x > 0, x, -2 * x), **TOLERANCE)
    np.testing.assert_array_equal(to_int, x.astype(np.int32))  # truncation toward zero, as NumPy's astype
    np.testing.assert_array_equal(through_fp16, x.astype(np.float16).astype(np.float32))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


ACTIVATIONS = {
    "relu": (dict(), lambda x: np.maximum(x, 0)),
    "relu6": (dict(), lambda x: np.clip(x, 0, 6)),
    "sigmoid": (dict(), sigmoid),
    "silu": (dict(), lambda x: x * sigmoid(x)),
    "softplus": (dict(), lambda x: np.log1p(np.exp(x))),
    "softsign": (dict(), lambda x: x / (1 + np.abs(x))),
    "elu": (dict(alpha=0.7), lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
    "leaky_relu": (dict(alpha=0.1), lambda x: np.where(x >= 0, x, 0.1 * x)),
    "linear_activation": (dict(alpha=1.5, beta=-0.5), lambda x: 1.5 * x - 0.5),
    "scaled_tanh": (dict(alpha=2.0, beta=0.5), lambda x: 2 * np.tanh(0.5 * x)),
    "sigmoid_hard": (dict(alpha=0.2, beta=0.5), lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    "clamped_relu": (
        dict(alpha=0.1, beta=3.0),
        lambda x: np.where(x >= 0, np.minimum(x, 3.0), np.minimum(0.1 * x, 3.0)),
    ),
    "thresholded_relu": (dict(alpha=1.0), lambda x: np.where(x >= 1.0, x, 0)),
}
GELU_MODES = {
    "EXACT": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "TANH_APPROXIMATION": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "SIGMOID_APPROXIMATION": lambda x: x * sigmoid(1.702 * x),
}


def test_activations(tmp_path):
    x = random((2, 3, 4, 5), low=-5, high=5).astype(np.float32)
    x64 = x.astype(np.float64)

    def body(x):
        return tuple(getattr(mb, name)(x=x, **params) for name, (params, _) in ACTIVATIONS.items()) + tuple(
            mb.gelu(x=x, mode=mode) for mode in GELU_MODES
        )

    outputs = run_mil(body, dict(x=x), tmp_path)
    formulas = [formula for _, formula in ACTIVATIONS.values()] + list(GELU_MODES.values())
    for name, actual, formula in zip(list(ACTIVATIONS) + list(GELU_MODES), outputs, formulas):
        np.testing.assert_allclose(actual, formula(x64), rtol=1e-5, atol=1e-5, err_msg=name)


def test_per_channel_activations(tmp_path):
    x = random((2, 3, 4, 5), low=-4, high=4)
    alpha = np.array([0.1, 0.5, 2.0], np.float32)
    beta = np.array([1.0, 0.5, 3.0], np.float32)

    def body(x):
        return (mb.prelu(x=x, alpha=alpha), mb.softplus_parametric(x=x, alpha=alpha, beta=beta))

    prelu, softplus = run_mil(body, dict(x=x), tmp_path)
    a, b = alpha.reshape(1, 3, 1, 1), beta.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(prelu, np.where(x > 0, x, a * x), **TOLERANCE)
    np.testing.assert_allclose(softplus, a * np.log1p(np.exp(b * x)), **TOLERANCE)


@pytest.mark.parametrize("axis", [-1, 0, 2])
def test_softmax(tmp_path, axis):
    x = random((3, 4, 5), low=-6, high=6)
    (actual,) = run_mil(lambda x: mb.softmax(x=x, axis=axis), dict(x=x), tmp_path)
    exp = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(actual, exp / exp.sum(axis=axis, keepdims=True), **TOLERANCE)


@pytest.mark.parametrize("axis", [1, -1])
def test_float16_softmax_is_the_exact_result_rounded_once(tmp_path, axis):
    x = random((2, 1024, 8), low=-4, high=4, dtype=np.float16)  # long sums: float16 accumulation would drift
    (actual,) = run_mil(lambda x: mb.softmax(x=x, axis=axis), dict(x=x), tmp_path)
    exp = np.exp(x.astype(np.float64) - x.max(axis=axis, keepdims=True))
    exact = exp / exp.sum(axis=axis, keepdims=True)
    assert actual.dtype == np.float16
    ulp = np.spacing(exact.astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(actual - exact) <= ulp)  # within one float16 step of the exact value
