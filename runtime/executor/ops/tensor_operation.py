"""MIL ops that create or rearrange tensors by rule (coremltools `ops/defs/iOS15/tensor_operation.py`,
iOS 17's non_maximum_suppression)."""
import torch
from coremltools import target

from ..registry import register


@register("band_part")
def band_part(x: torch.Tensor, lower: int = -1, upper: int = -1) -> torch.Tensor:
    """Zero the elements of the innermost matrices outside the band i - j <= lower, j - i <= upper
    (a negative bound keeps that whole triangle)."""
    rows, columns = x.shape[-2:]
    i = torch.arange(rows, device=x.device).reshape(-1, 1)
    j = torch.arange(columns, device=x.device).reshape(1, -1)
    keep = torch.ones(rows, columns, dtype=torch.bool, device=x.device)
    if lower >= 0:
        keep &= i - j <= lower
    if upper >= 0:
        keep &= j - i <= upper
    return torch.where(keep, x, torch.zeros_like(x))


@register("cumsum", widen=True)
def cumsum(x: torch.Tensor, axis: int = 0, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
    """Running sum along `axis`; `exclusive` leaves out the current element, `reverse` runs from
    the end."""
    if reverse:
        x = torch.flip(x, dims=[axis])
    result = torch.cumsum(x, dim=axis)
    if exclusive:
        result = result - x
    return torch.flip(result, dims=[axis]) if reverse else result


@register("fill")
def fill(shape: torch.Tensor, value: torch.Tensor | int | bool = 0.0) -> torch.Tensor:
    """A tensor of `shape` holding `value` everywhere."""
    return torch.full(shape.tolist(), _scalar(value), device=shape.device)


@register("fill_like")
def fill_like(ref_tensor: torch.Tensor, value: torch.Tensor | int | bool = 0.0) -> torch.Tensor:
    """A tensor shaped like `ref_tensor` holding `value` everywhere."""
    return torch.full(ref_tensor.shape, _scalar(value), device=ref_tensor.device)


def _scalar(value):
    return value.item() if isinstance(value, torch.Tensor) else value


@register("range_1d")
def range_1d(end: torch.Tensor, start: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[start, start + step, ...) up to `end`, as numpy.arange."""
    return torch.arange(start.item(), end.item(), step.item(), device=end.device)


@register("shape")
def shape(x: torch.Tensor) -> torch.Tensor:
    """The shape of x as an int32 vector."""
    return torch.tensor(x.shape, dtype=torch.int32, device=x.device)


@register("one_hot")
def one_hot(
    indices: torch.Tensor,
    one_hot_vector_size: torch.Tensor,
    axis: int = -1,
    on_value: torch.Tensor | int = 1,
    off_value: torch.Tensor | int = 0,
) -> torch.Tensor:
    """A new dim at `axis` of size one_hot_vector_size: on_value at each index, off_value elsewhere."""
    size = int(one_hot_vector_size)
    hot = torch.nn.functional.one_hot(indices.long(), size)
    result = torch.where(hot.bool(), torch.as_tensor(_scalar(on_value)), torch.as_tensor(_scalar(off_value)))
    return torch.movedim(result, -1, axis % result.dim())


@register("topk")
def topk(
    x: torch.Tensor,
    k: int = 1,
    axis: int = -1,
    ascending: bool = False,
    sort: bool = True,
    return_indices: bool = True,
    output_indices_dtype: str = "int32",
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """The k largest (or smallest, `ascending`) values along `axis`, best first, and their indices
    unless return_indices is False."""
    values, indices = torch.topk(x, k, dim=axis, largest=not ascending, sorted=True)
    return (values, indices) if return_indices else values


@register("argsort")
def argsort(x: torch.Tensor, axis: int = -1, ascending: bool = False) -> torch.Tensor:
    """Indices that sort x along `axis` (descending unless `ascending`), ties in input order."""
    return torch.argsort(x, dim=axis, descending=not ascending, stable=True)


@register("non_zero")
def non_zero(x: torch.Tensor) -> torch.Tensor:
    """[N, rank(x)]: the coordinates of the N non-zero elements, in row-major order."""
    return torch.nonzero(x)


def _iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """[B, B] intersection over union of boxes [B, 4] given as (x centre, y centre, width, height)."""
    centres, sizes = boxes[:, :2], boxes[:, 2:].abs()
    low, high = centres - sizes / 2, centres + sizes / 2
    overlap = (torch.minimum(high[:, None], high[None]) - torch.maximum(low[:, None], low[None])).clamp(min=0)
    intersection = overlap.prod(dim=-1)
    area = sizes.prod(dim=-1)
    union = area[:, None] + area[None] - intersection
    return torch.where(union > 0, intersection / union, torch.zeros_like(union))


def _suppress(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
              max_boxes: int, per_class_suppression: bool) -> list[int]:
    """The indices one batch element keeps, best first (see non_maximum_suppression)."""
    best, classes = scores.max(dim=-1)
    order = torch.argsort(best, descending=True, stable=True).tolist()
    candidates = [i for i in order if best[i] >= score_threshold]
    overlaps = (_iou_matrix(boxes) > iou_threshold).tolist()
    classes = classes.tolist()
    kept = []
    for i in candidates:
        if len(kept) == max_boxes:
            break
        if not any(overlaps[i][j] and (classes[i] == classes[j] or not per_class_suppression) for j in kept):
            kept.append(i)
    return kept or order[:1]


@register("non_maximum_suppression", widen=True)
def non_maximum_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: torch.Tensor | float,
    score_threshold: torch.Tensor | float,
    max_boxes: int,
    per_class_suppression: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy NMS over each batch element of boxes [n, B, 4] ((x centre, y centre, width, height))
    and scores [n, B, K]. A box's score is its best class score, its class that class (the first
    on ties). Boxes scoring below score_threshold are dropped; the rest are visited by descending
    score, ties in box order, and a box is kept unless its IoU with a box already kept (of its
    class, with per_class_suppression) exceeds iou_threshold, until max_boxes are kept. When no box
    reaches score_threshold, the best-scoring box is kept anyway. Outputs, best first: the kept
    boxes [n, max_boxes, 4] and their score rows [n, max_boxes, K] padded with zeros, their indices
    [n, max_boxes] padded with -1, and how many were kept [n]."""
    batch, _, classes = scores.shape
    kept_boxes = boxes.new_zeros(batch, max_boxes, 4)
    kept_scores = scores.new_zeros(batch, max_boxes, classes)
    indices = torch.full((batch, max_boxes), -1, dtype=torch.int32, device=boxes.device)
    counts = torch.zeros(batch, dtype=torch.int32, device=boxes.device)
    for b in range(batch):
        kept = _suppress(boxes[b].float(), scores[b].float(), float(iou_threshold), float(score_threshold),
                         max_boxes, per_class_suppression)
        kept_boxes[b, : len(kept)] = boxes[b, kept]
        kept_scores[b, : len(kept)] = scores[b, kept]
        indices[b, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
        counts[b] = len(kept)
    return kept_boxes, kept_scores, indices, counts


@register("non_maximum_suppression", since=target.iOS17, widen=True)
def non_maximum_suppression_boxes_last(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: torch.Tensor | float,
    max_boxes: int,
    per_class_suppression: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """iOS 17's revision: boxes [n, 4, B] and scores [n, K, B] (boxes last), no score threshold;
    outputs boxes [n, 4, max_boxes], scores [n, K, max_boxes] and indices [n, max_boxes], padded as
    before, without the count."""
    kept_boxes, kept_scores, indices, _ = non_maximum_suppression(
        boxes.transpose(1, 2), scores.transpose(1, 2), iou_threshold, float("-inf"), max_boxes,
        per_class_suppression)
    return kept_boxes.transpose(1, 2), kept_scores.transpose(1, 2), indices
