"""Matrix products, normalisations and reductions against NumPy formulas (float32 programs)."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def test_linear(tmp_path):
    x = random((2, 3, 5), seed=1)
    weight, bias = random((4, 5), seed=2), random((4,), seed=3)
    def body(x):
        return (mb.linear(x=x, weight=weight, bias=bias), mb.linear(x=x, weight=weight))
    with_bias, without_bias = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_allclose(with_bias, x @ weight.T + bias, **TOLERANCE)
    np.testing.assert_allclose(without_bias, x @ weight.T, **TOLERANCE)


@pytest.mark.parametrize(
    "x_shape, y_shape, transpose_x, transpose_y",
    [
        ((2, 3, 4), (4, 5), False, False),  # batch broadcast against a matrix
        ((2, 1, 3, 4), (3, 5, 4), False, True),
        ((4, 3), (2, 4, 5), True, False),
        ((4, 3), (5, 4), True, True),
    ],
)
def test_matmul(tmp_path, x_shape, y_shape, transpose_x, transpose_y):
    x, y = random(x_shape, seed=1), random(y_shape, seed=2)
    def body(x, y):
        return mb.matmul(x=x, y=y, transpose_x=transpose_x, transpose_y=transpose_y)
    (actual,) = run_mil(body, dict(x=x, y=y), tmp_path)
    def swap(a, flag):
        return np.swapaxes(a, -1, -2) if flag and a.ndim > 1 else a
    np.testing.assert_allclose(actual, np.matmul(swap(x, transpose_x), swap(y, transpose_y)), **TOLERANCE)


def test_products_of_float_and_int_operands(tmp_path):
    """iOS 17 lets matmul and linear mix float and int32 operands; the ints are taken as floats."""
    x = random((2, 3), seed=1)
    integers = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    weight = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    def body(x):
        return (
            mb.matmul(x=x, y=integers),
            mb.matmul(x=integers.T.copy(), y=x, transpose_y=True),
            mb.linear(x=x, weight=weight),
        )

    product, reversed_product, linear = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS17)
    np.testing.assert_allclose(product, x @ integers, **TOLERANCE)
    np.testing.assert_allclose(reversed_product, integers.T @ x.T, **TOLERANCE)
    np.testing.assert_allclose(linear, x @ weight.T, **TOLERANCE)


@pytest.mark.parametrize(
    "equation, a_shape, b_shape",
    [
        ("nchw,nwhu->nchu", (2, 3, 4, 5), (2, 5, 4, 6)),
        ("nchw,nwhu->nchu", (1, 3, 4, 5), (2, 5, 1, 6)),  # size-1 batch dims broadcast
        ("chw,whr->chr", (3, 4, 5), (5, 4, 2)),
        ("bkhc,bchq->bkhq", (2, 3, 4, 5), (2, 5, 4, 6)),  # the same product with other letters
    ],
)
def test_einsum(tmp_path, equation, a_shape, b_shape):
    a, b = random(a_shape, seed=1), random(b_shape, seed=2)
    (actual,) = run_mil(lambda a, b: mb.einsum(values=(a, b), equation=equation), dict(a=a, b=b), tmp_path)
    inputs, output = equation.split("->")
    left, right = inputs.split(",")
    # Broadcast size-1 batch dims by hand, as NumPy's einsum does not.
    sizes = {}
    for letters, array in ((left, a), (right, b)):
        for letter, size in zip(letters, array.shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    a = np.broadcast_to(
        a, [sizes[letter] if letter not in right or letter in output else size for letter, size in zip(left, a.shape)]
    )
    b = np.broadcast_to(
        b, [sizes[letter] if letter not in left or letter in output else size for letter, size in zip(right, b.shape)]
    )
    np.testing.assert_allclose(actual, np.einsum(equation, a, b), **TOLERANCE)


def test_scaled_dot_product_attention(tmp_path):
    q, k, v = random((2, 3, 4, 8), seed=1), random((2, 3, 6, 8), seed=2), random((2, 3, 6, 5), seed=3)
    mask = random((4, 6), seed=4)

    def body(q, k, v, mask):
        return (
            mb.scaled_dot_product_attention(query=q, key=k, value=v),
            mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask),
            mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mb.greater(x=mask, y=0.0)),
        )

    plain, float_mask, bool_mask = run_mil(body, dict(q=q, k=k, v=v, mask=mask), tmp_path, target=ct.target.iOS18)

    def attention(extra):
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(8) + extra
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        return weights / weights.sum(-1, keepdims=True) @ v

    np.testing.assert_allclose(plain, attention(0), **TOLERANCE)
    np.testing.assert_allclose(float_mask, attention(mask), **TOLERANCE)
    np.testing.assert_allclose(bool_mask, attention(np.where(mask > 0, 0, -np.inf)), **TOLERANCE)


def normalized(x, axes, epsilon):
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon)


@pytest.mark.parametrize("axes", [[-1], [2, 3], [1], [3, 1], [-3, 3]])
def test_layer_norm(tmp_path, axes):
    x = random((2, 3, 4, 5), seed=1)
    reduce = tuple(sorted(a % 4 for a in axes))
    gamma_shape = tuple(x.shape[d] for d in reduce)  # x's normalised dims, in x's order
    gamma, beta = random(gamma_shape, seed=2), random(gamma_shape, seed=3)

    def body(x):
        return (mb.layer_norm(x=x, axes=axes, gamma=gamma, beta=beta, epsilon=1e-3), mb.layer_norm(x=x, axes=axes))

    affine, plain = run_mil(body, dict(x=x), tmp_path)
    shape = [x.shape[d] if d in reduce else 1 for d in range(4)]
    g, b = gamma.reshape(shape), beta.reshape(shape)
    np.testing.assert_allclose(affine, normalized(x, reduce, 1e-3) * g + b, **TOLERANCE)
    np.testing.assert_allclose(plain, normalized(x, reduce, 1e-5), **TOLERANCE)


def test_instance_batch_and_l2_norm(tmp_path):
    x = random((2, 3, 4, 5), seed=1)
    gamma, beta = random((3,), seed=2), random((3,), seed=3)
    mean, variance = random((3,), seed=4), random((3,), seed=5, low=0.5, high=2)

    def body(x):
        return (
            mb.instance_norm(x=x, gamma=gamma, beta=beta, epsilon=1e-3),
            mb.batch_norm(x=x, mean=mean, variance=variance, gamma=gamma, beta=beta, epsilon=1e-3),
            mb.l2_norm(x=x, epsilon=1e-6),
            mb.l2_norm(x=mb.reshape(x=x, shape=[3, 4, 10])),
        )

    instance, batch, l2, l2_rank3 = run_mil(body, dict(x=x), tmp_path)

    def channel(v):
        return v.reshape(1, 3, 1, 1)

    np.testing.assert_allclose(instance, normalized(x, (2, 3), 1e-3) * channel(gamma) + channel(beta), **TOLERANCE)
    expected_batch = (x - channel(mean)) / np.sqrt(channel(variance) + 1e-3) * channel(gamma) + channel(beta)
    np.testing.assert_allclose(batch, expected_batch, **TOLERANCE)
    np.testing.assert_allclose(l2, x / np.sqrt((x**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-6), **TOLERANCE)
    np.testing.assert_allclose(l2_rank3, x.reshape(3, 4, 10) / np.sqrt((x**2).sum() + 1e-6), **TOLERANCE)


REDUCTIONS = {
    "reduce_sum": np.sum,
    "reduce_mean": np.mean,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x**2, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x**2, axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}


@pytest.mark.parametrize("axes, keep_dims", [(None, False), ([1], True), ([-1, 0], False), ([0, 2], True)])
def test_reductions(tmp_path, axes, keep_dims):
    x = random((3, 4, 5), seed=1, low=0.5, high=1.5)  # positive, so that log_sum is defined
    extra = {} if axes is None else dict(axes=axes)

    def body(x):
        return tuple(getattr(mb, name)(x=x, keep_dims=keep_dims, **extra) for name in REDUCTIONS)

    outputs = run_mil(body, dict(x=x), tmp_path)
    axis = None if axes is None else tuple(axes)
    for name, actual in zip(REDUCTIONS, outputs):
        expected = REDUCTIONS[name](x.astype(np.float64), axis=axis, keepdims=keep_dims)
        np.testing.assert_allclose(actual, expected, **TOLERANCE, err_msg=name)


@pytest.mark.parametrize("axis, keep_dims", [(-1, False), (0, True), (1, False)])
def test_argmax_argmin_take_the_first_extremum(tmp_path, axis, keep_dims):
    x = np.round(random((4, 5, 3), seed=1, low=0, high=3))  # few distinct values: many ties

    def body(x):
        return (
            mb.reduce_argmax(x=x, axis=axis, keep_dims=keep_dims),
            mb.reduce_argmin(x=x, axis=axis, keep_dims=keep_dims),
        )

    argmax, argmin = run_mil(body, dict(x=x), tmp_path)
    expected_max, expected_min = np.argmax(x, axis=axis), np.argmin(x, axis=axis)
    if keep_dims:
        expected_max, expected_min = np.expand_dims(expected_max, axis), np.expand_dims(expected_min, axis)
    np.testing.assert_array_equal(argmax, expected_max)
    np.testing.assert_array_equal(argmin, expected_min)
    assert argmax.dtype == np.int32
