"""`cond` and `while_loop`: the MIL ops that hold blocks of ops.

They are not in the op table: a block is compiled like a function body (`program.py`) and the
step that runs it decides which block runs, and how often.

* `cond(pred)` runs its first block if the scalar `pred` is true, else its second, and returns that
  block's outputs.
* `while_loop(loop_vars)` binds the carried values to the inputs of its condition block and runs it;
  while its single boolean output is true, it binds them to the body block's inputs, runs the body,
  and carries the body's outputs into the next iteration. It returns the values carried last, so a
  condition false at entry returns `loop_vars` unchanged.

Blocks read values of the enclosing scopes through the same slot list. Slots are released only
by the outermost steps: a value read inside a loop body stays until the whole loop has run.
"""
from dataclasses import dataclass

from .steps import Argument, Output, read


@dataclass
class CompiledBlock:
    steps: list
    inputs: list[int]  # slots of the block's inputs (the values a loop carries)
    outputs: list[Argument]  # a slot, or a constant tensor

    def run(self, env: list) -> list:
        for step in self.steps:
            step(env)
        return [read(output, env) for output in self.outputs]

    def slots_used(self) -> list[int]:
        nested = [slot for step in self.steps for slot in step.slots_used()]
        return self.inputs + nested + [output for output in self.outputs if isinstance(output, int)]


class BlockStep:
    """What cond and while_loop share: their arguments, blocks and outputs."""

    def __init__(self, op_type: str, name: str, arguments: list[Argument], blocks: list[CompiledBlock],
                 outputs: list[Output]):
        self.op_type, self.name = op_type, name
        self.arguments, self.blocks, self.outputs = arguments, blocks, outputs
        self.release: list[int] = []

    def slots_used(self) -> list[int]:
        own = [a for a in self.arguments if isinstance(a, int)]
        return own + [slot for block in self.blocks for slot in block.slots_used()] + [o.slot for o in self.outputs]

    def __call__(self, env: list) -> None:
        for output, value in zip(self.outputs, self.evaluate(env)):
            env[output.slot] = output.cast(value)
        for slot in self.release:
            env[slot] = None


class CondStep(BlockStep):
    def evaluate(self, env: list) -> list:
        true_block, false_block = self.blocks
        (predicate,) = self.arguments
        return (true_block if bool(read(predicate, env)) else false_block).run(env)


class WhileLoopStep(BlockStep):
    def evaluate(self, env: list) -> list:
        condition, body = self.blocks
        values = [read(argument, env) for argument in self.arguments]
        while True:
            for slot, value in zip(condition.inputs, values):
                env[slot] = value
            (proceed,) = condition.run(env)
            if not bool(proceed):
                return values
            for slot, value in zip(body.inputs, values):
                env[slot] = value
            values = body.run(env)


BLOCK_STEPS = {"cond": CondStep, "while_loop": WhileLoopStep}
