"""cond, while_loop, lists and iOS 18 states against plain Python / NumPy evaluations of the same
programs. Float32 programs reproduce NumPy's float32 arithmetic op for op, so they must agree exactly;
the float16 state is checked against NumPy's float16 rounding of each update."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.runtime.executor import ReferenceModel

from executor_testing import random, run_mil, save_program


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond_returns_the_outputs_of_the_branch_its_predicate_picks(tmp_path, sign):
    x = sign * np.abs(random((3, 4), seed=1))

    def body(x):
        positive = mb.greater(x=mb.reduce_sum(x=x), y=np.float32(0))
        return mb.cond(
            pred=positive,
            _true_fn=lambda: (mb.add(x=mb.mul(x=x, y=np.float32(2)), y=np.float32(1)), mb.reduce_max(x=x, axes=[1])),
            _false_fn=lambda: (mb.exp(x=x), mb.reduce_min(x=x, axes=[1])),
        )

    first, second = run_mil(body, dict(x=x), tmp_path, precision="float32")
    expected = (x * np.float32(2) + np.float32(1), x.max(axis=1)) if x.sum() > 0 else (np.exp(x), x.min(axis=1))
    np.testing.assert_allclose(first, expected[0], rtol=1e-6)
    np.testing.assert_array_equal(second, expected[1])


def _newton_square_root(a: np.ndarray, iterations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    estimate, count = np.ones_like(a), np.zeros(1, np.float32)
    while count[0] < iterations[0]:
        estimate = np.float32(0.5) * (estimate + a / estimate)
        count = count + np.float32(1)
    return estimate, count


@pytest.mark.parametrize("iterations", [0.0, 1.0, 6.0])
def test_while_loop_carries_its_values_as_a_python_loop_does(tmp_path, iterations):
    a, n = np.abs(random((5,), seed=2)) + np.float32(0.5), np.array([iterations], np.float32)

    def body(a, n):
        return mb.while_loop(
            _cond=lambda estimate, count: mb.less(x=count, y=n),
            _body=lambda estimate, count: (
                mb.mul(x=mb.add(x=estimate, y=mb.real_div(x=a, y=estimate)), y=np.float32(0.5)),
                mb.add(x=count, y=np.float32(1)),
            ),
            loop_vars=(np.ones(5, np.float32), np.zeros(1, np.float32)),
        )

    estimate, count = run_mil(body, dict(a=a, n=n), tmp_path, precision="float32")
    expected_estimate, expected_count = _newton_square_root(a, n)
    np.testing.assert_array_equal(estimate, expected_estimate)
    np.testing.assert_array_equal(count, expected_count)
    if iterations == 6.0:
        np.testing.assert_allclose(estimate, np.sqrt(a), rtol=1e-6)


def test_nested_while_loops_read_values_of_the_enclosing_scopes(tmp_path):
    """total = sum over i < n of sum over j < i of j * w, the inner loop reading w and the outer i."""
    n, w = np.array([5], np.float32), random((3,), seed=3)

    def body(n, w):
        def outer_body(i, total):
            inner_total, _ = mb.while_loop(
                _cond=lambda partial, j: mb.less(x=j, y=i),
                _body=lambda partial, j: (mb.add(x=partial, y=mb.mul(x=w, y=j)), mb.add(x=j, y=np.float32(1))),
                loop_vars=(np.zeros(3, np.float32), np.zeros(1, np.float32)),
            )
            return mb.add(x=i, y=np.float32(1)), mb.add(x=total, y=inner_total)

        _, total = mb.while_loop(
            _cond=lambda i, total: mb.less(x=i, y=n),
            _body=outer_body,
            loop_vars=(np.zeros(1, np.float32), np.zeros(3, np.float32)),
        )
        return total

    (total,) = run_mil(body, dict(n=n, w=w), tmp_path, precision="float32")
    expected = np.zeros(3, np.float32)
    for i in range(5):
        partial = np.zeros(3, np.float32)
        for j in range(i):
            partial = partial + w * np.float32(j)
        expected = expected + partial
    np.testing.assert_array_equal(total, expected)


def test_a_list_filled_in_a_loop_gathers_what_was_written(tmp_path):
    """Row i is x * i for i < n; the list starts one element long and grows as it is written."""
    x, n = random((4,), seed=4), np.array([3], np.int32)

    def body(x, n):
        rows = mb.make_list(init_length=1, elem_shape=(4,))
        _, filled = mb.while_loop(
            _cond=lambda i, rows: mb.less(x=i, y=mb.squeeze(x=n)),
            _body=lambda i, rows: (
                mb.add(x=i, y=1),
                mb.list_write(ls=rows, index=i, value=mb.mul(x=x, y=mb.cast(x=i, dtype="fp32"))),
            ),
            loop_vars=(0, rows),
        )
        length = mb.list_length(ls=filled)
        return mb.list_gather(ls=filled, indices=mb.range_1d(start=0, end=length, step=1)), length

    rows, length = run_mil(body, dict(x=x, n=n), tmp_path, precision="float32")
    np.testing.assert_array_equal(rows, np.stack([x * np.float32(i) for i in range(3)]))
    assert int(length) == 3


def test_list_elements_never_written_read_as_zeros_and_older_lists_keep_their_values(tmp_path):
    a, b = random((2,), seed=5), random((2, 2), seed=6)

    def body(a, b):
        empty = mb.make_list(init_length=2, elem_shape=(2,))
        written = mb.list_write(ls=empty, index=0, value=a)
        grown = mb.list_scatter(ls=written, indices=[4, 1], value=b)  # past the end: the list grows
        return (
            mb.list_read(ls=empty, index=0),
            mb.list_gather(ls=grown, indices=[0, 1, 3, 4]),
            mb.list_length(ls=grown),
        )

    before, gathered, length = run_mil(body, dict(a=a, b=b), tmp_path, precision="float32")
    np.testing.assert_array_equal(before, np.zeros(2, np.float32))
    np.testing.assert_array_equal(gathered, np.stack([a, b[1], np.zeros(2, np.float32), b[0]]))
    assert int(length) == 5


def test_a_list_of_fixed_length_refuses_a_write_past_its_end(tmp_path):
    a = random((2,), seed=7)

    def body(a):
        fixed = mb.make_list(init_length=2, dynamic_length=False, elem_shape=(2,))
        return mb.list_read(ls=mb.list_write(ls=fixed, index=2, value=a), index=0)

    with pytest.raises(IndexError, match="fixed length 2"):
        run_mil(body, dict(a=a), tmp_path, precision="float32")


@pytest.fixture
def accumulator(tmp_path) -> ReferenceModel:
    """total += x in a float16 state; returns the new total times two."""

    @mb.program(
        input_specs=[mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def program(total, x):
        updated = mb.coreml_update_state(state=total, value=mb.add(x=mb.read_state(input=total), y=x))
        return mb.mul(x=updated, y=np.float16(2))

    return ReferenceModel(save_program(program, tmp_path, target=ct.target.iOS18))


def test_a_state_carries_its_updates_from_one_prediction_to_the_next(accumulator):
    (name,) = accumulator.state_description
    inputs = [random((2, 3), seed=seed, dtype=np.float16) for seed in range(4)]
    state, total = accumulator.make_state(), np.zeros((2, 3), np.float16)
    for x in inputs:
        (output,) = accumulator.predict({"x": x}, state).values()
        total = (total.astype(np.float32) + x.astype(np.float32)).astype(np.float16)
        np.testing.assert_array_equal(state.read(name), total)
        np.testing.assert_array_equal(output, (total.astype(np.float32) * 2).astype(np.float16))
    fresh = accumulator.make_state()
    np.testing.assert_array_equal(fresh.read(name), np.zeros((2, 3), np.float16))
    (output,) = accumulator.predict({"x": inputs[0]}, fresh).values()
    np.testing.assert_array_equal(output, (inputs[0].astype(np.float32) * 2).astype(np.float16))


def test_a_stateful_model_needs_a_state(accumulator):
    with pytest.raises(ValueError, match=r"has states \(.*\): pass state=model.make_state\(\)"):
        accumulator.predict({"x": np.zeros((2, 3), np.float16)})
