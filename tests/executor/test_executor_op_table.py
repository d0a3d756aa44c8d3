"""The op table against coremltools' op registry: every MIL op of opsets iOS 13 to iOS 18 has an
implementation, and for each opset revision of an op, the implementation used for it accepts every
input that revision defines (a revision that adds inputs needs its own entry)."""
import inspect

from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

from coreml_sd.runtime.executor import program  # noqa: F401  (fills the op table)
from coreml_sd.runtime.executor.control_flow import BLOCK_STEPS
from coreml_sd.runtime.executor.registry import OP_TABLE, lookup

# Ops the table leaves out on purpose, and why.
OUTSIDE_THE_TABLE = {
    "const": "constants are read when a program is compiled",
    "_const_symbolic": "the builder's symbolic constant, never written into a program",
    "conv_quantized": "a layer of the neural-network backend, not an ML Program op (docs/executor.md)",
    **{op: "holds blocks, run by control_flow.py" for op in BLOCK_STEPS},
}


def test_every_mil_op_has_an_implementation():
    registered = set(SSAOpRegistry.core_ops) | {"coreml_update_state"}  # the one dialect op programs hold
    assert sorted(op for op in registered if op not in OP_TABLE and op not in OUTSIDE_THE_TABLE) == []


def test_each_opset_revision_of_an_op_is_served_by_an_implementation_taking_its_inputs():
    mismatches = []
    for op_type, revisions in SSAOpRegistry.core_ops.items():
        if op_type in OUTSIDE_THE_TABLE:
            continue
        for version, definition in revisions.items():
            implementation = lookup(op_type, version)
            parameters = inspect.signature(implementation.function).parameters
            inputs = [name for name in definition.input_spec.input_types if not name.startswith("_")]
            missing = [name for name in inputs if name not in parameters]
            if missing:
                mismatches.append(f"{op_type} at {version.name}: {missing}")
    assert mismatches == []
