"""Float32 programs whose weights and parameters are stored as float16 (iOS 17 lets an op's
parameters differ in type from its input): the op computes in float32 on the stored values, as
Core ML does, so the results match float64 formulas on those values to float32 accuracy, for the
executor's float16 and float32 numerics alike."""
import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def stored(value) -> np.ndarray:
    """A parameter as the program stores it (float16), in float64 for the reference."""
    return np.asarray(value, np.float16).astype(np.float64)


def normalized(x: np.ndarray, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + epsilon)


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_float32_ops_with_float16_parameters(tmp_path, precision):
    x = random((2, 3, 6, 5), seed=1)
    weight, bias = random((4, 3, 3, 2), seed=2, dtype=np.float16), random((4,), seed=3, dtype=np.float16)
    weight_t = random((3, 2, 2, 3), seed=4, dtype=np.float16)
    gamma, beta = random((3,), seed=5, dtype=np.float16), random((3,), seed=6, dtype=np.float16)
    epsilon = np.float16(5.7)  # stored as 5.69921875
    def body(x):
        return (
            mb.conv(x=x, weight=weight, bias=bias, pad_type="same"),
            mb.conv_transpose(x=x, weight=weight_t, strides=[2, 1]),
            mb.instance_norm(x=x, gamma=gamma, beta=beta, epsilon=epsilon),
            mb.l2_norm(x=x, epsilon=epsilon),
            mb.layer_norm(x=x, axes=[1], gamma=gamma.reshape(3), beta=beta, epsilon=epsilon),
        )
    conv, conv_t, instance, l2, layer = run_mil(body, dict(x=x), tmp_path, precision=precision, target=ct.target.iOS17)
    def wide(a):
        return torch.tensor(np.asarray(a, np.float64))
    expected_conv = F.conv2d(F.pad(wide(x), [0, 1, 1, 1]), wide(weight), wide(bias)).numpy()
    np.testing.assert_allclose(conv, expected_conv, **TOLERANCE)
    np.testing.assert_allclose(conv_t, F.conv_transpose2d(wide(x), wide(weight_t), stride=[2, 1]).numpy(), **TOLERANCE)
    def channel(v):
        return stored(v).reshape(1, 3, 1, 1)
    eps = float(stored(epsilon))
    np.testing.assert_allclose(instance, normalized(x, (2, 3), eps) * channel(gamma) + channel(beta), **TOLERANCE)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(l2, x64 / np.sqrt((x64**2).sum(axis=(1, 2, 3), keepdims=True) + eps), **TOLERANCE)
    np.testing.assert_allclose(layer, normalized(x, (1,), eps) * channel(gamma) + channel(beta), **TOLERANCE)
