"""The two evaluation setups of AnoFPDM (spec C.9, C.10), per-subject 3-D scores, and seed aggregation.

**Mixed setup** (all test slices): the predicted mask of a slice the method's gate calls healthy is
replaced by an all-zero mask (the "gated" mask); methods without a gate (the baselines, spec D) use
their mask as is. Healthy slices with an empty gated mask score Dice = IoU = 1 (``EMPTY_CONVENTION``),
so the mixed Dice on ATLAS sits near the healthy fraction even for weak methods.

**Unhealthy setup**: only the slices whose *ground-truth* image label is ``UNHEALTHY``, with the
**un-gated** masks (the official code segments every sample, spec E.5).

Both setups score AUPRC on the continuous, un-gated map over foreground pixels (``curves.auprc``).

Dice and IoU are reported three ways:

- ``dice`` / ``iou``: mean over slices of the per-slice score (the paper's number; the official per-batch
  means, equal-size batches in mixed and sample-weighted in unhealthy, both equal this per-slice mean);
- ``dice_subject`` / ``iou_subject``: mean over subjects of the 3-D score of each subject's slices stacked
  into a volume by ``slice_index`` (the slices the setup evaluates: all of them in mixed, the GT-unhealthy
  ones in unhealthy);
- ``dice_pooled`` / ``iou_pooled``: one score over all evaluated pixels together.

Values are fractions in [0, 1] (the paper prints percentages).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import numpy as np

from anomalydiff.labels import UNHEALTHY
from anomalydiff.metrics._arrays import ArrayLike, as_bool_mask, as_float_scores, check_same_shape, to_numpy
from anomalydiff.metrics.curves import auprc, image_accuracy, image_auroc, pixel_auroc, pooled_curve_scores
from anomalydiff.metrics.overlap import (
    DICE_DELTA,
    EMPTY_CONVENTION,
    dice_from_counts,
    iou_from_counts,
    overlap_counts,
)

SETUPS: tuple[str, str] = ("mixed", "unhealthy")


@dataclass(frozen=True)
class MetricReport:
    """One setup's scores, stating the rules that produced them.

    Attributes:
        setup: ``"mixed"`` or ``"unhealthy"`` (spec C.9), or a caller-chosen name.
        uses_pixel_labels: whether anything fitted for this result (threshold, hyper-parameters) saw pixel
            labels (the cross/tick column of AnoFPDM Table 1).
        values: metric name -> value (fractions in [0, 1]); keys listed in ``evaluate_setups``.
        counts: ``n_slices``, ``n_unhealthy``, ``n_healthy``, ``n_subjects`` (-1 when not computed).
        protocol: how the numbers were computed (``auprc``, ``image_decision``, ``dice``, ...), as text.
        empty_convention: the empty-mask rule of Dice/IoU (always ``"empty-vs-empty=1"`` here).
        n_runs: number of runs (seeds) aggregated; values then hold the mean and ``<name>_runs_std``.
    """

    setup: str
    uses_pixel_labels: bool
    values: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    protocol: dict[str, str] = field(default_factory=dict)
    empty_convention: str = EMPTY_CONVENTION
    n_runs: int = 1

    def __getitem__(self, key: str) -> float:
        """Return ``values[key]``."""
        return self.values[key]

    def to_row(self) -> dict[str, Any]:
        """Flat dict for a CSV / JSON results row: setup, labels used, empty rule, counts, protocol, values."""
        row: dict[str, Any] = {
            "setup": self.setup,
            "uses_pixel_labels": self.uses_pixel_labels,
            "empty_convention": self.empty_convention,
            "n_runs": self.n_runs,
        }
        row.update(self.counts)
        row.update({f"protocol_{key}": value for key, value in self.protocol.items()})
        row.update(self.values)
        return row


def stack_subject_volumes(
    masks: ArrayLike, subject_ids: Sequence[str], slice_index: ArrayLike
) -> dict[str, np.ndarray]:
    """Stack 2-D slices back into one volume per subject, ordered by ``slice_index``.

    Args:
        masks: ``[B, 1, H, W]`` (or ``[B, H, W]``) slices, any dtype.
        subject_ids: ``B`` subject identifiers.
        slice_index: ``[B]`` slice position in the subject's volume.

    Returns:
        subject id -> ``[D, H, W]`` numpy array of that subject's slices in increasing ``slice_index``
        (only the slices given; missing positions are not filled in).

    Raises:
        ValueError: lengths differ, or a (subject, slice_index) pair occurs twice (e.g. a test sampler that
            draws slices with replacement, spec E.11): de-duplicate, or skip per-subject metrics.
    """
    arr = to_numpy(masks)
    index = to_numpy(slice_index).astype(np.int64).reshape(-1)
    if arr.ndim == 4:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"masks must be [B,1,H,W] or [B,H,W], got shape {to_numpy(masks).shape}")
    if not (len(subject_ids) == index.shape[0] == arr.shape[0]):
        raise ValueError(
            f"masks ({arr.shape[0]}), subject_ids ({len(subject_ids)}) and slice_index ({index.shape[0]}) "
            "must have one entry per slice"
        )
    ids = np.asarray([str(s) for s in subject_ids])
    volumes: dict[str, np.ndarray] = {}
    for subject in dict.fromkeys(ids.tolist()):
        rows = np.flatnonzero(ids == subject)
        positions = index[rows]
        if np.unique(positions).size != positions.size:
            raise ValueError(
                f"subject {subject!r} has the same slice_index more than once; 3-D scores need each slice once. "
                "De-duplicate the slices, or pass subject_ids=None to skip per-subject metrics."
            )
        volumes[subject] = arr[rows[np.argsort(positions, kind="stable")]]
    return volumes


def per_subject_overlap(
    pred: ArrayLike, gt: ArrayLike, subject_ids: Sequence[str], slice_index: ArrayLike, delta: float = DICE_DELTA
) -> dict[str, dict[str, float]]:
    """3-D Dice and IoU per subject, with the slices of each subject stacked by ``slice_index``.

    The empty rule is the same as per slice (``EMPTY_CONVENTION``): a subject with no lesion and no
    predicted pixel scores 1.

    Args:
        pred: ``[B, 1, H, W]`` predicted masks.
        gt: ``[B, 1, H, W]`` ground-truth masks.
        subject_ids: ``B`` subject identifiers.
        slice_index: ``[B]`` slice positions.
        delta: smoothing constant (1e-6).

    Returns:
        subject id -> ``{"dice": ..., "iou": ...}``.
    """
    p = as_bool_mask(pred, "pred")
    g = as_bool_mask(gt, "gt")
    check_same_shape(p, g, "pred", "gt")
    pred_volumes = stack_subject_volumes(p, subject_ids, slice_index)
    gt_volumes = stack_subject_volumes(g, subject_ids, slice_index)
    scores: dict[str, dict[str, float]] = {}
    for subject, volume in pred_volumes.items():
        counts = overlap_counts(volume[None], gt_volumes[subject][None])
        scores[subject] = {
            "dice": float(dice_from_counts(*counts, delta=delta)[0]),
            "iou": float(iou_from_counts(*counts, delta=delta)[0]),
        }
    return scores


def _overlap_values(
    pred: np.ndarray,
    gt: np.ndarray,
    subject_ids: Sequence[str] | None,
    slice_index: np.ndarray | None,
) -> tuple[dict[str, float], int]:
    """Per-slice mean/std, pooled and per-subject Dice/IoU; returns (values, number of subjects or -1)."""
    nan = float("nan")
    if pred.shape[0] == 0:
        keys = ("dice", "dice_std", "iou", "iou_std", "dice_pooled", "iou_pooled")
        values = {key: nan for key in keys}
        if subject_ids is not None:
            values.update({"dice_subject": nan, "dice_subject_std": nan, "iou_subject": nan, "iou_subject_std": nan})
        return values, (0 if subject_ids is not None else -1)
    intersection, pred_size, gt_size = overlap_counts(pred, gt)
    slice_dice = dice_from_counts(intersection, pred_size, gt_size)
    slice_iou = iou_from_counts(intersection, pred_size, gt_size)
    totals = (intersection.sum(keepdims=True), pred_size.sum(keepdims=True), gt_size.sum(keepdims=True))
    values = {
        "dice": float(slice_dice.mean()),
        "dice_std": float(slice_dice.std()),
        "iou": float(slice_iou.mean()),
        "iou_std": float(slice_iou.std()),
        "dice_pooled": float(dice_from_counts(*totals)[0]),
        "iou_pooled": float(iou_from_counts(*totals)[0]),
    }
    n_subjects = -1
    if subject_ids is not None:
        if slice_index is None:
            raise ValueError("per-subject metrics need slice_index with subject_ids (Batch.slice_index)")
        subjects = per_subject_overlap(pred, gt, subject_ids, slice_index)
        subject_dice = np.array([s["dice"] for s in subjects.values()])
        subject_iou = np.array([s["iou"] for s in subjects.values()])
        values.update(
            {
                "dice_subject": float(subject_dice.mean()),
                "dice_subject_std": float(subject_dice.std()),
                "iou_subject": float(subject_iou.mean()),
                "iou_subject_std": float(subject_iou.std()),
            }
        )
        n_subjects = len(subjects)
    return values, n_subjects


def _curve_values(
    scores: np.ndarray,
    gt: np.ndarray,
    fg: np.ndarray | None,
    batch_of: np.ndarray | None,
    batch_weighting: Literal["equal", "samples"],
    compute_auroc: bool,
) -> dict[str, float]:
    """AUPRC (pooled, or per batch) and optionally the pooled pixel AUROC, sorting the pixels once if pooled."""
    if batch_of is None:
        ap, auroc = pooled_curve_scores(scores, gt, fg)
        return {"auprc": ap, "pixel_auroc": auroc} if compute_auroc else {"auprc": ap}
    values = {"auprc": auprc(scores, gt, fg, batch_index=batch_of, batch_weighting=batch_weighting)}
    if compute_auroc:
        values["pixel_auroc"] = float(pixel_auroc(scores, gt, fg))
    return values


def evaluate_setups(
    anomaly_map: ArrayLike,
    pred_mask: ArrayLike,
    gt_mask: ArrayLike,
    labels: ArrayLike,
    *,
    uses_pixel_labels: bool,
    foreground: ArrayLike | None = None,
    pred_labels: ArrayLike | None = None,
    image_scores: ArrayLike | None = None,
    subject_ids: Sequence[str] | None = None,
    slice_index: ArrayLike | None = None,
    per_batch: int | None = None,
    compute_auroc: bool = True,
    setups: Sequence[str] = SETUPS,
) -> dict[str, MetricReport]:
    """Score one run in the mixed and unhealthy setups of AnoFPDM (spec C.9, C.10).

    Args:
        anomaly_map: ``[N, 1, H, W]`` continuous map, median-filtered and **un-gated** (AUPRC/AUROC input).
        pred_mask: ``[N, 1, H, W]`` bool predicted masks, **un-gated**, after the connected-component filter.
        gt_mask: ``[N, 1, H, W]`` bool ground-truth masks.
        labels: ``[N]`` ground-truth image labels (``HEALTHY`` / ``UNHEALTHY``).
        uses_pixel_labels: whether the threshold / hyper-parameters behind ``pred_mask`` saw pixel labels;
            copied into every report.
        foreground: ``[N, 1, H, W]`` bool AUPRC/AUROC pixels (``foreground_from_image``); ``None`` = all.
        pred_labels: ``[N]`` the method's own healthy/unhealthy decision (AnoFPDM's cosine gate). Gates the
            mixed-setup masks. ``None``: no gate, masks used as is, and the image decision for accuracy is
            "mask non-empty" (spec D).
        image_scores: ``[N]`` image scores for the image-level AUROC (mixed report only).
        subject_ids: ``N`` subject ids for per-subject 3-D scores (with ``slice_index``); ``None`` skips them.
        slice_index: ``[N]`` slice positions in each subject's volume.
        per_batch: ``None`` = pooled AUPRC (ours); 100 = the official per-batch protocol (consecutive batches
            in the given order; mixed averages batches equally, unhealthy weights them by unhealthy count).
        compute_auroc: also compute the pooled pixel AUROC (costs one more sort of all foreground pixels).
        setups: which of ``"mixed"``, ``"unhealthy"`` to compute.

    Returns:
        setup name -> ``MetricReport``. Value keys: ``dice``, ``dice_std``, ``iou``, ``iou_std`` (over
        slices), ``dice_pooled``, ``iou_pooled``, ``auprc``, ``pixel_auroc`` (if ``compute_auroc``),
        ``dice_subject``, ``dice_subject_std``, ``iou_subject``, ``iou_subject_std`` (if ``subject_ids``);
        mixed only: ``image_accuracy`` and ``image_auroc`` (if ``image_scores``). An unhealthy report over
        zero slices holds ``nan`` values.
    """
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise ValueError(f"setups must be among {SETUPS}, got {sorted(unknown)}")
    scores = as_float_scores(anomaly_map)
    pred = as_bool_mask(pred_mask, "pred_mask")
    gt = as_bool_mask(gt_mask, "gt_mask")
    check_same_shape(pred, gt, "pred_mask", "gt_mask")
    check_same_shape(scores, gt, "anomaly_map", "gt_mask")
    fg = None if foreground is None else as_bool_mask(foreground, "foreground")
    y = to_numpy(labels).astype(np.int64).reshape(-1)
    n = pred.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"labels must have one entry per slice ({n}), got {y.shape[0]}")
    index = None if slice_index is None else to_numpy(slice_index).astype(np.int64).reshape(-1)
    ids = None if subject_ids is None else [str(s) for s in subject_ids]
    unhealthy = y == UNHEALTHY
    batch_of = None if per_batch is None else np.arange(n) // int(per_batch)
    auprc_protocol = "pooled over foreground pixels" if per_batch is None else f"mean over batches of {per_batch}"
    base_counts = {"n_unhealthy": int(unhealthy.sum()), "n_healthy": int((~unhealthy).sum())}

    reports: dict[str, MetricReport] = {}
    if "mixed" in setups:
        if pred_labels is None:
            gate = None
            gated = pred
            decision = pred.reshape(n, -1).any(axis=1).astype(np.int64)
            decision_text = "mask non-empty (no gate)"
        else:
            gate = to_numpy(pred_labels).astype(np.int64).reshape(-1)
            if gate.shape[0] != n:
                raise ValueError(f"pred_labels must have one entry per slice ({n}), got {gate.shape[0]}")
            # 1. gate: predicted-healthy slices get an all-zero mask (spec C.9, mixed setup)
            gated = pred & (gate == UNHEALTHY).reshape((n,) + (1,) * (pred.ndim - 1))
            decision = gate
            decision_text = "method gate (pred_labels)"
        values, n_subjects = _overlap_values(gated, gt, ids, index)
        # 2. AUPRC (and AUROC) on the un-gated continuous map (spec C.10)
        values.update(_curve_values(scores, gt, fg, batch_of, "equal", compute_auroc))
        values["image_accuracy"] = image_accuracy(decision, y)
        if image_scores is not None:
            values["image_auroc"] = image_auroc(image_scores, y)
        reports["mixed"] = MetricReport(
            setup="mixed",
            uses_pixel_labels=uses_pixel_labels,
            values=values,
            counts={"n_slices": n, **base_counts, "n_subjects": n_subjects},
            protocol={
                "masks": "gated by pred_labels" if gate is not None else "as predicted (no gate)",
                "dice": "per-slice mean",
                "auprc": auprc_protocol,
                "image_decision": decision_text,
            },
        )
    if "unhealthy" in setups:
        rows = np.flatnonzero(unhealthy)
        sub_ids = None if ids is None else [ids[i] for i in rows]
        sub_index = None if index is None else index[rows]
        values, n_subjects = _overlap_values(pred[rows], gt[rows], sub_ids, sub_index)
        # 3. unhealthy setup: un-gated masks, GT-unhealthy slices only (spec C.9, E.5)
        if rows.size:
            sub_fg = None if fg is None else fg[rows]
            sub_batches = None if batch_of is None else batch_of[rows]
            values.update(_curve_values(scores[rows], gt[rows], sub_fg, sub_batches, "samples", compute_auroc))
        else:
            values["auprc"] = float("nan")
            if compute_auroc:
                values["pixel_auroc"] = float("nan")
        reports["unhealthy"] = MetricReport(
            setup="unhealthy",
            uses_pixel_labels=uses_pixel_labels,
            values=values,
            counts={"n_slices": int(rows.size), **base_counts, "n_subjects": n_subjects},
            protocol={
                "masks": "un-gated, ground-truth unhealthy slices only",
                "dice": "per-slice mean",
                "auprc": auprc_protocol if per_batch is None else auprc_protocol + " weighted by unhealthy count",
            },
        )
    return reports


def aggregate_runs(reports: Sequence[MetricReport], ddof: int = 1) -> MetricReport:
    """Mean and standard deviation over runs (seeds) of the same setup, as in Table 1 (spec C.10 "Runs").

    Args:
        reports: one ``MetricReport`` per run, all of the same setup, labels use and protocol.
        ddof: delta degrees of freedom of the std (1 = sample std, our default; the paper does not say
            which it used, numpy's default would be 0).

    Returns:
        A ``MetricReport`` whose ``values`` hold the mean of every metric under its own name and the std
        over runs under ``<name>_runs_std``; ``n_runs = len(reports)``; counts from the first run.

    Raises:
        ValueError: no reports, or reports that differ in setup, ``uses_pixel_labels``, protocol, empty rule
            or metric names.
    """
    if not reports:
        raise ValueError("aggregate_runs needs at least one MetricReport")
    first = reports[0]
    for other in reports[1:]:
        for attribute in ("setup", "uses_pixel_labels", "protocol", "empty_convention"):
            if getattr(other, attribute) != getattr(first, attribute):
                raise ValueError(
                    f"cannot aggregate runs with different {attribute}: {getattr(first, attribute)!r} vs "
                    f"{getattr(other, attribute)!r}; aggregate each configuration separately"
                )
        if set(other.values) != set(first.values):
            raise ValueError(
                f"cannot aggregate runs with different metrics: {sorted(first.values)} vs {sorted(other.values)}"
            )
    values: dict[str, float] = {}
    for key in first.values:
        column = np.array([r.values[key] for r in reports], dtype=np.float64)
        values[key] = float(column.mean())
        values[f"{key}_runs_std"] = float(column.std(ddof=ddof)) if len(reports) > ddof else float("nan")
    return replace(first, values=values, n_runs=len(reports))
