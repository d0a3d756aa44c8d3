"""The reference executor: runs a saved ML Program (`.mlpackage`) with PyTorch, where Core ML's
predict() is unavailable (anything but macOS). It is the runtime's non-macOS backend and the
converter's validator.

The package's spec and MIL program (weights included) are read by coremltools' own loader; each MIL
op is evaluated by a small function in the op table (`ops/`, one module per MIL op family), in
program order, with each value released after its last use.

Numerics (`precision="float16"`, the default) follow a float16 Core ML device:
* every value the program types fp16 is held in float16 between ops, so a result beyond float16's
  range becomes inf, and NaN follows, where the device's would;
* convolutions, matrix products, reductions, normalisations and softmax receive their float16
  inputs widened to float32 and compute in float32, as Core ML accumulates wider; elementwise ops
  are evaluated per element in float32. Either way the result is rounded to float16 once, at the
  op's output.
`precision="float32"` holds every fp16-typed value in float32 instead, to tell float16 rounding and
overflow apart from conversion errors. Inputs and outputs keep the dtypes of the model description.
"""
from .metrics import psnr
from .model import ReferenceModel, default_device
from .program import UnsupportedOperationError

__all__ = ["ReferenceModel", "UnsupportedOperationError", "default_device", "psnr"]
