"""Attention chains, evaluated a block of queries at a time.

Every attention implementation the converter writes computes scores S = matmul(A, B), probabilities
P = softmax(S) over one of the scores' last two axes, and O = matmul(V, P) (or matmul(P, V)),
contracting that same axis. Along the scores' other axis (the queries) the elements are independent,
so the three ops can run on a block of queries at a time: the same ops with the same roundings to
each value's declared dtype, but S and P never exist whole. At 4096 tokens they are 2 x 4096 x 4096
values per head, and moving them between float16 and float32 through main memory costs more than
the matrix products; a block's stay in cache.
"""
import math
from dataclasses import dataclass

import torch

from .steps import OpStep, Output, Widened

BLOCK_ELEMENTS = 2**19  # scores per block: 2 MiB in float32


@dataclass(frozen=True)
class AttentionChain:
    """Where the query axis runs through the three ops (axes count from the end, -1 or -2)."""

    scores: object  # the MIL ops
    softmax: object
    output: object
    query_operand: str  # the scores matmul's input ("x" or "y") that holds the queries
    query_axis: int  # ... and its axis holding them
    probabilities_operand: str  # the output matmul's input that receives P
    output_axis: int  # the output's axis holding the queries


def _single_consumer(var, function_outputs) -> object | None:
    consumers = var.child_ops
    if len(consumers) != 1 or var in function_outputs:
        return None
    return consumers[0]


def _static(var) -> bool:
    return all(isinstance(d, int) for d in var.shape)


def attention_chain(softmax, function_outputs) -> AttentionChain | None:
    """The chain through `softmax`, if its input comes from a matmul and its output feeds one,
    each used nowhere else, and the output matmul contracts the softmax axis."""
    scores = softmax.x.op
    if scores is None or scores.op_type != "matmul" or _single_consumer(softmax.x, function_outputs) is not softmax:
        return None
    output = _single_consumer(softmax.outputs[0], function_outputs)
    if output is None or output.op_type != "matmul":
        return None
    probabilities = softmax.outputs[0]
    operands = [name for name in ("x", "y") if output.inputs[name] is probabilities]
    if len(operands) != 1:
        return None
    values = (scores.x, scores.y, output.inputs["x"], output.inputs["y"], output.outputs[0])
    if not all(_static(v) and len(v.shape) >= 2 for v in values):  # rank-1 operands have no query axis
        return None
    rank = len(probabilities.shape)
    axis = softmax.axis.val if softmax.axis is not None else -1
    axis = axis - rank if axis >= 0 else axis
    if axis not in (-1, -2):
        return None
    operand = operands[0]
    if _contracted_axis(output, operand) != axis:
        return None
    # The scores' last axis comes from y, the second-last from x; a transposed operand has them swapped.
    query_axis = -1 if axis == -2 else -2
    source = "y" if query_axis == -1 else "x"
    source_axis = query_axis if not _transposed(scores, source) else -3 - query_axis
    return AttentionChain(scores, softmax, output, source, source_axis, operand, -2 if operand == "x" else -1)


def _transposed(matmul, operand: str) -> bool:
    flag = matmul.inputs.get(f"transpose_{operand}")
    return bool(flag.val) if flag is not None else False


def _contracted_axis(matmul, operand: str) -> int:
    """matmul(x, y) contracts x's last axis with y's second-last; transposing an operand swaps them."""
    axis = -1 if operand == "x" else -2
    return -3 - axis if _transposed(matmul, operand) else axis


class BlockedAttention:
    """The three steps of an AttentionChain, evaluated a block of queries at a time."""

    op_type = "attention"

    def __init__(self, chain: AttentionChain, scores: OpStep, softmax: OpStep, output: OpStep):
        self.chain, self.scores, self.softmax, self.output = chain, scores, softmax, output
        self.name = output.name
        self.outputs: list[Output] = output.outputs
        self.release: list[int] = []
        internal = {scores.outputs[0].slot, softmax.outputs[0].slot}
        self._slots = [slot for step in (scores, output) for slot in step.slots_used() if slot not in internal]

    def slots_used(self) -> list[int]:
        return self._slots

    def __call__(self, env: list) -> None:
        chain = self.chain
        score_arguments = self.scores.arguments(env)
        output_arguments = self.output.arguments(env, skip=chain.probabilities_operand)
        queries = score_arguments[chain.query_operand]
        count = queries.shape[chain.query_axis]
        block = max(1, BLOCK_ELEMENTS * count // math.prod(self.scores.outputs[0].shape))
        (output,) = self.outputs
        result = torch.empty(output.shape, dtype=output.dtype, device=queries.device)
        widen_scores = isinstance(self.softmax.tensors["x"], Widened)
        widen_probabilities = isinstance(self.output.tensors[chain.probabilities_operand], Widened)
        for start in range(0, count, block):
            length = min(block, count - start)
            score_arguments[chain.query_operand] = queries.narrow(chain.query_axis, start, length)
            (scores,) = self.scores.results(score_arguments, check_shapes=False)
            softmax_arguments = dict(self.softmax.bound, x=scores.float() if widen_scores else scores)
            (probabilities,) = self.softmax.results(softmax_arguments, check_shapes=False)
            output_arguments[chain.probabilities_operand] = (probabilities.float() if widen_probabilities
                                                             else probabilities)
            (block_result,) = self.output.results(output_arguments, check_shapes=False)
            target = result.narrow(chain.output_axis, start, length)
            if block_result.shape != target.shape:
                raise RuntimeError(f"executor bug: attention block of {self.name!r} has shape "
                                   f"{tuple(block_result.shape)}")
            target.copy_(block_result)
        env[output.slot] = result
        for slot in self.release:
            env[slot] = None
