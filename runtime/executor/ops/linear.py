"""MIL matrix products (coremltools `ops/defs/iOS15/linear.py`), accumulated in float32."""
import torch
import torch.nn.functional as F

from ..registry import register


def _common_dtype(*tensors: torch.Tensor | list | None) -> list[torch.Tensor | None]:
    """iOS 17 lets the operands of a product differ in type (float and int): integers are taken
    as the floating-point type of the other operand. (An int32 constant weight arrives as a list,
    as every non-float constant input does.)"""
    device = next(t.device for t in tensors if isinstance(t, torch.Tensor))
    tensors = [torch.tensor(t, device=device) if isinstance(t, list) else t for t in tensors]
    floating = next((t.dtype for t in tensors if t is not None and t.is_floating_point()), None)
    if floating is None:
        return list(tensors)
    return [t.to(floating) if t is not None and t.dtype != floating else t for t in tensors]


@register("linear", widen=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [*D, D_in] @ weight[D_out, D_in]^T + bias [D_out]."""
    if not isinstance(weight, torch.Tensor) or x.dtype != weight.dtype:
        x, weight, bias = _common_dtype(x, weight, bias)
    if not x.is_floating_point():  # PyTorch's linear has no integer kernel
        result = torch.matmul(x, weight.T)
        return result if bias is None else result + bias
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
    if x.dtype != y.dtype:
        x, y = _common_dtype(x, y)
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
