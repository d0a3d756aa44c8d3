"""The random ops: samples against their distribution's moments, seeds, degenerate distributions.

Statistics are checked within 5 standard errors of the sample statistic (a fixed seed makes each
check deterministic; with another seed a correct sampler would fail one of them about once in 10^6).
"""
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb

from coreml_sd.runtime.executor import ReferenceModel

from executor_testing import mil_program, run_mil, save_program

SAMPLES = 20000
STANDARD_ERRORS = 5.0


def assert_mean(samples: np.ndarray, mean: float, variance: float, what: str) -> None:
    tolerance = STANDARD_ERRORS * np.sqrt(variance / samples.size)
    assert abs(samples.mean() - mean) <= tolerance, (
        f"{what}: mean {samples.mean():.4f}, expected {mean} ± {tolerance:.4f}"
    )


def assert_variance(samples: np.ndarray, variance: float, fourth_moment: float, what: str) -> None:
    # The sample variance's standard error is sqrt((mu4 - sigma^4) / n).
    tolerance = STANDARD_ERRORS * np.sqrt((fourth_moment - variance**2) / samples.size)
    assert abs(samples.var() - variance) < tolerance, (
        f"{what}: variance {samples.var():.4f}, expected {variance} ± {tolerance:.4f}"
    )


def test_samples_follow_their_distributions(tmp_path):
    logits = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, -3.0]], np.float32)
    probabilities = np.array([[0.1, 0.2, 0.3, 0.4], [2.0, 0.0, 1.0, 1.0]], np.float32)  # the second sums to 4

    def body(logits, probabilities):
        return (
            mb.random_normal(shape=np.array([SAMPLES], np.int32), mean=2.0, stddev=3.0, seed=5),
            mb.random_uniform(shape=np.array([SAMPLES], np.int32), low=-1.0, high=3.0, seed=6),
            mb.random_bernoulli(shape=np.array([SAMPLES], np.int32), prob=0.3, seed=7),
            mb.random_categorical(x=logits, size=SAMPLES, seed=8),
            mb.random_categorical(x=probabilities, mode="probs", size=SAMPLES, seed=9),
        )

    normal, uniform, bernoulli, from_logits, from_probabilities = (
        output.astype(np.float64)
        for output in run_mil(body, dict(logits=logits, probabilities=probabilities), tmp_path)
    )

    assert_mean(normal, 2.0, 9.0, "normal")
    assert_variance(normal, 9.0, 3 * 9.0**2, "normal")

    width = 4.0
    assert uniform.min() >= -1.0 and uniform.max() < 3.0
    assert_mean(uniform, 1.0, width**2 / 12, "uniform")
    assert_variance(uniform, width**2 / 12, width**4 / 80, "uniform")

    assert set(np.unique(bernoulli)) == {0.0, 1.0}
    assert_mean(bernoulli, 0.3, 0.3 * 0.7, "bernoulli")

    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    normalised = probabilities / probabilities.sum(axis=-1, keepdims=True)
    for drawn, expected, mode in ((from_logits, softmax, "logits"), (from_probabilities, normalised, "probs")):
        assert drawn.shape == (2, SAMPLES)
        for row in range(2):
            for index, p in enumerate(expected[row]):
                assert_mean(drawn[row] == index, p, p * (1 - p), f"categorical ({mode}) row {row} class {index}")


def test_a_seed_repeats_its_numbers_and_seed_minus_one_does_not(tmp_path):
    shape = np.array([1000], np.int32)

    def body(x):
        return (
            mb.random_normal(shape=shape, seed=11),
            mb.random_normal(shape=shape, seed=12),
            mb.random_normal(shape=shape),  # seed -1
            mb.random_categorical(x=x, size=1000, seed=11),
        )

    x = np.zeros((3, 5), np.float32)
    model = ReferenceModel(save_program(mil_program(body, dict(x=x)), tmp_path))
    first, second = model.predict(dict(x=x)), model.predict(dict(x=x))
    seeded, other_seed, unseeded, categorical = model.output_description
    np.testing.assert_array_equal(first[seeded], second[seeded])
    np.testing.assert_array_equal(first[categorical], second[categorical])
    assert not np.array_equal(first[seeded], first[other_seed])
    assert not np.array_equal(first[unseeded], second[unseeded])
    assert not np.array_equal(first[categorical][0], first[categorical][1])  # each distribution draws its own


def test_degenerate_distributions_give_their_single_value(tmp_path):
    shape = np.array([2, 3], np.int32)

    def body(x):
        return (
            mb.random_bernoulli(shape=shape, prob=0.0),
            mb.random_bernoulli(shape=shape, prob=1.0),
            mb.random_normal(shape=shape, mean=-1.5, stddev=0.0),
            mb.random_uniform(shape=shape, low=2.5, high=2.5),
            mb.random_categorical(x=x, mode="probs", size=50),
            mb.random_categorical(x=np.array([7.0], np.float32), size=4),  # one class
        )

    x = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]], np.float32)
    outputs = run_mil(body, dict(x=x), tmp_path)
    expected = [
        np.zeros((2, 3)),
        np.ones((2, 3)),
        np.full((2, 3), -1.5),
        np.full((2, 3), 2.5),
        np.stack([np.full(50, 2.0), np.full(50, 3.0)]),
        np.zeros(4),
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_array_equal(actual, wanted, err_msg=f"output {index}")


def test_float16_uniform_samples_stay_below_high(tmp_path):
    # Float16 has no value in (1 - 2^-11, 1): a float32 sample above 1 - 2^-12 rounds up to 1.
    def body():
        return mb.random_uniform(shape=np.array([SAMPLES], np.int32), low=np.float16(0.0), high=np.float16(1.0), seed=3)

    program = mb.program(input_specs=[], opset_version=ct.target.iOS16)(body)
    model = ReferenceModel(save_program(program, tmp_path))
    (samples,) = model.predict({}).values()
    assert samples.dtype == np.float16
    assert samples.min() >= 0.0 and samples.max() < 1.0
    assert samples.max() == np.float16(1.0) - np.float16(2.0**-11)
