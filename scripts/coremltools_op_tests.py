#!/usr/bin/env python3
"""Run coremltools' own MIL op tests (shipped in its wheel, `converters/mil/mil/ops/tests/iOS14..iOS18`)
against the reference executor, and print a per-test-class table and the pass rate as JSON.

The tests build a program, convert it and hand it to `compare_backend`, which on a Mac predicts with
Core ML and compares with the tests' expected outputs; everywhere else it does nothing. Here it is
replaced: the converted model is saved, loaded with the executor and run, and its outputs are
compared as a Mac compares Core ML's (same tolerances, widened for the float16 backend). Both
ML Program backends run, float16 and float32; the neural-network backend is out of scope.

Each case ends as one of
  pass         the executor ran it and matched the expected outputs
  wrong        the executor ran it and its numbers or shapes differ
  fp16-data    (float32 backend) the executor's numbers differ, on a program that holds float16
               values (inputs, weights, outputs): such tests compute their expected outputs from the
               unrounded float32 data, which the program does not hold, and compare at the float32
               tolerance (1e-4); computing on the values the program holds cannot meet them (docs/executor.md).
               coremltools' own runs include these cases only on request (INCLUDE_MIL_FP32_UNIT_TESTS)
  unsupported  the executor refused the program at load (an op or type it does not implement)
  error        the executor raised while loading or running it
  skipped      skipped or expected to fail by the test itself, or it checks no prediction, or it
               failed before reaching the executor (listed with --failures: the test's own checks
               of the program, or conversion)
The pass rate is pass / (pass + wrong + fp16-data + unsupported + error); the rate without fp16-data
leaves those cases out of the count.

    python scripts/coremltools_op_tests.py                     # everything (about an hour on 2 cores)
    python scripts/coremltools_op_tests.py -k "TestConv and not Transpose" iOS17/test_conv.py
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path

# The tests read which backends to run when their package is imported.
os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
os.environ.setdefault("INCLUDE_MIL_FP32_UNIT_TESTS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

OUTCOMES = ("pass", "wrong", "fp16-data", "unsupported", "error", "skipped")


class ExecutorMismatch(AssertionError):
    """The executor's outputs differ from the test's expected outputs."""


class Float16DataMismatch(ExecutorMismatch):
    """A float32-backend mismatch on a program holding float16 values."""


class ExecutorFailure(RuntimeError):
    """The executor raised while loading or running a converted program."""


class ExecutorRefusal(RuntimeError):
    """The executor refused a converted program at load."""


def tests_directory() -> Path:
    import coremltools

    return Path(coremltools.__file__).parent / "converters" / "mil" / "mil" / "ops" / "tests"


class HarnessState:
    """What `MLModel.make_state()` returns here: the executor's state, made at the first prediction
    (each prediction loads the model afresh; the state outlives those loads)."""

    model_state = None


def executor_predict(mlmodel, inputs: dict, state: HarnessState | None = None) -> dict:
    """Save `mlmodel`, load it with the executor and predict, casting inputs as Core ML does."""
    from coreml_sd.runtime.executor import ReferenceModel, UnsupportedOperationError

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.mlpackage"
        mlmodel.save(str(path))
        try:
            model = ReferenceModel(path, device="cpu")
        except UnsupportedOperationError as error:
            raise ExecutorRefusal(str(error)) from error
        except Exception as error:
            raise ExecutorFailure(f"load: {type(error).__name__}: {error}") from error
    cast = {}
    for name, value in inputs.items():
        value = np.asarray(value)
        if value.shape == ():
            value = value.reshape(1)
        cast[name] = value.astype(model.input_description[name][1]) if name in model.input_description else value
    try:
        if state is not None and state.model_state is None:
            state.model_state = model.make_state()
        return model.predict(cast, state.model_state if state is not None else None)
    except Exception as error:
        # Worded as Core ML's failed prediction: tests that expect one (invalid indices) match its words.
        raise ExecutorFailure(f"Unable to compute the prediction using ML Program (executor: {type(error).__name__}: "
                              f"{error})") from error


def compare_backend(
    mlmodel,
    input_key_values,
    expected_outputs,
    dtype="fp32",
    atol=1e-04,
    rtol=1e-05,
    also_compare_shapes=True,
    state=None,
    allow_mismatch_ratio=0.0,
):
    """coremltools' compare_backend with the executor in Core ML's place (the Mac branch's checks)."""
    prediction = executor_predict(mlmodel, dict(input_key_values), state)
    if dtype == "fp16":
        atol, rtol = max(atol * 100.0, 5e-1), max(rtol * 100.0, 5e-2)
    for name, expected in expected_outputs.items():
        actual = prediction[_output_name(prediction, name)]
        expected = np.asarray(expected)
        if (also_compare_shapes and actual.shape != expected.shape
                and not (expected.shape == () and actual.shape == (1,))):
            raise ExecutorMismatch(f"output {name}: shape {actual.shape}, expected {expected.shape}")
        mismatched = ~np.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
        if mismatched.sum() > allow_mismatch_ratio * max(expected.size, 1):
            error = (np.max(np.abs(actual.astype(np.float64) - expected)) if actual.shape == expected.shape
                     else float("nan"))
            # Worded as NumPy's assert_allclose on a Mac: tests that expect a mismatch match its words.
            message = (f"Not equal to tolerance rtol={rtol}, atol={atol}: output {name}: "
                       f"{mismatched.sum()} of {expected.size} differ (max |error| {error:.3g})")
            if dtype == "fp32" and _holds_float16(mlmodel):
                step = float(np.spacing(np.float16(np.max(np.abs(expected)))))
                raise Float16DataMismatch(f"{message}; one float16 step of the largest expected value is {step:.3g}")
            raise ExecutorMismatch(message)
    return prediction


def _holds_float16(mlmodel) -> bool:
    """Whether any value of the converted program (nested blocks included) is typed float16."""
    from coremltools.converters.mil.mil import types

    def block_holds(block) -> bool:
        inputs = block.inputs.values() if isinstance(block.inputs, dict) else block.inputs  # a function's are named
        return any(var.dtype == types.fp16 for var in inputs) or any(
            any(getattr(var, "dtype", None) == types.fp16 for var in op.outputs)
            or any(block_holds(b) for b in op.blocks)
            for op in block.operations
        )

    program = getattr(mlmodel, "_mil_program", None)
    return program is not None and any(block_holds(function) for function in program.functions.values())


def _output_name(prediction: dict, name: str) -> str:
    if name in prediction:
        return name
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    return NameSanitizer._replace_invalid_char_with_underscore(name)


class ExecutorPlugin:
    """Puts the executor behind the tests' predictions and records each case's outcome."""

    def __init__(self, sample: int = 1):
        self.cases: dict[str, dict] = {}
        self.sample = sample

    def pytest_collection_modifyitems(self, config, items):
        """Keep one case in `sample`, chosen by a hash of its id (the same cases every run)."""
        if self.sample > 1:
            items[:] = [item for item in items if zlib.crc32(item.nodeid.encode()) % self.sample == 0]

    def pytest_configure(self, config):
        from coremltools.converters.mil import testing_utils
        from coremltools.converters.mil.mil.ops.tests import testing_utils as op_testing_utils
        from coremltools.models import MLModel

        testing_utils.compare_backend = compare_backend
        op_testing_utils.compare_backend = compare_backend
        MLModel.predict = lambda model, data, state=None: executor_predict(model, data, state)
        MLModel.make_state = lambda model: HarnessState()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = _outcome(report, call)
            broken = outcome == "skipped" and report.failed  # failed before reaching the executor
            self.cases[item.nodeid] = dict(
                group=_group(item), backend=_backend(item), outcome=outcome, detail=_detail(call), broken=broken
            )


def _group(item) -> str:
    return item.cls.__name__ if item.cls is not None else item.name.split("[")[0]


def _backend(item) -> str:
    backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
    precision = getattr(backend, "precision", None) or (backend[1] if isinstance(backend, tuple) else None)
    return precision or "-"


def _outcome(report, call) -> str:
    if report.skipped or hasattr(report, "wasxfail"):
        return "skipped"
    if report.passed:
        # A case passes only if a prediction was compared; the executor marks that by being called.
        return "pass" if _EXECUTED.pop(report.nodeid, False) else "skipped"
    error = call.excinfo.value if call.excinfo is not None else None
    if isinstance(error, Float16DataMismatch):
        return "fp16-data"
    if isinstance(error, ExecutorMismatch):
        return "wrong"
    if isinstance(error, ExecutorRefusal):
        return "unsupported"
    if isinstance(error, ExecutorFailure):
        return "error"
    return "skipped"  # the test failed before reaching the executor


def _detail(call) -> str:
    if call.excinfo is None:
        return ""
    return (f"{call.excinfo.typename}: {str(call.excinfo.value).splitlines()[0][:300]}" if str(call.excinfo.value)
            else call.excinfo.typename)


_EXECUTED: dict[str, bool] = {}


def _mark_executed(function):
    def wrapper(*args, **kwargs):
        current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        _EXECUTED[current] = True
        return function(*args, **kwargs)

    return wrapper


executor_predict = _mark_executed(executor_predict)


def summarise(cases: dict[str, dict]) -> dict:
    table: dict[str, Counter] = defaultdict(Counter)
    totals: dict[str, Counter] = defaultdict(Counter)
    for case in cases.values():
        table[case["group"]][case["outcome"]] += 1
        totals[case["backend"]][case["outcome"]] += 1
        totals["all"][case["outcome"]] += 1

    def rate(counts: Counter, leave_out: tuple[str, ...] = ()) -> float | None:
        runnable = sum(counts[o] for o in OUTCOMES if o != "skipped" and o not in leave_out)
        return round(counts["pass"] / runnable, 4) if runnable else None

    return dict(
        totals={
            backend: dict(
                **{o: counts[o] for o in OUTCOMES},
                pass_rate=rate(counts),
                pass_rate_without_fp16_data=rate(counts, leave_out=("fp16-data",)),
            )
            for backend, counts in sorted(totals.items())
        },
        per_group={group: {o: counts[o] for o in OUTCOMES if counts[o]} for group, counts in sorted(table.items())},
        failures={
            nodeid: f"{'failed before the executor' if c['broken'] else c['outcome']}: {c['detail']}"
            for nodeid, c in sorted(cases.items())
            if c["outcome"] in ("wrong", "fp16-data", "unsupported", "error") or c["broken"]
        },
    )


def print_table(summary: dict, stream=sys.stderr) -> None:
    print(f"{'test class':40s} " + " ".join(f"{o:>11s}" for o in OUTCOMES), file=stream)
    for group, counts in summary["per_group"].items():
        print(f"{group:40s} " + " ".join(f"{counts.get(o, 0):11d}" for o in OUTCOMES), file=stream)


def run(pytest_arguments: list[str], sample: int = 1) -> dict:
    import coreml_sd.runtime.executor  # noqa: F401  (the op table as it is now, whatever changes later)

    plugin = ExecutorPlugin(sample)
    directory = tests_directory()
    arguments = [a if a.startswith("-") or not a.startswith("iOS") else str(directory / a) for a in pytest_arguments]
    if not any(not a.startswith("-") for a in arguments):
        arguments += [str(directory / f"iOS{v}") for v in (14, 15, 16, 17, 18)]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(directory), "-o", "addopts=", "--no-header",
                     "-rN", "--tb=no", *arguments], plugins=[plugin])
    return summarise(plugin.cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=1, metavar="N", help="run one case in N (a fixed selection)")
    parser.add_argument("--failures", type=Path, metavar="FILE", help="write every failing case, with its error, to "
                        "FILE (JSON)")
    parser.add_argument("pytest_arguments", nargs=argparse.REMAINDER, help="test files (relative to the tests folder) "
                        "and pytest options")
    options = parser.parse_args()
    summary = run(options.pytest_arguments, options.sample)
    print_table(summary)
    failures = summary.pop("failures")
    if options.failures:
        options.failures.write_text(json.dumps(failures, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
