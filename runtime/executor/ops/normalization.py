"""MIL normalisations (coremltools `ops/defs/iOS15/normalization.py`), computed in float32.

Variances are population variances (divided by N, as in PyTorch's norms).
"""
import torch
import torch.nn.functional as F

from ..registry import register


@register("layer_norm", widen=True)
def layer_norm(
    x: torch.Tensor,
    axes: list[int] | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    epsilon: torch.Tensor | None = None,
) -> torch.Tensor:
    """gamma * (x - mean) / sqrt(var + epsilon) + beta, statistics over `axes` (default: all).

    gamma and beta have the shape of x's normalised dims, in x's order.
    """
    eps = 1e-5 if epsilon is None else float(epsilon)
    rank = x.dim()
    axes = list(range(rank)) if axes is None else sorted(a % rank for a in axes)
    # PyTorch normalises trailing dims: move the normalised dims to the end, in order, and back.
    order = [d for d in range(rank) if d not in axes] + axes
    moved = x.permute(order)
    result = F.layer_norm(moved, moved.shape[rank - len(axes):], gamma, beta, eps)
    return result.permute([order.index(d) for d in range(rank)])


@register("instance_norm", widen=True)
def instance_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    epsilon: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise each (sample, channel) of x [N, C, *D] over its spatial dims; gamma, beta [C]."""
    eps = 1e-5 if epsilon is None else float(epsilon)
    return F.instance_norm(x, weight=gamma, bias=beta, eps=eps)


@register("batch_norm", widen=True)
def batch_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    epsilon: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference batch norm with the given per-channel (axis 1) mean and variance."""
    eps = 1e-5 if epsilon is None else float(epsilon)
    return F.batch_norm(x, mean, variance, weight=gamma, bias=beta, training=False, eps=eps)


@register("l2_norm", widen=True)
def l2_norm(x: torch.Tensor, epsilon: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(sum(x^2) + epsilon), the sum over the last three dims (the leading ones are batch)."""
    eps = 1e-6 if epsilon is None else float(epsilon)
    sum_of_squares = torch.sum(x * x, dim=(-3, -2, -1), keepdim=True)
    return x / torch.sqrt(sum_of_squares + eps)


@register("local_response_norm", widen=True)
def local_response_norm(
    x: torch.Tensor,
    size: int,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> torch.Tensor:
    """x / (k + alpha / size * sum of x^2 over `size` neighbouring channels)^beta; the window runs
    from size // 2 channels before to (size - 1) // 2 after, as in PyTorch."""
    alpha = 1e-4 if alpha is None else float(alpha)
    beta = 0.75 if beta is None else float(beta)
    k = 1.0 if k is None else float(k)
    return F.local_response_norm(x, size, alpha, beta, k)
