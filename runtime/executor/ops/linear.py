"""MIL matrix products (coremltools `ops/defs/iOS15/linear.py`), accumulated in float32."""
import torch
import torch.nn.functional as F

from ..registry import register


@register("linear", widen=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [*D, D_in] @ weight[D_out, D_in]^T + bias [D_out]."""
    return F.linear(x, weight, bias)


@register("matmul", widen=True)
def matmul(
    x: torch.Tensor, y: torch.Tensor, transpose_x: bool = False, transpose_y: bool = False
) -> torch.Tensor:
    """NumPy matmul (rank-1 operands are promoted and the added dim removed, batch dims broadcast),
    after optionally swapping the last two dims of x and/or y (a no-op for rank 1)."""
    if transpose_x and x.dim() > 1:
        x = x.transpose(-1, -2)
    if transpose_y and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@register("einsum", widen=True)
def einsum(values: list[torch.Tensor], equation: str) -> torch.Tensor:
    """MIL accepts the batched-matmul equations "nchw,nwhu->nchu" and "chw,whr->chr" (any letters),
    with size-1 batch dims broadcast; torch.einsum evaluates them as written."""
    return torch.einsum(equation, *values)


@register("scaled_dot_product_attention", widen=True)
def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask marks the positions that take part (False
    becomes -inf), a float mask is added to the scores."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
