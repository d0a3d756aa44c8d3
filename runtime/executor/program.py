"""Compile a MIL function into a list of PyTorch steps, and run it.

Compilation happens once, at load: constants (weights included) become tensors of their declared
dtype, `constexpr_*` ops are decompressed, attribute inputs become Python values, and each op
becomes a step (`steps.py`) that reads its tensor inputs from a slot list, calls the op's function
from the table, casts its outputs to their declared dtypes and clears the slots whose last reader it
is, so that a value's memory is released as soon as nothing needs it. Attention chains become one
step that runs them a block of queries at a time (`fusion.py`); elementwise ops whose input nothing
else reads write into its memory (`inplace.py`).

Float16 weights stay float16 in memory; an op that computes in float32 widens them when it runs.
Widening them once at load would hold the weights three times over (float16 + float32 copies: 4.8
GiB for SD's Unet instead of 1.6), to save a few percent of a run's time.
"""
from dataclasses import dataclass

import numpy as np
import torch
from coremltools.converters.mil.mil import types

from . import ops  # noqa: F401  (fills the op table)
from .control_flow import BLOCK_STEPS, CompiledBlock
from .fusion import BlockedAttention, attention_chain
from .inplace import write_in_place
from .registry import OpImplementation, implementation_for
from .steps import Argument, OpStep, Output, Widened, python_value

PRECISIONS = ("float16", "float32")

# Integer types that PyTorch has no kernels for are held in the narrowest wider type it computes
# with: every value is represented exactly, and the op's output cast keeps results in the type.
_TORCH_DTYPES = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "int4": torch.int8,
    "uint32": torch.int64,
    "uint16": torch.int32,
    "uint8": torch.uint8,
    "uint6": torch.uint8,
    "uint4": torch.uint8,
    "uint3": torch.uint8,
    "uint2": torch.uint8,
    "uint1": torch.uint8,
    "bool": torch.bool,
}


class UnsupportedOperationError(NotImplementedError):
    """A program uses a MIL op that the executor's op table lacks."""


def all_operations(block):
    """Every op of a block, those of nested blocks (control flow) after the op holding them."""
    for op in block.operations:
        yield op
        for nested in op.blocks:
            yield from all_operations(nested)


def check_supported(function, source: str) -> None:
    """Raise UnsupportedOperationError naming every op type of `function` (its nested blocks
    included) that has no implementation."""
    missing = sorted(
        {
            op.op_type
            for op in all_operations(function)
            if op.op_type != "const" and op.op_type not in BLOCK_STEPS and implementation_for(op) is None
        }
    )
    if missing:
        raise UnsupportedOperationError(
            f"{source} uses MIL op{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
            "which the reference executor does not implement"
        )


def _mil_dtype(var) -> str:
    return types.builtin_to_string(var.dtype)


@dataclass(frozen=True)
class Numerics:
    """How MIL element types are held: float16 values stay float16 unless precision is float32."""

    precision: str
    device: torch.device

    def dtype(self, var) -> torch.dtype | None:
        """None for lists and states, which are held as Python objects (see ops/lists.py, ops/state.py)."""
        if types.is_list(var.sym_type) or types.is_state(var.sym_type):
            return None
        name = _mil_dtype(var)
        if name == "fp16" and self.precision == "float32":
            return torch.float32
        if name not in _TORCH_DTYPES:
            raise UnsupportedOperationError(f"values of MIL type {name} ({var.name}) are not supported")
        return _TORCH_DTYPES[name]

    def compute_dtype(self, var, implementation: OpImplementation) -> torch.dtype | None:
        """The dtype an op receives `var` in: float16 is widened for ops that accumulate in float32."""
        dtype = self.dtype(var)
        return torch.float32 if implementation.widen and dtype == torch.float16 else dtype


class CompiledFunction:
    """A MIL function as a callable: dict of input tensors -> dict of output tensors."""

    def __init__(self, function, precision: str, device: torch.device, source: str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        check_supported(function, source)
        self.numerics = Numerics(precision, device)
        self._constants: dict[str, object] = {}  # var name -> value as loaded (NumPy / str / scalar)
        self._tensors: dict[str, torch.Tensor] = {}
        self._slots: dict[str, int] = {}
        self.input_slots = {
            name: (self._slot(var), self.numerics.dtype(var))
            for name, var in function.inputs.items()
            if not types.is_state(var.sym_type)
        }
        self.state_slots = {name: self._slot(var) for name, var in function.inputs.items()
                            if types.is_state(var.sym_type)}
        self.steps = self._compile_operations(function.operations, function.outputs)
        self.output_slots = [(var.name, self._output_source(var)) for var in function.outputs]
        self._release_after_last_use()
        outputs = {slot for _, slot in self.output_slots if isinstance(slot, int)}
        self.in_place_steps = write_in_place(self.steps, keep=outputs)
        # The steps hold what they need; the load-time copies can go.
        self._constants.clear()
        self._tensors.clear()

    # --- compilation ---

    def _slot(self, var) -> int:
        return self._slots.setdefault(var.name, len(self._slots))

    def _compile_operations(self, operations, outputs) -> list:
        chains = {}
        for op in operations:
            if op.op_type == "softmax":
                chain = attention_chain(op, outputs)
                if chain is not None:
                    chains.update({chain.scores.name: chain, op.name: chain, chain.output.name: chain})
        steps, pending = [], {}
        for op in operations:
            if op.op_type == "const":
                self._constants[op.outputs[0].name] = op.outputs[0].val
                continue
            if op.op_type in BLOCK_STEPS:
                steps.append(self._compile_block_op(op))
                continue
            implementation = implementation_for(op)
            if implementation.load_time:
                self._evaluate_at_load(op, implementation)
            elif op.name in chains:
                # The chain runs where its last op is: the values it reads all exist by then.
                pending[op.name] = self._compile_op(op, implementation)
                chain = chains[op.name]
                if op is chain.output:
                    parts = (pending.pop(chain.scores.name), pending.pop(chain.softmax.name), pending.pop(op.name))
                    steps.append(BlockedAttention(chain, *parts))
            else:
                steps.append(self._compile_op(op, implementation))
        return steps

    def _compile_block_op(self, op):
        arguments = [self._tensor_argument(var) for var in (op.loop_vars if op.op_type == "while_loop" else [op.pred])]
        blocks = [
            CompiledBlock(
                steps=self._compile_operations(block.operations, block.outputs),
                inputs=[self._slot(var) for var in block.inputs],
                outputs=[self._tensor_argument(var) for var in block.outputs],
            )
            for block in op.blocks
        ]
        return BLOCK_STEPS[op.op_type](op.op_type, op.name, arguments, blocks,
                                       [self._output(var) for var in op.outputs])

    def _evaluate_at_load(self, op, implementation: OpImplementation) -> None:
        arguments = {name: self._constants[var.name] for name, var in op.inputs.items()}
        results = implementation.function(**arguments)
        results = results if isinstance(results, tuple) else (results,)
        for var, value in zip(op.outputs, results):
            self._constants[var.name] = value

    def _compile_op(self, op, implementation: OpImplementation) -> OpStep:
        step = OpStep(op.op_type, op.name, implementation.function)
        for name, value in op.inputs.items():
            spec = op.input_spec.input_types[name]
            if isinstance(value, (list, tuple)):
                step.sequences[name] = [self._tensor_argument(var, implementation) for var in value]
            elif value.name in self._constants and spec.const and not types.is_float(value.dtype):
                step.bound[name] = python_value(self._constants[value.name])
            else:
                step.add_tensor(name, self._tensor_argument(value, implementation))
        step.outputs.extend(self._output(var) for var in op.outputs)
        return step

    def _output(self, var) -> Output:
        dtype = self.numerics.dtype(var)
        shape = tuple(var.shape) if dtype is not None and all(isinstance(d, int) for d in var.shape) else None
        return Output(self._slot(var), dtype, shape)

    def _tensor_argument(self, var, implementation: OpImplementation | None = None) -> Argument:
        """A constant tensor or a runtime value's slot, marked Widened where the op computes wider."""
        widen = (implementation is not None
                 and self.numerics.compute_dtype(var, implementation) != self.numerics.dtype(var))
        if var.name in self._constants:
            constant = self._constant_tensor(var)
            return Widened(constant) if widen else constant
        slot = self._slot(var)
        return Widened(slot) if widen else slot

    def _constant_tensor(self, var) -> torch.Tensor:
        if var.name not in self._tensors:
            value = np.asarray(self._constants[var.name])
            if value.dtype == np.uint16 or value.dtype == np.uint32:
                value = value.astype(np.int64)
            # ascontiguousarray makes a 0-d array 1-d; a scalar constant keeps its shape ().
            tensor = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
            self._tensors[var.name] = tensor.to(self.numerics.device, self.numerics.dtype(var))
        return self._tensors[var.name]

    def _output_source(self, var) -> "int | torch.Tensor":
        if var.name in self._constants:
            return self._constant_tensor(var)
        return self._slot(var)

    def _release_after_last_use(self) -> None:
        """Give each step the slots it reads or writes for the last time (function outputs stay)."""
        keep = {slot for _, slot in self.output_slots if isinstance(slot, int)}
        last_use = {slot: -1 for slot in [slot for slot, _ in self.input_slots.values()]
                    + list(self.state_slots.values())}
        for index, step in enumerate(self.steps):
            for slot in step.slots_used():
                last_use[slot] = index
        releases: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot not in keep:
                releases.setdefault(index, []).append(slot)
        self.unused_inputs = releases.pop(-1, [])
        for index, step in enumerate(self.steps):
            step.release = releases.get(index, [])

    # --- execution ---

    def __call__(self, inputs: dict[str, torch.Tensor], states: dict | None = None) -> dict[str, torch.Tensor]:
        """`states` maps each state input's name to its StateCell (ops/state.py), which the run updates."""
        env: list[torch.Tensor | None] = [None] * len(self._slots)
        for name, (slot, _) in self.input_slots.items():
            env[slot] = inputs[name]
        for name, slot in self.state_slots.items():
            env[slot] = states[name]
        for slot in self.unused_inputs:
            env[slot] = None
        for step in self.steps:
            step(env)
        return {name: env[source] if isinstance(source, int) else source for name, source in self.output_slots}
