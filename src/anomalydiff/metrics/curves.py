"""Threshold-free metrics: pixel AUPRC and AUROC over foreground pixels, image-level AUROC and accuracy.

Spec C.10: AUPRC is ``sklearn.metrics.average_precision_score`` on the continuous (median-filtered)
anomaly map, over **foreground** pixels (mean over all input channels of the [-1, 1] image > -0.95).

Ours pools all foreground pixels of all evaluated slices into **one** score by default. The official
AnoFPDM code instead averages per-batch scores over batches of 100 slices (spec C.10, E.7), which makes
the number depend on batch composition; ``per_batch=100`` reproduces that protocol for comparison. The
official code's logged precision/recall are swapped (spec C.10); nothing here uses them, and average
precision is ``sum_n (R_n - R_{n-1}) P_n`` with precision ``TP/(TP+FP)`` and recall ``TP/(TP+FN)``
(tests check both against a hand-computed example).

AP and AUROC are computed by ``ranking_scores`` from **one** sort of the pixels, with exactly
scikit-learn's definitions (``average_precision_score``: step sum over distinct thresholds;
``roc_auc_score``: trapezoids over the ROC points). The tests check equality with scikit-learn to 1e-12,
ties included. scikit-learn itself sorts twice per call with a stable mergesort, which on a full test set
(10,000 slices of 128x128) takes minutes.

All inputs may be torch tensors or numpy arrays; results are Python floats (or numpy arrays for
per-image scores).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.metrics._arrays import (
    ArrayLike,
    as_bool_mask,
    as_float_scores,
    check_same_shape,
    like_input,
    to_numpy,
)

#: Foreground cut-off of the official evaluation: mean over channels of the [-1, 1] image > -0.95 (spec C.10).
FOREGROUND_CUTOFF: float = -0.95


def foreground_from_image(image: ArrayLike, cutoff: float = FOREGROUND_CUTOFF) -> ArrayLike:
    """Foreground pixels for AUPRC as the official evaluation defines them (spec C.10, E.7).

    A pixel is foreground if the mean over **all** input channels (4 for BraTS, 1 for ATLAS) of the image,
    in [-1, 1] units, is greater than ``cutoff``.

    Args:
        image: ``[B, C, H, W]`` images in [-1, 1].
        cutoff: threshold on the channel mean (-0.95 in the official code).

    Returns:
        ``[B, 1, H, W]`` bool mask, in ``image``'s framework (and device).
    """
    arr = to_numpy(image)
    if arr.ndim != 4:
        raise ValueError(f"image must be [B,C,H,W] in [-1,1], got shape {arr.shape}")
    return like_input(arr.astype(np.float64).mean(axis=1, keepdims=True) > cutoff, image)


def _pixels(
    scores: ArrayLike, gt: ArrayLike, foreground: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten to per-sample rows: ``(scores[B,N], gt[B,N], foreground[B,N])``."""
    s = as_float_scores(scores)
    g = as_bool_mask(gt, "gt")
    check_same_shape(s, g, "scores", "gt")
    if s.ndim < 2:
        raise ValueError(f"scores must be batched [B,...] (e.g. [B,1,H,W]), got shape {s.shape}")
    if foreground is None:
        fg = np.ones_like(g)
    else:
        fg = as_bool_mask(foreground, "foreground")
        check_same_shape(s, fg, "scores", "foreground")
    b = s.shape[0]
    return s.reshape(b, -1), g.reshape(b, -1), fg.reshape(b, -1)


def ranking_scores(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float]:
    """Average precision and ROC AUC of one set of scored pixels, from a single sort.

    Same definitions as scikit-learn: with the distinct score values as thresholds (highest first),
    ``TP_n``/``FP_n`` the positives/negatives scoring ``>=`` threshold n, precision ``P_n = TP_n/(TP_n+FP_n)``,
    recall ``R_n = TP_n/TP_total``:

    1. ``AP = sum_n (R_n - R_{n-1}) P_n`` with ``R_0 = 0`` (``average_precision_score``);
    2. ``AUROC`` = trapezoidal area under ``(FP_n/FP_total, TP_n/TP_total)`` from (0, 0) (``roc_auc_score``).

    Args:
        y_true: ``[N]`` bool pixel labels.
        y_score: ``[N]`` float scores (higher = more anomalous), all finite.

    Returns:
        ``(average_precision, auroc)``. Without positives AP is 0.0 (scikit-learn's value) and AUROC nan;
        without negatives AUROC is nan.

    Raises:
        ValueError: a score is NaN or infinite.
    """
    t = np.asarray(y_true, dtype=bool).reshape(-1)
    s = np.asarray(y_score).reshape(-1)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if t.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {t.shape} and {s.shape}")
    if s.size == 0:
        return float("nan"), float("nan")
    if not np.isfinite(s).all():
        raise ValueError("anomaly scores contain NaN or inf; fix the map (e.g. torch.nan_to_num) before metrics")
    # 1. one sort, highest score first; ties are merged below, so the order within ties does not matter
    order = np.argsort(s)[::-1]
    sorted_scores, sorted_true = s[order], t[order]
    del order
    last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), s.size - 1]
    tps = np.cumsum(sorted_true, dtype=np.int64)[last_of_threshold].astype(np.float64)
    fps = (last_of_threshold + 1).astype(np.float64) - tps
    positives, negatives = tps[-1], fps[-1]
    if positives == 0:
        return 0.0, float("nan")
    # 2. AP: recall increments times precision at each distinct threshold
    average_precision = float(np.sum(np.diff(np.r_[0.0, tps]) / positives * (tps / (tps + fps))))
    if negatives == 0:
        return average_precision, float("nan")
    # 3. AUROC: trapezoids between consecutive ROC points, starting at (0, 0)
    tpr, fpr = np.r_[0.0, tps / positives], np.r_[0.0, fps / negatives]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return average_precision, auroc


def _pooled_average_precision(s: np.ndarray, g: np.ndarray, fg: np.ndarray) -> float:
    """AP over the foreground pixels of the given rows; nan when there is no positive pixel."""
    y_true, y_score = g[fg], s[fg]
    if not y_true.any():
        return float("nan")
    return ranking_scores(y_true, y_score)[0]


def pooled_curve_scores(
    scores: ArrayLike, gt: ArrayLike, foreground: ArrayLike | None = None
) -> tuple[float, float]:
    """Pooled AUPRC and pixel AUROC over foreground pixels from one sort (what ``auprc`` and ``pixel_auroc``
    return with their defaults).

    Args:
        scores: ``[B, ...]`` continuous anomaly map.
        gt: ``[B, ...]`` ground-truth pixel masks.
        foreground: ``[B, ...]`` bool pixels to score; ``None`` = all pixels.

    Returns:
        ``(auprc, auroc)``; AUPRC is ``nan`` without positive pixels, AUROC ``nan`` with a single class.
    """
    s, g, fg = _pixels(scores, gt, foreground)
    y_true, y_score = g[fg], s[fg]
    if not y_true.any():
        return float("nan"), float("nan")
    return ranking_scores(y_true, y_score)


def _batch_groups(num_samples: int, per_batch: int | None, batch_index: ArrayLike | None) -> np.ndarray | None:
    """One group id per sample: consecutive chunks of ``per_batch``, or the given ``batch_index``."""
    if batch_index is not None:
        groups = to_numpy(batch_index).astype(np.int64).reshape(-1)
        if groups.shape[0] != num_samples:
            raise ValueError(f"batch_index must have one entry per sample ({num_samples}), got {groups.shape[0]}")
        return groups
    if per_batch is None:
        return None
    if per_batch < 1:
        raise ValueError(f"per_batch must be a positive number of slices (100 in the paper), got {per_batch}")
    return np.arange(num_samples) // per_batch


def auprc(
    scores: ArrayLike,
    gt: ArrayLike,
    foreground: ArrayLike | None = None,
    per_batch: int | None = None,
    batch_index: ArrayLike | None = None,
    batch_weighting: Literal["equal", "samples"] = "equal",
) -> float:
    """Area under the precision-recall curve (average precision) over foreground pixels (spec C.10).

    Default: **one** average precision (= ``sklearn.metrics.average_precision_score``) over the foreground
    pixels of all samples pooled. Paper protocol (for comparison only): pass ``per_batch=100`` to split the
    samples, in the order given, into consecutive batches of 100, score each batch on its own pooled
    foreground pixels and average the batch scores (``batch_weighting="equal"``, the mixed setup) or weight them by the number of samples
    in the batch (``"samples"``, the unhealthy setup). ``batch_index`` gives explicit batch ids instead.

    Args:
        scores: ``[B, ...]`` continuous anomaly map (e.g. ``[B,1,H,W]``, median-filtered, un-gated).
        gt: ``[B, ...]`` ground-truth pixel masks, same shape.
        foreground: ``[B, ...]`` bool pixels to score (``foreground_from_image``); ``None`` = all pixels.
        per_batch: batch size of the per-batch protocol; ``None`` (default) pools all pixels.
        batch_index: ``[B]`` explicit batch id per sample (overrides ``per_batch``).
        batch_weighting: how per-batch scores are averaged: ``"equal"`` or ``"samples"``.

    Returns:
        The AUPRC in [0, 1]. Pooled: ``nan`` when no foreground pixel is positive. Per batch: a batch
        without positive pixels contributes scikit-learn's value for that case (0.0), as in the official code.
    """
    s, g, fg = _pixels(scores, gt, foreground)
    groups = _batch_groups(s.shape[0], per_batch, batch_index)
    if groups is None:
        return _pooled_average_precision(s, g, fg)
    values, weights = [], []
    for group in np.unique(groups):
        rows = groups == group
        y_true, y_score = g[rows][fg[rows]], s[rows][fg[rows]]
        if y_true.size == 0:
            continue
        values.append(ranking_scores(y_true, y_score)[0])  # 0.0 without positives, as sklearn
        weights.append(float(rows.sum()))
    if not values:
        return float("nan")
    if batch_weighting == "equal":
        return float(np.mean(values))
    if batch_weighting == "samples":
        return float(np.average(values, weights=weights))
    raise ValueError(f"batch_weighting must be 'equal' or 'samples', got {batch_weighting!r}")


def pixel_auroc(
    scores: ArrayLike, gt: ArrayLike, foreground: ArrayLike | None = None, per_image: bool = False
) -> float | np.ndarray:
    """Pixel-level ROC AUC (as ``sklearn.metrics.roc_auc_score``).

    Pooled over the foreground pixels of all samples by default. ``per_image=True`` gives one AUROC per
    image over its foreground pixels, as Wolleb et al. report it (spec B.4: all pixels of the image, mean ±
    std over diseased slices; pass ``foreground=None`` for that).

    Args:
        scores: ``[B, ...]`` continuous anomaly map.
        gt: ``[B, ...]`` ground-truth pixel masks, same shape.
        foreground: ``[B, ...]`` bool pixels to score; ``None`` = all pixels.
        per_image: return a ``[B]`` array instead of one pooled value.

    Returns:
        Pooled AUROC as a float, or ``[B]`` float64 array; ``nan`` wherever the scored pixels hold a single
        class (AUROC undefined).
    """
    s, g, fg = _pixels(scores, gt, foreground)

    def _auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
        return ranking_scores(y_true, y_score)[1]

    if per_image:
        return np.array([_auroc(g[i][fg[i]], s[i][fg[i]]) for i in range(s.shape[0])], dtype=np.float64)
    return _auroc(g[fg], s[fg])


def _image_labels(labels: ArrayLike) -> np.ndarray:
    """Image labels as a numpy int array, checked to be HEALTHY / UNHEALTHY only."""
    arr = to_numpy(labels).astype(np.int64).reshape(-1)
    bad = ~np.isin(arr, (HEALTHY, UNHEALTHY))
    if bad.any():
        raise ValueError(
            f"labels must be HEALTHY ({HEALTHY}) or UNHEALTHY ({UNHEALTHY}); found {sorted(set(arr[bad].tolist()))}. "
            "Drop slices with unknown labels before image-level metrics."
        )
    return arr


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level ROC AUC of the healthy/unhealthy decision score (higher score = more likely unhealthy).

    Args:
        scores: ``[B]`` image scores (``MethodOutput.image_score``).
        labels: ``[B]`` ground-truth image labels (``HEALTHY`` / ``UNHEALTHY``).

    Returns:
        as ``roc_auc_score(labels == UNHEALTHY, scores)``; ``nan`` if only one class is present.
    """
    y = _image_labels(labels)
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must both be [B], got {s.shape} and {y.shape}")
    return ranking_scores(y == UNHEALTHY, s)[1]


def image_accuracy(pred_labels: ArrayLike, labels: ArrayLike) -> float:
    """Accuracy of the healthy/unhealthy decision: the fraction of images with ``pred_labels == labels``.

    Args:
        pred_labels: ``[B]`` predicted image labels (``HEALTHY`` / ``UNHEALTHY``).
        labels: ``[B]`` ground-truth image labels.

    Returns:
        Accuracy in [0, 1]; ``nan`` for an empty batch.
    """
    y = _image_labels(labels)
    p = _image_labels(pred_labels)
    if p.shape != y.shape:
        raise ValueError(f"pred_labels and labels must both be [B], got {p.shape} and {y.shape}")
    if y.size == 0:
        return float("nan")
    return float(np.mean(p == y))
