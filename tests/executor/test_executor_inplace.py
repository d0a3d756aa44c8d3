"""Elementwise ops that write into an input nothing else reads (inplace.py): the values are those of
NumPy's float16 arithmetic, and a value that other ops still read, or that is a view of one, is never
overwritten."""
import numpy as np
from coremltools.converters.mil import Builder as mb

from coreml_sd.runtime.executor import ReferenceModel

from executor_testing import mil_program, random, save_program


def half(x):
    return np.asarray(x, np.float32).astype(np.float16)


def load(body, inputs, tmp_path):
    return ReferenceModel(save_program(mil_program(body, inputs), tmp_path))


def in_place_steps(model):
    return set(model._function.in_place_steps)


def test_in_place_only_where_the_input_has_no_other_reader(tmp_path):
    def body(x, y):
        doubled = mb.mul(x=x, y=np.float16(2), name="doubled")  # read by sum and by kept
        shifted = mb.add(x=doubled, y=y, name="shifted")  # doubled read again below: no in place
        kept = mb.sub(x=doubled, y=np.float16(1), name="kept")
        scaled = mb.mul(x=shifted, y=y, name="scaled")  # shifted has no other reader: in place
        activated = mb.silu(x=scaled, name="activated")  # in place
        return mb.add(x=activated, y=kept, name="total"), kept

    inputs = {"x": random((2, 3, 8), seed=1, dtype=np.float16), "y": random((2, 3, 8), seed=2, dtype=np.float16)}
    model = load(body, inputs, tmp_path)
    assert in_place_steps(model) >= {"scaled", "activated", "total"}
    assert not in_place_steps(model) & {"shifted", "kept"}
    x, y = (value.astype(np.float32) for value in inputs.values())
    doubled = half(x * 2)
    kept = half(doubled.astype(np.float32) - 1)
    scaled = half(half(doubled.astype(np.float32) + y).astype(np.float32) * y).astype(np.float32)
    activated = half(scaled / (1 + np.exp(-scaled)))
    expected = half(activated.astype(np.float32) + kept.astype(np.float32))
    outputs = model.predict(inputs)
    # Elementwise float16 ops round once per op: PyTorch's exp and NumPy's may differ by one float16 step.
    np.testing.assert_allclose(outputs["total"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(outputs["kept"], kept)


def test_a_view_of_a_value_keeps_its_numbers(tmp_path):
    """reshape returns a view: the value it views must not be overwritten while the view lives."""
    def body(x):
        doubled = mb.mul(x=x, y=np.float16(2), name="doubled")
        view = mb.reshape(x=doubled, shape=[6, 8], name="view")
        bumped = mb.add(x=doubled, y=np.float16(1), name="bumped")
        return bumped, mb.mul(x=view, y=np.float16(1), name="copy")

    inputs = {"x": random((2, 3, 8), seed=3, dtype=np.float16)}
    outputs = load(body, inputs, tmp_path).predict(inputs)
    doubled = half(inputs["x"].astype(np.float32) * 2)
    np.testing.assert_array_equal(outputs["copy"], doubled.reshape(6, 8))
    np.testing.assert_array_equal(outputs["bumped"], half(doubled.astype(np.float32) + 1))
