"""metrics stage of anomalydiff: Dice/IoU with the AnoFPDM empty rule, AUPRC/AUROC, the two setups.

- ``overlap``: per-sample ``dice``, ``iou``, ``precision_recall`` (delta = 1e-6; empty vs empty = 1).
- ``curves``: ``auprc`` (pooled over foreground pixels; ``per_batch=100`` = paper protocol), ``pixel_auroc``,
  ``image_auroc``, ``image_accuracy``, ``foreground_from_image``.
- ``setups``: ``evaluate_setups`` (mixed / unhealthy, per slice, per subject in 3-D, pooled),
  ``MetricReport``, ``aggregate_runs`` (mean ± std over seeds).
"""

from anomalydiff.metrics.curves import (
    FOREGROUND_CUTOFF,
    auprc,
    foreground_from_image,
    image_accuracy,
    image_auroc,
    pixel_auroc,
    pooled_curve_scores,
    ranking_scores,
)
from anomalydiff.metrics.overlap import (
    DICE_DELTA,
    EMPTY_CONVENTION,
    dice,
    dice_from_counts,
    iou,
    iou_from_counts,
    overlap_counts,
    precision_recall,
)
from anomalydiff.metrics.setups import (
    SETUPS,
    MetricReport,
    aggregate_runs,
    evaluate_setups,
    per_subject_overlap,
    stack_subject_volumes,
)

__all__ = [
    "DICE_DELTA",
    "EMPTY_CONVENTION",
    "FOREGROUND_CUTOFF",
    "SETUPS",
    "MetricReport",
    "aggregate_runs",
    "auprc",
    "dice",
    "dice_from_counts",
    "evaluate_setups",
    "foreground_from_image",
    "image_accuracy",
    "image_auroc",
    "iou",
    "iou_from_counts",
    "overlap_counts",
    "per_subject_overlap",
    "pixel_auroc",
    "pooled_curve_scores",
    "precision_recall",
    "ranking_scores",
    "stack_subject_volumes",
]
