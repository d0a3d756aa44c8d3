"""A fast slice of coremltools' own MIL op tests run against the executor (scripts/coremltools_op_tests.py
runs them all): every case of the slice that reaches the executor must match the tests' expected
outputs within their tolerances, in the float16 and float32 backends."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "coremltools_op_tests.py"
SLICE = [
    "--sample", "24",
    "iOS14/test_scatter_gather.py",
    "iOS14/test_image_resizing.py::TestCropResize",
    "iOS15/test_image_resizing.py",
    "iOS16/test_tensor_transformation.py",
    "iOS17/test_quantization.py",
    "iOS17/test_image_resizing.py",
    "iOS14/test_control_flow.py",
    "iOS18/test_states.py",
]


def test_slice_of_coremltools_op_tests_passes(tmp_path):
    failures = tmp_path / "failures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--failures", str(failures), *SLICE], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    totals = json.loads(result.stdout)["totals"]
    listed = json.loads(failures.read_text())
    assert {case: why for case, why in listed.items() if not why.startswith("failed before the executor")} == {}
    for backend in ("fp16", "fp32"):
        assert totals[backend]["pass"] >= 5, totals  # the slice does exercise both backends
        assert totals[backend]["pass_rate"] == 1.0, totals
