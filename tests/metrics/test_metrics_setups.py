"""Mixed vs unhealthy setups, per-subject 3-D scores and seed aggregation on hand-built examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.metrics import (
    EMPTY_CONVENTION,
    MetricReport,
    aggregate_runs,
    evaluate_setups,
    per_subject_overlap,
    stack_subject_volumes,
)

DELTA = 1e-6


def _hand_example() -> dict:
    """Four 6x6 slices of two subjects (A: all healthy; B: two lesion slices).

    s0 (A, idx 0): healthy, nothing predicted.            gate healthy
    s1 (A, idx 1): healthy, 4 false-positive pixels.      gate healthy  -> gated mask empty
    s2 (B, idx 5): lesion of 4 px, predicted exactly.     gate unhealthy
    s3 (B, idx 4): lesion of 6 px, predicted exactly.     gate healthy  -> gated mask empty (missed)
    """
    gt = np.zeros((4, 1, 6, 6), dtype=bool)
    gt[2, 0, 0:2, 0:2] = True
    gt[3, 0, 3:5, 1:4] = True
    pred = gt.copy()
    pred[1, 0, 4:6, 4:6] = True
    rng = np.random.default_rng(0)
    anomaly_map = rng.random(gt.shape) * 0.5 + 0.4 * gt
    return {
        "anomaly_map": anomaly_map,
        "pred_mask": pred,
        "gt_mask": gt,
        "labels": np.array([HEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY]),
        "pred_labels": np.array([HEALTHY, HEALTHY, UNHEALTHY, HEALTHY]),
        "subject_ids": ["A", "A", "B", "B"],
        "slice_index": np.array([0, 1, 5, 4]),
    }


def test_mixed_vs_unhealthy_on_hand_example() -> None:
    case = _hand_example()
    reports = evaluate_setups(
        case["anomaly_map"],
        case["pred_mask"],
        case["gt_mask"],
        case["labels"],
        uses_pixel_labels=False,
        pred_labels=case["pred_labels"],
        image_scores=np.array([0.1, 0.2, 0.9, 0.3]),
        subject_ids=case["subject_ids"],
        slice_index=case["slice_index"],
    )
    mixed, unhealthy = reports["mixed"], reports["unhealthy"]
    # mixed: s0 empty/empty = 1, s1 gated to empty = 1, s2 = 1, s3 gated to empty on a 6-px lesion ~ 0
    assert mixed["dice"] == pytest.approx((3.0 + DELTA / (6 + DELTA)) / 4, abs=1e-12)
    assert mixed["iou"] == pytest.approx((3.0 + DELTA / (6 + DELTA)) / 4, abs=1e-12)
    # per subject: A (all healthy, nothing predicted after gating) = 1; B = 2*4 / (4 + 10)
    assert mixed["dice_subject"] == pytest.approx((1.0 + (8 + DELTA) / (14 + DELTA)) / 2, abs=1e-12)
    assert mixed["dice_pooled"] == pytest.approx((8 + DELTA) / (14 + DELTA), abs=1e-12)
    assert mixed["iou_pooled"] == pytest.approx((4 + DELTA) / (10 + DELTA), abs=1e-12)
    assert mixed["image_accuracy"] == pytest.approx(0.75)
    assert mixed["image_auroc"] == pytest.approx(1.0)
    assert mixed["auprc"] == pytest.approx(
        average_precision_score(case["gt_mask"].ravel(), case["anomaly_map"].ravel()), abs=1e-12
    )
    assert mixed.counts == {"n_slices": 4, "n_unhealthy": 2, "n_healthy": 2, "n_subjects": 2}
    # unhealthy: only s2, s3, un-gated masks -> both perfect; the all-healthy subject A is not scored
    assert unhealthy["dice"] == pytest.approx(1.0) and unhealthy["iou"] == pytest.approx(1.0)
    assert unhealthy["dice_subject"] == pytest.approx(1.0)
    assert unhealthy.counts["n_slices"] == 2 and unhealthy.counts["n_subjects"] == 1
    rows = case["labels"] == UNHEALTHY
    assert unhealthy["auprc"] == pytest.approx(
        average_precision_score(case["gt_mask"][rows].ravel(), case["anomaly_map"][rows].ravel()), abs=1e-12
    )
    assert "image_accuracy" not in unhealthy.values
    for report in (mixed, unhealthy):
        assert report.empty_convention == EMPTY_CONVENTION == "empty-vs-empty=1"
        assert report.uses_pixel_labels is False
        row = report.to_row()
        assert row["empty_convention"] == "empty-vs-empty=1" and row["uses_pixel_labels"] is False


def test_without_gate_masks_are_used_as_is() -> None:
    case = _hand_example()
    mixed = evaluate_setups(
        torch.from_numpy(case["anomaly_map"]),
        torch.from_numpy(case["pred_mask"]),
        torch.from_numpy(case["gt_mask"]),
        torch.from_numpy(case["labels"]),
        uses_pixel_labels=True,
        setups=("mixed",),
    )["mixed"]
    # s1's false positive now counts (~0); s3 is found (1)
    assert mixed["dice"] == pytest.approx((3.0 + DELTA / (4 + DELTA)) / 4, abs=1e-12)
    assert mixed["image_accuracy"] == pytest.approx(0.75)  # decision = mask non-empty: s1 wrong
    assert mixed.protocol["image_decision"] == "mask non-empty (no gate)"
    assert mixed.uses_pixel_labels is True
    assert "dice_subject" not in mixed.values and mixed.counts["n_subjects"] == -1


def test_per_batch_protocol_weights_unhealthy_batches_by_count() -> None:
    rng = np.random.default_rng(5)
    gt = np.zeros((6, 1, 5, 5), dtype=bool)
    labels = np.array([HEALTHY, UNHEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY])
    for i in np.flatnonzero(labels == UNHEALTHY):
        gt[i, 0, 1 : 2 + i % 3, 1:4] = True
    anomaly_map = rng.random(gt.shape) + 0.4 * gt
    reports = evaluate_setups(anomaly_map, gt, gt, labels, uses_pixel_labels=False, per_batch=3)
    batch_a = average_precision_score(gt[[1]].ravel(), anomaly_map[[1]].ravel())
    batch_b = average_precision_score(gt[[3, 4]].ravel(), anomaly_map[[3, 4]].ravel())
    assert reports["unhealthy"]["auprc"] == pytest.approx((1 * batch_a + 2 * batch_b) / 3, abs=1e-12)
    mixed_a = average_precision_score(gt[:3].ravel(), anomaly_map[:3].ravel())
    mixed_b = average_precision_score(gt[3:].ravel(), anomaly_map[3:].ravel())
    assert reports["mixed"]["auprc"] == pytest.approx((mixed_a + mixed_b) / 2, abs=1e-12)
    assert "batches of 3" in reports["mixed"].protocol["auprc"]
    pooled = evaluate_setups(anomaly_map, gt, gt, labels, uses_pixel_labels=False)
    assert pooled["mixed"]["auprc"] == pytest.approx(average_precision_score(gt.ravel(), anomaly_map.ravel()))


def test_no_unhealthy_slice_gives_nan_report() -> None:
    gt = np.zeros((2, 1, 4, 4), dtype=bool)
    reports = evaluate_setups(np.zeros(gt.shape), gt, gt, np.array([HEALTHY, HEALTHY]), uses_pixel_labels=False)
    assert reports["mixed"]["dice"] == 1.0  # all-healthy, nothing predicted: perfect by the empty rule
    assert np.isnan(reports["unhealthy"]["dice"]) and reports["unhealthy"].counts["n_slices"] == 0


def test_stacking_orders_by_slice_index_and_rejects_duplicates() -> None:
    case = _hand_example()
    volumes = stack_subject_volumes(case["gt_mask"], case["subject_ids"], case["slice_index"])
    assert list(volumes) == ["A", "B"] and volumes["B"].shape == (2, 6, 6)
    np.testing.assert_array_equal(volumes["B"][0], case["gt_mask"][3, 0])  # slice_index 4 comes first
    scores = per_subject_overlap(case["gt_mask"], case["gt_mask"], case["subject_ids"], case["slice_index"])
    assert scores == {"A": {"dice": 1.0, "iou": 1.0}, "B": {"dice": 1.0, "iou": 1.0}}
    with pytest.raises(ValueError, match="same slice_index more than once"):
        stack_subject_volumes(case["gt_mask"], ["A", "A", "B", "B"], np.array([0, 0, 5, 4]))


def test_aggregate_runs_mean_and_std() -> None:
    runs = [
        MetricReport(setup="mixed", uses_pixel_labels=False, values={"dice": d, "auprc": a})
        for d, a in ((0.7, 0.2), (0.8, 0.25), (0.75, 0.3))
    ]
    agg = aggregate_runs(runs)
    assert agg.n_runs == 3 and agg.empty_convention == "empty-vs-empty=1"
    assert agg["dice"] == pytest.approx(0.75)
    assert agg["dice_runs_std"] == pytest.approx(np.std([0.7, 0.8, 0.75], ddof=1))
    assert aggregate_runs(runs, ddof=0)["auprc_runs_std"] == pytest.approx(np.std([0.2, 0.25, 0.3]))
    with pytest.raises(ValueError, match="uses_pixel_labels"):
        aggregate_runs([runs[0], MetricReport(setup="mixed", uses_pixel_labels=True, values={"dice": 1, "auprc": 1})])
