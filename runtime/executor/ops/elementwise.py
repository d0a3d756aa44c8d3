"""Elementwise MIL ops: binary arithmetic and comparisons (NumPy broadcasting), unary math, cast.

float16 tensors are passed to PyTorch as they are: its float16 kernels evaluate each element in
float32 and round once, which is what an fp16 device does for a single elementwise op.
"""
import torch

from ..registry import register

# --- binary ops: NumPy broadcasting, output dtype as the program declares ---

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": torch.true_divide,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    # MIL floor_div and mod round toward negative infinity (Python's // and %), as do these.
    "floor_div": torch.floor_divide,
    "mod": torch.remainder,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}


def _binary(function):
    def apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return function(x, y)

    return apply


for _name, _function in _BINARY.items():
    register(_name)(_binary(_function))

# --- unary ops without parameters ---

_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "logical_not": torch.logical_not,
}


def _unary(function):
    def apply(x: torch.Tensor) -> torch.Tensor:
        return function(x)

    return apply


for _name, _function in _UNARY.items():
    register(_name)(_unary(_function))


@register("round")
def round_(x: torch.Tensor) -> torch.Tensor:
    """Halfway cases round to even (MIL follows numpy.round)."""
    return torch.round(x)


@register("log")
def log(x: torch.Tensor, epsilon: torch.Tensor | None = None) -> torch.Tensor:
    """log(x + epsilon); MIL's default epsilon is 1e-45, which float16 flushes to 0."""
    return torch.log(x + _epsilon(epsilon, 1e-45, x))


@register("rsqrt")
def rsqrt(x: torch.Tensor, epsilon: torch.Tensor | None = None) -> torch.Tensor:
    """1 / sqrt(x + epsilon), default epsilon 1e-12."""
    return torch.rsqrt(x + _epsilon(epsilon, 1e-12, x))


@register("inverse")
def inverse(x: torch.Tensor, epsilon: torch.Tensor | None = None) -> torch.Tensor:
    """1 / (x + epsilon), default epsilon 1e-4."""
    return torch.reciprocal(x + _epsilon(epsilon, 1e-4, x))


def _epsilon(epsilon: torch.Tensor | None, default: float, x: torch.Tensor) -> torch.Tensor:
    """The epsilon in x's dtype: MIL's default is a constant of the input's type."""
    if epsilon is None:
        return torch.tensor(default, dtype=x.dtype, device=x.device)
    return epsilon.to(x.dtype)


@register("clip")
def clip(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """min(max(x, alpha), beta)."""
    return torch.minimum(torch.maximum(x, alpha), beta)


@register("threshold")
def threshold(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """max(x, alpha)."""
    return torch.maximum(x, alpha)


@register("cast")
def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The conversion itself is the output cast every op gets (see registry): float to int truncates
    toward zero, as coremltools' reference (NumPy's astype) does."""
    return x


@register("identity")
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@register("select")
def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where cond is true (non-zero), else b; all three broadcast."""
    return torch.where(cond.bool(), a, b)
