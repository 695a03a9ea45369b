"""evaluation stage: run methods over a split, the phantom benchmark, figures and the HTML report.

- ``models``: ``load_parts(model folder)`` -> the trained networks (EMA weights) and their schedule;
  ``build_method_from_parts(preset, parts)``.
- ``runner``: ``run_method(method, store, ...)`` fits on validation, scores a split, post-processes
  (spec C.9 / D), evaluates (mixed / unhealthy setups) and writes maps, calibration and metrics.
- ``benchmark``: ``run_benchmark(config, out)``: AnoFPDM's Table 1 on the phantom, cost columns, the
  step-stride curve and the ablations; ``results.json`` / ``.csv`` / ``.md``.
- ``figures`` and ``report``: PNG figures and ``report.html``.
"""

from anomalydiff.evaluation.models import (
    PART_NAMES,
    ModelPart,
    Parts,
    build_method_from_parts,
    file_sha256,
    load_parts,
    parts_needed,
)
from anomalydiff.evaluation.runner import (
    EvaluationConfig,
    MethodResult,
    ScoredSlices,
    iter_batches,
    load_result,
    run_method,
    sample_rows,
    score_slices,
)

__all__ = [
    "PART_NAMES",
    "EvaluationConfig",
    "MethodResult",
    "ModelPart",
    "Parts",
    "ScoredSlices",
    "build_method_from_parts",
    "file_sha256",
    "iter_batches",
    "load_parts",
    "load_result",
    "parts_needed",
    "run_method",
    "sample_rows",
    "score_slices",
]
