"""Dice / IoU / precision / recall: hand cases (empty rule of spec C.10) and scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from anomalydiff.metrics import DICE_DELTA, dice, iou, precision_recall

DELTA = DICE_DELTA


def _masks(*pairs: tuple[list[tuple[int, int]], list[tuple[int, int]]], size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Build [B,1,size,size] pred/gt masks from lists of foreground pixel coordinates."""
    pred = np.zeros((len(pairs), 1, size, size), dtype=bool)
    gt = np.zeros_like(pred)
    for b, (p, g) in enumerate(pairs):
        for r, c in p:
            pred[b, 0, r, c] = True
        for r, c in g:
            gt[b, 0, r, c] = True
    return pred, gt


def test_hand_cases_follow_the_empty_rule() -> None:
    square = [(0, 0), (0, 1), (1, 0), (1, 1)]
    shifted = [(0, 1), (1, 1), (0, 2), (1, 2)]
    pred, gt = _masks(
        ([], []),  # empty prediction, empty GT -> 1
        ([], square),  # empty prediction on a lesion -> ~0
        (square, []),  # false positive on a healthy slice -> ~0
        (square, shifted),  # |P|=|G|=4, overlap 2
    )
    d, j = dice(pred, gt), iou(pred, gt)
    assert d[0] == 1.0 and j[0] == 1.0
    assert d[1] == pytest.approx(DELTA / (4 + DELTA), abs=0) and d[1] < 1e-6
    assert j[1] == pytest.approx(DELTA / (4 + DELTA), abs=0)
    assert d[2] == pytest.approx(DELTA / (4 + DELTA), abs=0)
    assert d[3] == pytest.approx((2 * 2 + DELTA) / (8 + DELTA), rel=1e-15)
    assert j[3] == pytest.approx((2 + DELTA) / (6 + DELTA), rel=1e-15)
    precision, recall = precision_recall(pred, gt)
    assert precision[0] == 1.0 and recall[0] == 1.0
    assert precision[1] == 1.0 and recall[1] < 1e-6  # nothing predicted: no false positive, all missed
    assert precision[2] < 1e-6 and recall[2] == 1.0


def test_matches_sklearn_on_non_empty_masks() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((8, 1, 16, 16)) < 0.3
    gt = rng.random((8, 1, 16, 16)) < 0.2
    pred[:, 0, 0, 0] = gt[:, 0, 0, 0] = True  # both non-empty in every sample
    d, j = dice(pred, gt), iou(pred, gt)
    precision, recall = precision_recall(pred, gt)
    for b in range(8):
        y_true, y_pred = gt[b].ravel(), pred[b].ravel()
        assert d[b] == pytest.approx(f1_score(y_true, y_pred), abs=1e-7)
        assert j[b] == pytest.approx(jaccard_score(y_true, y_pred), abs=1e-7)
        assert precision[b] == pytest.approx(precision_score(y_true, y_pred), abs=1e-7)
        assert recall[b] == pytest.approx(recall_score(y_true, y_pred), abs=1e-7)


def test_swapped_precision_recall_would_be_caught() -> None:
    # 4 predicted pixels, 2 of them on a 8-pixel lesion: precision 0.5, recall 0.25
    pred = np.zeros((1, 1, 4, 4), dtype=bool)
    gt = np.zeros_like(pred)
    pred[0, 0, 0, :] = True
    gt[0, 0, 0, :2] = True
    gt[0, 0, 1:3, :3] = True
    assert gt.sum() == 8
    precision, recall = precision_recall(pred, gt)
    assert precision[0] == pytest.approx(0.5, abs=1e-6)
    assert recall[0] == pytest.approx(0.25, abs=1e-6)


def test_torch_in_torch_out_and_shape_errors() -> None:
    rng = np.random.default_rng(1)
    pred = rng.random((3, 1, 8, 8)) < 0.5
    gt = rng.random((3, 1, 8, 8)) < 0.5
    out = dice(torch.from_numpy(pred), torch.from_numpy(gt))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (3,)
    np.testing.assert_array_equal(out.numpy(), dice(pred, gt))
    np.testing.assert_array_equal(dice(pred.astype(np.float32), gt.astype(np.uint8)), dice(pred, gt))
    with pytest.raises(ValueError, match="same shape"):
        dice(pred, gt[:2])
    with pytest.raises(ValueError, match="threshold the anomaly map"):
        iou(rng.random((3, 1, 8, 8)), gt)
