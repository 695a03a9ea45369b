"""Per-sample overlap metrics: Dice, IoU, precision and recall of binary masks (spec C.10, B.4).

Empty-mask rule (the AnoFPDM protocol, spec C.10 and E.6), stated here once and in every docstring:
every ratio is smoothed with ``delta = 1e-6`` in numerator and denominator, so

- an **empty prediction on an empty ground truth scores 1** (a healthy slice predicted healthy is perfect);
- a non-empty prediction on an empty ground truth, or an empty prediction on a non-empty ground truth,
  scores ``delta / (count + delta)``, i.e. about 0.

On two non-empty masks the values equal the un-smoothed definitions up to ~1e-6 relative (checked against
``sklearn.metrics.f1_score`` / ``jaccard_score`` in the tests). Every ``MetricReport`` carries
``EMPTY_CONVENTION`` so a reader of a results table knows which rule produced it.

Masks are ``[B, ...]`` (typically ``[B,1,H,W]``), bool or 0/1, torch or numpy; counts are taken over all
non-batch dimensions. Results are float64, one value per sample, in the input's framework.
"""

from __future__ import annotations

import numpy as np

from anomalydiff.metrics._arrays import ArrayLike, as_bool_mask, check_same_shape, like_input, per_sample

#: Smoothing constant of the official AnoFPDM evaluation (``scripts/evaluate.py``), spec C.10.
DICE_DELTA: float = 1e-6
#: The empty-mask rule every report states (spec C.10: empty prediction on empty ground truth scores 1).
EMPTY_CONVENTION: str = "empty-vs-empty=1"


def overlap_counts(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample pixel counts ``|P ∩ G|``, ``|P|`` and ``|G|``.

    Args:
        pred: ``[B, ...]`` predicted binary masks (bool or 0/1).
        gt: ``[B, ...]`` ground-truth binary masks, same shape.

    Returns:
        ``(intersection, pred_size, gt_size)``, each a float64 numpy array ``[B]``.
    """
    p = as_bool_mask(pred, "pred")
    g = as_bool_mask(gt, "gt")
    check_same_shape(p, g, "pred", "gt")
    p2, g2 = per_sample(p, "pred"), per_sample(g, "gt")
    intersection = np.count_nonzero(p2 & g2, axis=1).astype(np.float64)
    return intersection, np.count_nonzero(p2, axis=1).astype(np.float64), np.count_nonzero(g2, axis=1).astype(
        np.float64
    )


def dice_from_counts(
    intersection: np.ndarray, pred_size: np.ndarray, gt_size: np.ndarray, delta: float = DICE_DELTA
) -> np.ndarray:
    """Dice ``(2|P∩G| + delta) / (|P| + |G| + delta)`` from counts (spec C.10; empty vs empty = 1)."""
    return (2.0 * intersection + delta) / (pred_size + gt_size + delta)


def iou_from_counts(
    intersection: np.ndarray, pred_size: np.ndarray, gt_size: np.ndarray, delta: float = DICE_DELTA
) -> np.ndarray:
    """IoU ``(|P∩G| + delta) / (|P∪G| + delta)`` from counts (spec C.10; empty vs empty = 1)."""
    return (intersection + delta) / (pred_size + gt_size - intersection + delta)


def dice(pred: ArrayLike, gt: ArrayLike, delta: float = DICE_DELTA) -> ArrayLike:
    """Per-sample Dice with the AnoFPDM empty-mask rule (spec C.10).

    ``Dice = (2|P∩G| + delta) / (|P| + |G| + delta)``. **Empty prediction on empty ground truth = 1**;
    a non-empty prediction on an empty ground truth (or the reverse) scores ``delta/(count+delta) ≈ 0``.

    Args:
        pred: ``[B, ...]`` predicted masks (bool or 0/1; after the connected-component filter, spec C.9).
        gt: ``[B, ...]`` ground-truth masks, same shape.
        delta: smoothing constant (1e-6 in the official code).

    Returns:
        ``[B]`` float64 Dice per sample, a tensor on ``pred``'s device if ``pred`` is a tensor.
    """
    return like_input(dice_from_counts(*overlap_counts(pred, gt), delta=delta), pred)


def iou(pred: ArrayLike, gt: ArrayLike, delta: float = DICE_DELTA) -> ArrayLike:
    """Per-sample IoU (Jaccard) with the AnoFPDM empty-mask rule (spec C.10).

    ``IoU = (|P∩G| + delta) / (|P∪G| + delta)``. **Empty prediction on empty ground truth = 1**;
    a non-empty prediction on an empty ground truth (or the reverse) scores ``≈ 0``.

    Args:
        pred: ``[B, ...]`` predicted masks (bool or 0/1).
        gt: ``[B, ...]`` ground-truth masks, same shape.
        delta: smoothing constant (1e-6 in the official code).

    Returns:
        ``[B]`` float64 IoU per sample, in ``pred``'s framework.
    """
    return like_input(iou_from_counts(*overlap_counts(pred, gt), delta=delta), pred)


def precision_recall(pred: ArrayLike, gt: ArrayLike, delta: float = DICE_DELTA) -> tuple[ArrayLike, ArrayLike]:
    """Per-sample pixel precision ``TP/|P|`` and recall ``TP/|G|``, smoothed like Dice.

    The official code logs these two with their formulas swapped (spec C.10); here precision divides by the
    *predicted* count and recall by the *ground-truth* count. Same smoothing: empty vs empty = 1 for both;
    an empty prediction always has precision ``(0+δ)/(0+δ) = 1`` (nothing predicted, nothing wrong) and
    recall ≈ 0 on a non-empty ground truth; recall of anything on an empty ground truth is 1.

    Args:
        pred: ``[B, ...]`` predicted masks.
        gt: ``[B, ...]`` ground-truth masks, same shape.
        delta: smoothing constant.

    Returns:
        ``(precision[B], recall[B])`` float64, in ``pred``'s framework.
    """
    intersection, pred_size, gt_size = overlap_counts(pred, gt)
    precision = (intersection + delta) / (pred_size + delta)
    recall = (intersection + delta) / (gt_size + delta)
    return like_input(precision, pred), like_input(recall, pred)
