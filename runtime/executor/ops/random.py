"""MIL random sampling (coremltools `ops/defs/iOS15/random.py`).

`seed` -1 (the default) draws from PyTorch's global generator, so results differ from run to run
unless the caller seeds PyTorch; any other seed draws from a generator seeded with it, created
afresh on every call, so a fixed seed gives the same numbers on every prediction. The numbers
follow each op's distribution but are not the ones Core ML draws for the same seed: Apple's
generator is not published. Samples are drawn on the CPU and then moved to the op's device, so that
a seed gives the same numbers on every device.
"""
import torch

from ..registry import register


def _generator(seed: int) -> torch.Generator | None:
    return None if seed == -1 else torch.Generator().manual_seed(seed)


def _dims(shape: torch.Tensor) -> list[int]:
    return [int(d) for d in shape.tolist()]


@register("random_bernoulli")
def random_bernoulli(shape: torch.Tensor, prob: torch.Tensor | float = 0.5, seed: int = -1) -> torch.Tensor:
    """1 with probability `prob`, else 0, for each element of a tensor of `shape`."""
    probabilities = torch.full(_dims(shape), float(prob))
    return torch.bernoulli(probabilities, generator=_generator(seed)).to(shape.device)


@register("random_normal")
def random_normal(
    shape: torch.Tensor, mean: torch.Tensor | float = 0.0, stddev: torch.Tensor | float = 1.0, seed: int = -1
) -> torch.Tensor:
    """Samples of N(mean, stddev²) in a tensor of `shape`."""
    standard = torch.randn(_dims(shape), generator=_generator(seed))
    return (float(mean) + float(stddev) * standard).to(shape.device)


@register("random_uniform")
def random_uniform(
    shape: torch.Tensor, low: torch.Tensor | float = 0.0, high: torch.Tensor | float = 1.0, seed: int = -1
) -> torch.Tensor:
    """Samples of the uniform distribution on [low, high) in a tensor of `shape` (low everywhere
    when high == low)."""
    low, high = torch.as_tensor(low).cpu(), torch.as_tensor(high).cpu()
    unit = torch.rand(_dims(shape), generator=_generator(seed))
    samples = (low.float() + (high.float() - low.float()) * unit).to(low.dtype)
    # Rounding to the output's dtype can reach `high`; the interval excludes it.
    return torch.minimum(samples, torch.nextafter(high, low)).to(shape.device)


@register("random_categorical")
def random_categorical(x: torch.Tensor, mode: str = "logits", size: int = 1, seed: int = -1) -> torch.Tensor:
    """`size` class indices drawn with replacement from each distribution along x's last dim,
    given as log-probabilities up to a constant (`mode="logits"`) or as probabilities up to a
    factor (`mode="probs"`); the result has x's shape with the last dim replaced by `size`."""
    classes = x.shape[-1]
    weights = torch.softmax(x.float(), dim=-1) if mode == "logits" else x.float()
    drawn = torch.multinomial(weights.reshape(-1, classes).cpu(), size, replacement=True, generator=_generator(seed))
    return drawn.reshape(*x.shape[:-1], size).to(x.device)
