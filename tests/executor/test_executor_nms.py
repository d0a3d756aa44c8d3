"""non_maximum_suppression against a NumPy reference written from the MIL definition (float32 programs)."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import run_mil


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x centre, y centre, width, height) boxes."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.astype(np.float64), b.astype(np.float64)
    overlap_x = max(0.0, min(ax + aw / 2, bx + bw / 2) - max(ax - aw / 2, bx - bw / 2))
    overlap_y = max(0.0, min(ay + ah / 2, by + bh / 2) - max(ay - ah / 2, by - bh / 2))
    intersection = overlap_x * overlap_y
    return intersection / (aw * ah + bw * bh - intersection)


def nms_reference(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    """One batch element: kept indices, best first. Boxes score their best class; those below
    score_threshold go; the rest, by descending score, are kept unless they overlap a kept box (of
    their class, per_class) by IoU > iou_threshold; no survivor keeps the best box anyway."""
    best, label = scores.max(axis=1), scores.argmax(axis=1)
    kept = []
    for i in sorted(range(len(best)), key=lambda i: (-best[i], i)):
        if best[i] < score_threshold or len(kept) == max_boxes:
            continue
        if all(iou(boxes[i], boxes[j]) <= iou_threshold or (per_class and label[i] != label[j]) for j in kept):
            kept.append(i)
    return kept or [int(best.argmax())]


def padded(boxes, scores, kept, max_boxes):
    """The op's outputs for one batch element: zeros and -1 after the kept boxes."""
    out_boxes, out_scores = np.zeros((max_boxes, 4)), np.zeros((max_boxes, scores.shape[1]))
    indices = np.full(max_boxes, -1)
    out_boxes[: len(kept)], out_scores[: len(kept)], indices[: len(kept)] = boxes[kept], scores[kept], kept
    return out_boxes, out_scores, indices


def clustered_boxes(seed: int, batch: int, count: int, classes: int):
    """Boxes in a few overlapping clusters, so that suppression has work to do; distinct scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 10, (batch, 3, 2))[:, rng.integers(0, 3, count)] + rng.normal(0, 0.6, (batch, count, 2))
    boxes = np.concatenate([centres, rng.uniform(1, 3, (batch, count, 2))], axis=-1).astype(np.float32)
    scores = rng.permutation(batch * count * classes).reshape(batch, count, classes).astype(np.float32) / 10
    return boxes, scores


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("score_quantile, max_boxes", [(0.5, 4), (0.0, 20), (1.1, 3)])
def test_non_maximum_suppression(tmp_path, per_class, score_quantile, max_boxes):
    boxes, scores = clustered_boxes(0, batch=2, count=14, classes=3)
    score_threshold = float(np.quantile(scores.max(-1), min(score_quantile, 1.0))) + (
        1.0 if score_quantile > 1 else 0.0
    )

    def body(boxes, scores):
        return mb.non_maximum_suppression(
            boxes=boxes,
            scores=scores,
            iou_threshold=0.2,
            score_threshold=score_threshold,
            max_boxes=max_boxes,
            per_class_suppression=per_class,
        )

    out_boxes, out_scores, indices, counts = run_mil(
        body, dict(boxes=boxes, scores=scores), tmp_path, target=ct.target.iOS15
    )
    for b in range(2):
        kept = nms_reference(boxes[b], scores[b], 0.2, score_threshold, max_boxes, per_class)
        expected_boxes, expected_scores, expected_indices = padded(boxes[b], scores[b], kept, max_boxes)
        np.testing.assert_array_equal(indices[b], expected_indices)
        np.testing.assert_array_equal(out_boxes[b], expected_boxes)
        np.testing.assert_array_equal(out_scores[b], expected_scores)
        assert counts[b] == len(kept)


def test_non_maximum_suppression_boxes_last(tmp_path):
    """iOS 17's revision: boxes [n, 4, B], scores [n, K, B], no score threshold and no count."""
    boxes, scores = clustered_boxes(1, batch=2, count=14, classes=2)

    def body(boxes, scores):
        return mb.non_maximum_suppression(boxes=boxes, scores=scores, iou_threshold=0.3, max_boxes=10)

    inputs = dict(boxes=boxes.transpose(0, 2, 1).copy(), scores=scores.transpose(0, 2, 1).copy())
    out_boxes, out_scores, indices = run_mil(body, inputs, tmp_path, target=ct.target.iOS17)
    for b in range(2):
        kept = nms_reference(boxes[b], scores[b], 0.3, -np.inf, 10, per_class=False)
        assert 1 < len(kept) < 10
        expected_boxes, expected_scores, expected_indices = padded(boxes[b], scores[b], kept, 10)
        np.testing.assert_array_equal(indices[b], expected_indices)
        np.testing.assert_array_equal(out_boxes[b], expected_boxes.T)
        np.testing.assert_array_equal(out_scores[b], expected_scores.T)
