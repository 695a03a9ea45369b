"""AUPRC / AUROC / image metrics against scikit-learn and a from-scratch average precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.metrics import (
    auprc,
    foreground_from_image,
    image_accuracy,
    image_auroc,
    pixel_auroc,
    pooled_curve_scores,
    ranking_scores,
)


def _hand_precision_recall(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision TP/(TP+FP) and recall TP/(TP+FN) at every distinct threshold, highest score first."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(float)
    last_of_each_threshold = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(t)[last_of_each_threshold]
    predicted = last_of_each_threshold + 1.0
    return tp / predicted, tp / t.sum()


def _hand_average_precision(scores: np.ndarray, truth: np.ndarray, swap: bool = False) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n; ``swap=True`` exchanges the roles of precision and recall."""
    precision, recall = _hand_precision_recall(scores, truth)
    if swap:
        precision, recall = recall, precision
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def test_auprc_hand_example_and_swapped_precision_recall_differs() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6]).reshape(4, 1, 1, 1)
    truth = np.array([1, 0, 1, 0], dtype=bool).reshape(4, 1, 1, 1)
    expected = 1.0 * 0.5 + (2.0 / 3.0) * 0.5  # recall steps 0->0.5 at P=1 and 0.5->1 at P=2/3
    assert auprc(scores, truth) == pytest.approx(expected, abs=1e-12)
    assert _hand_average_precision(scores.ravel(), truth.ravel()) == pytest.approx(expected, abs=1e-12)
    swapped = _hand_average_precision(scores.ravel(), truth.ravel(), swap=True)
    assert abs(swapped - expected) > 0.1  # a metric with precision and recall swapped fails this test


def test_auprc_matches_sklearn_on_pooled_foreground_pixels() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((6, 1, 12, 12), dtype=bool)
    gt[:, :, 4:8, 3:9] = True
    gt[2] = False  # one healthy slice
    scores = rng.random(gt.shape) + 0.6 * gt
    foreground = np.zeros_like(gt)
    foreground[:, :, 1:11, 1:11] = True
    scores[~foreground] = 5.0  # bright background: counts only if background pixels were scored
    expected = average_precision_score(gt[foreground], scores[foreground])
    assert auprc(scores, gt, foreground) == pytest.approx(expected, abs=1e-12)
    assert auprc(torch.from_numpy(scores), torch.from_numpy(gt), torch.from_numpy(foreground)) == pytest.approx(
        expected, abs=1e-12
    )
    assert _hand_average_precision(scores[foreground], gt[foreground]) == pytest.approx(expected, abs=1e-12)
    assert auprc(scores, gt) < expected - 0.1  # the foreground restriction matters here


def test_per_batch_averaging_differs_from_pooling_on_a_crafted_example() -> None:
    # batch A: lesion 0.9 vs healthy 0.8; batch B: lesion 0.5 vs healthy 0.4. Each batch alone ranks perfectly
    # (AP = 1), but pooled, batch A's healthy pixels outrank batch B's lesion pixels.
    gt = np.zeros((4, 1, 4, 4), dtype=bool)
    gt[:, :, :2, :2] = True
    scores = np.where(gt, 0.9, 0.8)
    scores[2:] = np.where(gt[2:], 0.5, 0.4)
    pooled = auprc(scores, gt)
    per_batch = auprc(scores, gt, per_batch=2)
    assert per_batch == pytest.approx(1.0)
    assert pooled == pytest.approx(average_precision_score(gt.ravel(), scores.ravel()))
    assert pooled < 0.8  # the per-batch protocol would report a different number


def test_per_batch_weighting_matches_manual_sklearn() -> None:
    rng = np.random.default_rng(3)
    gt = rng.random((5, 1, 6, 6)) < 0.3
    scores = rng.random(gt.shape) + 0.5 * gt
    batches = np.array([0, 0, 0, 1, 1])
    ap = [average_precision_score(gt[batches == b].ravel(), scores[batches == b].ravel()) for b in (0, 1)]
    assert auprc(scores, gt, per_batch=3) == pytest.approx(np.mean(ap), abs=1e-12)
    assert auprc(scores, gt, batch_index=batches, batch_weighting="samples") == pytest.approx(
        (3 * ap[0] + 2 * ap[1]) / 5, abs=1e-12
    )
    assert np.isnan(auprc(scores, np.zeros_like(gt)))  # pooled, no lesion pixel: undefined


def test_pixel_auroc_pooled_and_per_image() -> None:
    rng = np.random.default_rng(4)
    gt = rng.random((3, 1, 8, 8)) < 0.3
    gt[1] = False
    scores = rng.random(gt.shape) + 0.3 * gt
    foreground = np.ones_like(gt)
    foreground[:, :, 0] = False
    assert pixel_auroc(scores, gt, foreground) == pytest.approx(roc_auc_score(gt[foreground], scores[foreground]))
    per_image = pixel_auroc(scores, gt, per_image=True)
    assert per_image[0] == pytest.approx(roc_auc_score(gt[0].ravel(), scores[0].ravel()))
    assert np.isnan(per_image[1])  # no lesion pixel: AUROC undefined


def test_image_metrics_and_foreground() -> None:
    labels = torch.tensor([HEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY])
    scores = torch.tensor([0.1, 0.8, 0.3, 0.4])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert image_auroc(scores, labels) == pytest.approx(0.75)  # 3 of 4 (unhealthy, healthy) pairs ordered
    assert image_accuracy(torch.tensor([0, 1, 0, 0]), labels) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown labels"):
        image_accuracy(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, -1, 0]))
    image = torch.full((1, 2, 2, 2), -1.0)
    image[0, 1, 0, 0] = -0.8  # channel mean -0.9 > -0.95: foreground
    image[0, 1, 0, 1] = -0.95  # channel mean -0.975: background
    image[0, 0, 1, 1] = 0.5
    fg = foreground_from_image(image)
    assert fg.dtype == torch.bool and fg.shape == (1, 1, 2, 2)
    assert fg[0, 0].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("levels", [None, 7, 50])
def test_single_sort_ranking_scores_equal_sklearn_with_ties(levels: int | None) -> None:
    rng = np.random.default_rng(10 if levels is None else levels)
    truth = rng.random(20_000) < 0.07
    scores = rng.random(truth.size) + 0.3 * truth
    if levels is not None:
        scores = np.round(scores * levels) / levels  # many tied scores across both classes
    scores = scores.astype(np.float32)
    ap, auroc = ranking_scores(truth, scores)
    assert ap == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    assert auroc == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    pooled = pooled_curve_scores(scores.reshape(4, 1, 50, 100), truth.reshape(4, 1, 50, 100))
    assert pooled == pytest.approx((ap, auroc), abs=1e-15)


def test_ranking_scores_edge_cases() -> None:
    assert ranking_scores(np.zeros(4, bool), np.arange(4.0))[0] == 0.0  # sklearn's AP without positives
    assert np.isnan(ranking_scores(np.zeros(4, bool), np.arange(4.0))[1])
    ap, auroc = ranking_scores(np.ones(3, bool), np.arange(3.0))
    assert ap == pytest.approx(1.0) and np.isnan(auroc)
    with pytest.raises(ValueError, match="NaN or inf"):
        ranking_scores(np.array([True, False]), np.array([np.nan, 0.1]))
