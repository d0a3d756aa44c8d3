"""MIL activation ops (coremltools `ops/defs/iOS15/activation.py`)."""
import math

import torch
import torch.nn.functional as F

from ..registry import register


@register("relu")
def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


@register("relu6")
def relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0, 6)


@register("sigmoid")
def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


@register("silu")
def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return F.silu(x)


@register("softplus")
def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x))."""
    return F.softplus(x)


@register("softsign")
def softsign(x: torch.Tensor) -> torch.Tensor:
    """x / (1 + |x|)."""
    return F.softsign(x)


@register("gelu")
def gelu(x: torch.Tensor, mode: str = "EXACT") -> torch.Tensor:
    """EXACT: 0.5 x (1 + erf(x / sqrt 2)); TANH_APPROXIMATION: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
    SIGMOID_APPROXIMATION: x sigmoid(1.702 x)."""
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r} is not a MIL gelu mode")


@register("softmax", widen=True)
def softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return torch.softmax(x, dim=axis)


@register("elu")
def elu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x if x > 0 else alpha (e^x - 1)."""
    return torch.where(x > 0, x, alpha * torch.expm1(x))


@register("leaky_relu")
def leaky_relu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x if x >= 0 else alpha x."""
    return torch.where(x >= 0, x, alpha * x)


@register("prelu")
def prelu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """leaky_relu with one alpha per channel (axis 1 of a rank >= 3 input)."""
    return torch.where(x > 0, x, _per_channel(alpha, x) * x)


@register("linear_activation")
def linear_activation(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """alpha x + beta."""
    return alpha * x + beta


@register("scaled_tanh")
def scaled_tanh(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """alpha tanh(beta x)."""
    return alpha * torch.tanh(beta * x)


@register("sigmoid_hard")
def sigmoid_hard(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """min(max(alpha x + beta, 0), 1)."""
    return torch.clamp(alpha * x + beta, 0, 1)


@register("clamped_relu")
def clamped_relu(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """min(beta, x) if x >= 0 else min(beta, alpha x)."""
    return torch.minimum(beta, torch.where(x >= 0, x, alpha * x))


@register("thresholded_relu")
def thresholded_relu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x if x >= alpha else 0."""
    return torch.where(x >= alpha, x, torch.zeros_like(x))


@register("softplus_parametric")
def softplus_parametric(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """alpha_c log(1 + e^(beta_c x)), alpha and beta per channel (axis 1)."""
    return _per_channel(alpha, x) * F.softplus(_per_channel(beta, x) * x)


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast along axis 1 of x."""
    return values.reshape((1, -1) + (1,) * (x.dim() - 2))
