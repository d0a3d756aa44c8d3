"""Attention chains (matmul -> softmax -> matmul) run a block of queries at a time: same results as
the formula and as the unfused ops, and chains that must not be split are left alone."""
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from coreml_sd.runtime.executor import ReferenceModel, fusion

from executor_testing import mil_program, random, save_program


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few queries, so that these small chains are split into many blocks."""
    monkeypatch.setattr(fusion, "BLOCK_ELEMENTS", 64)


def softmax(x, axis):
    exp = np.exp(x - x.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def run(body, inputs, tmp_path, precision="float16"):
    model = ReferenceModel(save_program(mil_program(body, inputs), tmp_path), precision=precision)
    outputs = model.predict(inputs)
    fused = sum(step.op_type == "attention" for step in model._function.steps)
    return [outputs[name] for name in model.output_description], fused


# Channels-first keys/queries/values as split_einsum lays them out: [B, C, T].
def split_einsum_layout(k, q, v):
    """(probabilities, output)"""
    probabilities = mb.softmax(x=mb.matmul(x=k, y=q, transpose_x=True), axis=1)  # [B, keys, queries]
    return probabilities, mb.matmul(x=v, y=probabilities)  # [B, C, queries]


def split_einsum_formula(k, q, v):
    return v @ softmax(np.swapaxes(k, -1, -2) @ q, axis=1)


# Heads and tokens-first as diffusers' attention: [B, H, T, C].
def original_layout(q, k, v):
    probabilities = mb.softmax(x=mb.matmul(x=q, y=k, transpose_y=True), axis=-1)  # [B, H, queries, keys]
    return probabilities, mb.matmul(x=probabilities, y=v)


def original_formula(q, k, v):
    return softmax(q @ np.swapaxes(k, -1, -2), axis=-1) @ v


# Probabilities transposed into the second product: contracts P's last axis from the right.
def transposed_probabilities_layout(q, k, v):
    probabilities = mb.softmax(x=mb.matmul(x=k, y=q, transpose_y=True), axis=-2)  # [B, keys, queries]
    return probabilities, mb.matmul(x=v, y=probabilities, transpose_x=True)  # v: [B, keys, C]


def transposed_probabilities_formula(q, k, v):
    return np.swapaxes(v, -1, -2) @ softmax(k @ np.swapaxes(q, -1, -2), axis=-2)


LAYOUTS = {
    "split_einsum": (split_einsum_layout, split_einsum_formula, [(2, 8, 24), (2, 8, 30), (2, 6, 24)]),
    "original": (original_layout, original_formula, [(2, 3, 30, 8), (2, 3, 24, 8), (2, 3, 24, 5)]),
    "transposed": (
        transposed_probabilities_layout,
        transposed_probabilities_formula,
        [(1, 30, 8), (1, 24, 8), (1, 24, 5)],
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_chain_matches_the_formula(tmp_path, layout):
    body, formula, shapes = LAYOUTS[layout]
    inputs = {name: random(shape, seed=i) for i, (name, shape) in enumerate(zip("abc", shapes))}
    (actual,), fused = run(lambda a, b, c: body(a, b, c)[1], inputs, tmp_path, precision="float32")
    assert fused == 1
    np.testing.assert_allclose(actual, formula(*inputs.values()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_float16_chain_matches_the_unfused_ops(tmp_path, layout):
    body, _, shapes = LAYOUTS[layout]
    inputs = {name: random(shape, seed=i, dtype=np.float16) for i, (name, shape) in enumerate(zip("abc", shapes))}
    (fused_result,), fused = run(lambda a, b, c: body(a, b, c)[1], inputs, tmp_path)

    # A second reader of the probabilities makes them a value of their own: the chain runs unfused.
    def unfused(a, b, c):
        return (lambda p, o: (o, mb.reduce_sum(x=p)))(*body(a, b, c))

    (unfused_result, _), not_fused = run(unfused, inputs, tmp_path)
    assert (fused, not_fused) == (1, 0)
    # Both round S, P and O to float16; float32 sums may differ in the last bit with the block shape.
    np.testing.assert_allclose(fused_result, unfused_result, rtol=2e-3, atol=1e-3)


def test_chains_that_cannot_be_split_run_unfused(tmp_path):
    k, q, v = random((2, 8, 24), seed=1), random((2, 8, 30), seed=2), random((2, 8, 24), seed=3)

    def body(k, q, v):
        scores = mb.matmul(x=k, y=q, transpose_x=True)
        shared = mb.matmul(x=v, y=mb.softmax(x=scores, axis=1))  # scores are also read below
        wrong_axis = mb.matmul(
            x=mb.softmax(x=mb.matmul(x=q, y=k, transpose_x=True), axis=1), y=mb.transpose(x=v, perm=[0, 2, 1])
        )
        return shared, mb.reduce_sum(x=scores), wrong_axis

    (shared, total, wrong_axis), fused = run(body, dict(k=k, q=q, v=v), tmp_path, precision="float32")
    assert fused == 0
    scores = np.swapaxes(k, -1, -2) @ q
    np.testing.assert_allclose(shared, v @ softmax(scores, axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(total, scores.sum(), rtol=1e-4)
    expected = softmax(np.swapaxes(q, -1, -2) @ k, axis=1) @ np.swapaxes(v, -1, -2)
    np.testing.assert_allclose(wrong_axis, expected, rtol=1e-4, atol=1e-5)
