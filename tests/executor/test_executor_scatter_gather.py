"""iOS 17's index rules for scatters and gathers, against NumPy: with `validate_indices` any index
outside [0, size) fails the prediction; without it, iOS 17 scatters drop the updates whose indices
are outside (negative ones included), while iOS 15's count negative indices from the end."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

DATA = np.arange(12, dtype=np.float32).reshape(4, 3)
UPDATES = random((3, 3), seed=1)


def _scatter(directory, indices: np.ndarray, target, validate: bool | None = None) -> np.ndarray:
    def body(data, indices, updates):
        arguments = dict(validate_indices=validate) if validate is not None else {}
        return mb.scatter(data=data, indices=indices, updates=updates, mode="add", **arguments)

    (result,) = run_mil(
        body, dict(data=DATA, indices=indices, updates=UPDATES), directory, precision="float32", target=target
    )
    return result


def test_ios17_scatter_drops_updates_at_indices_outside_the_data(tmp_path):
    indices = np.array([-1, 2, 7], np.int32)
    expected = DATA.copy()
    expected[2] += UPDATES[1]  # only index 2 lies in [0, 4)
    np.testing.assert_array_equal(_scatter(tmp_path, indices, ct.target.iOS17), expected)


def test_ios15_scatter_counts_negative_indices_from_the_end(tmp_path):
    indices = np.array([-1, 2, 0], np.int32)
    expected = DATA.copy()
    np.add.at(expected, [3, 2, 0], UPDATES)
    np.testing.assert_array_equal(_scatter(tmp_path, indices, ct.target.iOS16), expected)


@pytest.mark.parametrize("index", [-1, 4])
def test_validate_indices_fails_a_prediction_with_an_index_outside_the_data(tmp_path, index):
    indices = np.array([0, index, 1], np.int32)
    with pytest.raises(IndexError, match=rf"index {index} is out of bounds \[0, 4\)"):
        _scatter(tmp_path, indices, ct.target.iOS17, validate=True)

    def gather(x, indices):
        return mb.gather(x=x, indices=indices, axis=0, validate_indices=True)

    with pytest.raises(IndexError, match=rf"index {index} is out of bounds \[0, 4\)"):
        run_mil(gather, dict(x=DATA, indices=indices), tmp_path, precision="float32", target=ct.target.iOS17)
