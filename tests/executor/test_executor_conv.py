"""conv, conv_transpose and pooling against PyTorch's functional ops, padding written out from MIL's
definition (float32 programs; tolerance 1e-4 relative)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def mil_padding(pad_type, size, kernel, stride, dilation, custom):
    """(before, after) for one spatial dim, from the MIL conv reference."""
    if pad_type == "valid":
        return 0, 0
    if pad_type == "custom":
        return custom
    dilated = (kernel - 1) * dilation + 1
    total = max(0, (math.ceil(size / stride) - 1) * stride + dilated - size)
    return (total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2)


def torch_conv(x, weight, bias, pad_type, strides, dilations, groups, custom):
    dims = x.dim() - 2
    padding = [
        mil_padding(pad_type, x.shape[2 + i], weight.shape[2 + i], strides[i], dilations[i], custom[i])
        for i in range(dims)
    ]
    flat = [amount for pair in reversed(padding) for amount in pair]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(F.pad(x, flat), weight, bias, stride=strides, dilation=dilations, groups=groups)


@pytest.mark.parametrize("pad_type", ["valid", "same", "same_lower", "custom"])
@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 1), (2, 1, 2), (1, 2, 1), (3, 2, 4)])
def test_conv2d(tmp_path, pad_type, stride, dilation, groups):
    x = random((2, 4, 9, 8), seed=1)
    weight = random((8, 4 // groups, 3, 2), seed=2)
    bias = random((8,), seed=3)
    custom = [(2, 0), (1, 3)]
    pad = [amount for pair in custom for amount in pair] if pad_type == "custom" else [0, 0, 0, 0]
    strides, dilations = [stride, 1], [dilation, dilation]

    def body(x):
        return mb.conv(
            x=x,
            weight=weight,
            bias=bias,
            strides=strides,
            pad_type=pad_type,
            pad=pad,
            dilations=dilations,
            groups=groups,
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    expected = torch_conv(
        torch.tensor(x), torch.tensor(weight), torch.tensor(bias), pad_type, strides, dilations, groups, custom
    )
    np.testing.assert_allclose(actual, expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_1d_and_3d_depthwise(tmp_path, dims):
    x = random((1, 3) + (6,) * dims, seed=1)
    weight = random((6, 1) + (3,) * dims, seed=2)

    def body(x):
        return mb.conv(x=x, weight=weight, pad_type="same", strides=[2] * dims, groups=3)

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    expected = torch_conv(torch.tensor(x), torch.tensor(weight), None, "same", [2] * dims, [1] * dims, 3, [None] * dims)
    np.testing.assert_allclose(actual, expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize(
    "x_shape, strides, pad_type, with_bias",
    [
        ((2, 6, 1, 10), [1, 1], "valid", True),  # the Neural Engine layout of a linear layer
        ((2, 6, 4, 5), [1, 1], "same", False),
        ((1, 6, 7), [1], "valid", True),
        ((1, 6, 4, 5), [2, 1], "valid", True),  # strided: not a plain matrix product
        ((1, 6, 4, 5), [1, 1], "custom", True),  # padded: neither
    ],
)
def test_1x1_conv(tmp_path, x_shape, strides, pad_type, with_bias):
    dims = len(x_shape) - 2
    x, weight, bias = random(x_shape, seed=1), random((4, 6) + (1,) * dims, seed=2), random((4,), seed=3)
    custom = [(1, 0), (0, 2)][:dims]
    pad = [amount for pair in custom for amount in pair] if pad_type == "custom" else [0] * 2 * dims
    extra = dict(bias=bias) if with_bias else {}

    def body(x):
        return mb.conv(x=x, weight=weight, strides=strides, pad_type=pad_type, pad=pad, **extra)

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    t_bias = torch.tensor(bias) if with_bias else None
    expected = torch_conv(torch.tensor(x), torch.tensor(weight), t_bias, pad_type, strides, [1] * dims, 1, custom)
    np.testing.assert_allclose(actual, expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize(
    "pad_type, pad, output_shape, stride, torch_padding, output_padding",
    [
        ("valid", [0, 0, 0, 0], None, 2, 0, 0),
        ("custom", [1, 1, 2, 2], None, 2, (1, 2), 0),
        ("custom", [1, 1, 1, 1], [1, 4, 10, 10], 2, (1, 1), 1),  # output_shape = PyTorch's output_padding
        ("same", [0, 0, 0, 0], None, 1, 1, 0),  # kernel 3, stride 1: "same" keeps the size, like padding 1
    ],
)
def test_conv_transpose(tmp_path, pad_type, pad, output_shape, stride, torch_padding, output_padding):
    x = random((1, 6, 5, 5), seed=1)
    weight = random((6, 2, 3, 3), seed=2)  # [C_in, C_out / groups, K...]
    bias = random((4,), seed=3)
    extra = dict(output_shape=output_shape) if output_shape else {}

    def body(x):
        return mb.conv_transpose(
            x=x, weight=weight, bias=bias, pad_type=pad_type, pad=pad, strides=[stride, stride], groups=2, **extra
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    expected = F.conv_transpose2d(
        torch.tensor(x),
        torch.tensor(weight),
        torch.tensor(bias),
        stride=stride,
        padding=torch_padding,
        output_padding=output_padding,
        groups=2,
    )
    np.testing.assert_allclose(actual, expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("pad_type", ["valid", "same", "custom"])
@pytest.mark.parametrize("exclude_padding", [False, True])
def test_pooling(tmp_path, pad_type, exclude_padding):
    x = random((1, 2, 7, 6), seed=1)
    custom = [(1, 0), (0, 1)]
    pad = [1, 0, 0, 1] if pad_type == "custom" else [0, 0, 0, 0]
    window = dict(kernel_sizes=[3, 2], strides=[2, 2], pad_type=pad_type, pad=pad)

    def body(x):
        return (
            mb.avg_pool(x=x, exclude_padding_from_average=exclude_padding, **window),
            mb.max_pool(x=x, **window),
            mb.l2_pool(x=x, **window),
        )

    avg, maximum, l2 = run_mil(body, dict(x=x), tmp_path)
    padding = [mil_padding(pad_type, x.shape[2 + i], [3, 2][i], 2, 1, custom[i]) for i in range(2)]
    flat = [amount for pair in reversed(padding) for amount in pair]
    t = torch.tensor(x)
    sums = F.avg_pool2d(F.pad(t, flat), [3, 2], [2, 2], divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(t), flat), [3, 2], [2, 2], divisor_override=1) if exclude_padding else 6
    np.testing.assert_allclose(avg, (sums / counts).numpy(), **TOLERANCE)
    np.testing.assert_allclose(
        maximum, F.max_pool2d(F.pad(t, flat, value=-np.inf), [3, 2], [2, 2]).numpy(), **TOLERANCE
    )
    squares = F.avg_pool2d(F.pad(t * t, flat), [3, 2], [2, 2], divisor_override=1)
    np.testing.assert_allclose(l2, torch.sqrt(squares).numpy(), **TOLERANCE)
