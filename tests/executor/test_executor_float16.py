"""Float16 programs per op family against formulas with float16 rounding: each op's float16 inputs, computed exactly
(float64), rounded to float16 once at the op's output — what the executor promises (see its package docstring).
One float16 ulp of difference is allowed: the executor accumulates in float32, not float64."""
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

F16 = np.float16
EPSILON = F16(1e-5)  # a float16 program's constants are float16 too


def half(shape, seed: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return random(shape, seed=seed, low=low, high=high).astype(F16)


def assert_float16_rounding_of(actual: np.ndarray, exact: np.ndarray, atol: float = 0.0) -> None:
    """`actual` is float16 and within one float16 ulp of the exact result rounded to float16 (plus `atol`, for
    results that cancel to near zero, where float32's own rounding of O(1) terms is several float16 ulps)."""
    assert actual.dtype == F16
    expected = exact.astype(F16)
    ulp = np.spacing(np.abs(expected)).astype(np.float64)
    np.testing.assert_array_less(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), ulp * 1.0001 + atol)


def wide(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def test_conv(tmp_path):
    x, weight, bias = half((1, 6, 9, 9), 1), half((4, 3, 3, 3), 2, -0.5, 0.5), half((4,), 3)
    def body(x):
        return mb.conv(x=x, weight=weight, bias=bias, strides=[2, 1], pad_type="custom", pad=[1, 1, 0, 2],
                                 groups=2)
    (actual,) = run_mil(body, dict(x=x), tmp_path)
    exact = torch.nn.functional.conv2d(torch.from_numpy(wide(np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 2))))),
                                       torch.from_numpy(wide(weight)), torch.from_numpy(wide(bias)), stride=(2, 1),
                                       groups=2).numpy()
    assert_float16_rounding_of(actual, exact)


def test_linear(tmp_path):
    x, weight, bias = half((2, 7, 40), 1), half((24, 40), 2), half((24,), 3)
    (actual,) = run_mil(lambda x: mb.linear(x=x, weight=weight, bias=bias), dict(x=x), tmp_path)
    assert_float16_rounding_of(actual, wide(x) @ wide(weight).T + wide(bias))


def test_matmul(tmp_path):
    x, y = half((2, 5, 48), 1), half((2, 33, 48), 2)
    (actual,) = run_mil(lambda x, y: mb.matmul(x=x, y=y, transpose_y=True), dict(x=x, y=y), tmp_path)
    assert_float16_rounding_of(actual, wide(x) @ np.swapaxes(wide(y), -1, -2))


def test_matmul_overflow_is_inf(tmp_path):
    """A product beyond float16's 65504 is inf, as on a float16 device."""
    x, y = np.full((1, 4), 200, F16), np.full((4, 1), 100, F16)
    (actual,) = run_mil(lambda x, y: mb.matmul(x=x, y=y), dict(x=x, y=y), tmp_path)
    assert np.isposinf(actual).all()


def test_einsum(tmp_path):
    a, b = half((1, 8, 4, 6), 1), half((1, 6, 4, 5), 2)
    (actual,) = run_mil(lambda a, b: mb.einsum(values=(a, b), equation="nchw,nwhu->nchu"), dict(a=a, b=b), tmp_path)
    assert_float16_rounding_of(actual, np.einsum("nchw,nwhu->nchu", wide(a), wide(b)))


def test_layer_norm(tmp_path):
    x, gamma, beta = half((2, 6, 32), 1, -3, 5), half((32,), 2), half((32,), 3)
    (actual,) = run_mil(lambda x: mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=EPSILON), dict(x=x),
                        tmp_path)
    v = wide(x)
    normed = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + wide(EPSILON))
    assert_float16_rounding_of(actual, normed * wide(gamma) + wide(beta))


def test_instance_norm(tmp_path):
    x, gamma, beta = half((1, 4, 6, 6), 1, -3, 5), half((4,), 2), half((4,), 3)
    (actual,) = run_mil(lambda x: mb.instance_norm(x=x, gamma=gamma, beta=beta, epsilon=EPSILON), dict(x=x), tmp_path)
    v = wide(x)
    normed = (v - v.mean((2, 3), keepdims=True)) / np.sqrt(v.var((2, 3), keepdims=True) + wide(EPSILON))
    assert_float16_rounding_of(actual, normed * wide(gamma)[:, None, None] + wide(beta)[:, None, None])


def test_softmax(tmp_path):
    x = half((2, 3, 50), 1, -8, 8)
    (actual,) = run_mil(lambda x: mb.softmax(x=x, axis=-1), dict(x=x), tmp_path)
    v = np.exp(wide(x) - wide(x).max(-1, keepdims=True))
    assert_float16_rounding_of(actual, v / v.sum(-1, keepdims=True))


def test_reduce_mean(tmp_path):
    x = half((2, 64, 5), 1)
    (actual,) = run_mil(lambda x: mb.reduce_mean(x=x, axes=[1], keep_dims=True), dict(x=x), tmp_path)
    assert_float16_rounding_of(actual, wide(x).mean(1, keepdims=True))


@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_bilinear(tmp_path, align_corners):
    x = half((1, 2, 5, 7), 1)
    mode = "STRICT_ALIGN_CORNERS" if align_corners else "UNALIGN_CORNERS"  # PyTorch's two conventions
    (actual,) = run_mil(lambda x: mb.resize_bilinear(x=x, target_size_height=8, target_size_width=11,
                                                     sampling_mode=mode),
                        dict(x=x), tmp_path)
    exact = torch.nn.functional.interpolate(torch.from_numpy(wide(x)), size=(8, 11), mode="bilinear",
                                            align_corners=align_corners).numpy()
    assert_float16_rounding_of(actual, exact, atol=1e-6)


def test_upsample_nearest_neighbor(tmp_path):
    x = half((1, 3, 4, 5), 1)
    (actual,) = run_mil(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2),
                        dict(x=x), tmp_path)
    np.testing.assert_array_equal(actual, x.repeat(2, axis=2).repeat(2, axis=3))
