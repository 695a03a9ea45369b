"""postprocess stage of anomalydiff: median filter, connected-component filter, threshold policies.

Order (spec C.9): ``median_filter`` on the continuous map -> a fitted ``ThresholdPolicy`` -> ``remove_small_components``
(``segment`` does the last two). AUPRC uses the median-filtered map, unaffected by the CC filter.
"""

from anomalydiff.postprocess.filters import (
    MAX_COMPONENT_SIZE,
    MEDIAN_SIZE,
    median_filter,
    remove_small_components,
)
from anomalydiff.postprocess.thresholds import (
    DEFAULT_ORACLE_GRID,
    FixedThreshold,
    HealthyQuantileThreshold,
    OracleDiceThreshold,
    OtsuThreshold,
    PolicyNotFittedError,
    ThresholdPolicy,
    otsu_threshold,
    segment,
)

__all__ = [
    "DEFAULT_ORACLE_GRID",
    "MAX_COMPONENT_SIZE",
    "MEDIAN_SIZE",
    "FixedThreshold",
    "HealthyQuantileThreshold",
    "OracleDiceThreshold",
    "OtsuThreshold",
    "PolicyNotFittedError",
    "ThresholdPolicy",
    "median_filter",
    "otsu_threshold",
    "remove_small_components",
    "segment",
]
