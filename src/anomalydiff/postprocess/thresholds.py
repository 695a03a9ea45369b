"""Threshold policies: fitted objects that turn (median-filtered) anomaly maps into binary masks.

Every policy follows the scikit-learn pattern: ``fit(maps, brain, masks=None, labels=None)`` learns
``threshold_`` and returns self; ``predict(maps)`` never changes state; ``uses_pixel_labels`` says whether
fitting needs pixel ground truth (the tick/cross column of AnoFPDM Table 1), and every result row copies it.

- ``OtsuThreshold``: per-image Otsu (Wolleb et al. P1 and CG-CDM, spec B.3 step 5, D.4): label-free,
  nothing to fit, mask ``= map > tau_otsu`` (strict, as P1).
- ``HealthyQuantileThreshold``: the ``1 - fpr`` quantile of the brain pixels of *healthy* validation
  slices, so about ``fpr`` of healthy brain pixels pass; label-free (image labels only).
- ``OracleDiceThreshold``: grid search maximising the mean Dice (empty vs empty = 1) after the
  connected-component filter on validation slices, as the AnoFPDM paper tuned its baselines (spec C.10,
  D); **uses pixel labels**.
- ``FixedThreshold``: a given value (e.g. a threshold from a paper's config); the caller states whether
  it was tuned with pixel labels.

AnoFPDM's own dynamic threshold (Algorithm 1, spec C.8) is per-sample and lives in ``methods/anofpdm.py``.
Masks other than Otsu's are ``map >= threshold_`` (spec C.8 step 6 and D).

Maps are ``[B, 1, H, W]`` (any ``[B, ...]``), torch or numpy, on CPU; masks come back in the maps' framework.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from skimage.filters import threshold_otsu

from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.metrics._arrays import ArrayLike, as_bool_mask, check_same_shape, like_input, to_numpy
from anomalydiff.metrics.overlap import dice_from_counts, overlap_counts
from anomalydiff.postprocess.filters import MAX_COMPONENT_SIZE, remove_small_components

#: The threshold grid of the official baseline tuning (spec C.10: ``np.arange(0.01, 0.7, 0.01)``).
DEFAULT_ORACLE_GRID: np.ndarray = np.arange(0.01, 0.7, 0.01)


class PolicyNotFittedError(RuntimeError):
    """``predict`` was called on a policy that needs ``fit`` first.

    Defined here rather than reusing ``methods.base.NotFittedError`` so that ``postprocess`` never imports
    ``methods`` (methods import ``postprocess``; the reverse import would be circular).
    """


@runtime_checkable
class ThresholdPolicy(Protocol):
    """What every threshold policy provides (fitted like a scikit-learn estimator)."""

    #: True when ``fit`` needs pixel labels (ground-truth masks).
    uses_pixel_labels: bool
    #: The fitted global threshold; ``None`` for per-image policies (Otsu).
    threshold_: float | None

    def fit(
        self,
        maps: ArrayLike,
        brain: ArrayLike | None = None,
        masks: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> "ThresholdPolicy":
        """Learn the threshold from validation maps ``[B,1,H,W]`` (median-filtered); returns self."""
        ...

    def predict(self, maps: ArrayLike) -> ArrayLike:
        """Binary masks ``[B,1,H,W]`` for median-filtered maps; does not change the policy."""
        ...


def otsu_threshold(anomaly_map: ArrayLike) -> float:
    """Otsu threshold of one map: ``skimage.filters.threshold_otsu`` (256 bins over [min, max]).

    Args:
        anomaly_map: ``[H, W]`` or ``[1, H, W]`` map (every value is used), torch or numpy.

    Returns:
        The threshold as a float; for a constant map, that constant (so ``map > tau`` is empty).
    """
    values = to_numpy(anomaly_map).astype(np.float64).reshape(-1)  # flat: skimage's RGB-shape check stays quiet
    if values.size == 0:
        raise ValueError("otsu_threshold needs a non-empty map")
    return float(threshold_otsu(values))


def _check_maps(maps: ArrayLike) -> np.ndarray:
    """Maps as float64 numpy ``[B, ...]``."""
    arr = to_numpy(maps).astype(np.float64)
    if arr.ndim < 2:
        raise ValueError(f"maps must be batched [B,1,H,W], got shape {arr.shape}")
    return arr


def _check_labels(labels: ArrayLike | None, num_maps: int, policy: str) -> np.ndarray:
    """Image labels as numpy ``[B]`` int, required by ``policy``."""
    if labels is None:
        raise ValueError(f"{policy}.fit needs image labels (labels=[B] with HEALTHY/UNHEALTHY)")
    arr = to_numpy(labels).astype(np.int64).reshape(-1)
    if arr.shape[0] != num_maps:
        raise ValueError(f"{policy}.fit: labels must have one entry per map ({num_maps}), got {arr.shape[0]}")
    return arr


class OtsuThreshold:
    """Per-image Otsu threshold (Wolleb P1 evaluation, CG-CDM): label-free, nothing to fit.

    ``predict`` computes ``otsu_threshold`` of each image and returns ``map > tau`` (strict, spec B.3).
    Otsu is invariant to a min-max normalisation of the map, so it can be applied to the raw map.
    """

    uses_pixel_labels: bool = False
    threshold_: float | None = None

    def fit(
        self,
        maps: ArrayLike,
        brain: ArrayLike | None = None,
        masks: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> "OtsuThreshold":
        """Nothing to learn (per-image threshold); returns self."""
        return self

    def thresholds(self, maps: ArrayLike) -> np.ndarray:
        """Per-image Otsu thresholds ``[B]`` (float64) of maps ``[B, 1, H, W]``."""
        arr = _check_maps(maps)
        return np.array([otsu_threshold(image) for image in arr], dtype=np.float64)

    def predict(self, maps: ArrayLike) -> ArrayLike:
        """Masks ``[B, 1, H, W]`` = ``map > otsu_threshold(map)`` per image, in the maps' framework."""
        arr = _check_maps(maps)
        tau = self.thresholds(arr).reshape((-1,) + (1,) * (arr.ndim - 1))
        return like_input(arr > tau, maps)

    def to_dict(self) -> dict[str, Any]:
        """Description for a results row."""
        return {"policy": "otsu", "threshold": None, "uses_pixel_labels": self.uses_pixel_labels}


class FixedThreshold:
    """A given global threshold (``map >= value``), e.g. a value from a paper's configuration.

    Args:
        value: the threshold on the median-filtered map.
        uses_pixel_labels: whether ``value`` was tuned with pixel labels (the paper's baseline values were);
            required, so every result row states it.
    """

    def __init__(self, value: float, *, uses_pixel_labels: bool) -> None:
        self.threshold_: float | None = float(value)
        self.uses_pixel_labels = bool(uses_pixel_labels)

    def fit(
        self,
        maps: ArrayLike,
        brain: ArrayLike | None = None,
        masks: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> "FixedThreshold":
        """Nothing to learn; returns self."""
        return self

    def predict(self, maps: ArrayLike) -> ArrayLike:
        """Masks ``map >= threshold_`` in the maps' framework."""
        return like_input(_check_maps(maps) >= self.threshold_, maps)

    def to_dict(self) -> dict[str, Any]:
        """Description for a results row."""
        return {"policy": "fixed", "threshold": self.threshold_, "uses_pixel_labels": self.uses_pixel_labels}


class HealthyQuantileThreshold:
    """Threshold at a target false-positive rate on healthy validation slices (label-free).

    ``threshold_`` is the ``1 - fpr`` quantile (linear interpolation, as ``np.quantile``) of all brain pixels
    of the validation maps whose image label is ``HEALTHY``; so about a fraction ``fpr`` of healthy brain
    pixels satisfy ``map >= threshold_`` (before the connected-component filter, which only lowers it).
    Uses image labels only, never pixel labels.

    Args:
        fpr: target pixel false-positive rate on healthy brain pixels, in (0, 1).
    """

    uses_pixel_labels: bool = False

    def __init__(self, fpr: float = 0.01) -> None:
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"HealthyQuantileThreshold: fpr must be in (0, 1), got {fpr}")
        self.fpr = float(fpr)
        self.threshold_: float | None = None
        self.n_pixels_: int | None = None

    def fit(
        self,
        maps: ArrayLike,
        brain: ArrayLike | None = None,
        masks: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> "HealthyQuantileThreshold":
        """Learn ``threshold_`` from the healthy slices' brain pixels.

        Args:
            maps: ``[B, 1, H, W]`` median-filtered validation maps.
            brain: ``[B, 1, H, W]`` bool brain masks; ``None`` = every pixel.
            masks: ignored (this policy never looks at pixel labels).
            labels: ``[B]`` image labels (required); only ``HEALTHY`` slices are used.

        Returns:
            self.
        """
        arr = _check_maps(maps)
        y = _check_labels(labels, arr.shape[0], "HealthyQuantileThreshold")
        healthy = y == HEALTHY
        if not healthy.any():
            raise ValueError("HealthyQuantileThreshold.fit: no HEALTHY slice among the validation maps")
        if brain is None:
            pixels = arr[healthy].reshape(-1)
        else:
            region = as_bool_mask(brain, "brain")
            check_same_shape(arr, region, "maps", "brain")
            pixels = arr[healthy][region[healthy]]
        if pixels.size == 0:
            raise ValueError("HealthyQuantileThreshold.fit: the healthy slices have no brain pixel")
        self.threshold_ = float(np.quantile(pixels, 1.0 - self.fpr))
        self.n_pixels_ = int(pixels.size)
        return self

    def predict(self, maps: ArrayLike) -> ArrayLike:
        """Masks ``map >= threshold_`` in the maps' framework.

        Raises:
            PolicyNotFittedError: ``fit`` was not called.
        """
        if self.threshold_ is None:
            raise PolicyNotFittedError(
                "HealthyQuantileThreshold: call fit(maps, brain, labels=...) on validation data first"
            )
        return like_input(_check_maps(maps) >= self.threshold_, maps)

    def to_dict(self) -> dict[str, Any]:
        """Description for a results row."""
        return {
            "policy": f"healthy-quantile(fpr={self.fpr:g})",
            "threshold": self.threshold_,
            "uses_pixel_labels": self.uses_pixel_labels,
        }


class OracleDiceThreshold:
    """Grid-searched threshold maximising the mean validation Dice (needs pixel labels).

    This is how the AnoFPDM paper tuned its baselines (spec C.10 "Baselines", D): for every candidate
    ``tau`` the masks ``map >= tau`` go through the connected-component filter (components of at most
    ``max_component_size`` pixels removed), and the per-slice Dice with the empty-vs-empty = 1 rule is
    averaged. The smallest ``tau`` with the best mean Dice wins.

    Args:
        grid: candidate thresholds; default ``np.arange(0.01, 0.7, 0.01)`` (the official grid, for maps in
            roughly [0, 1]).
        relative: if True, ``grid`` holds fractions of the validation maps' range and the candidates are
            ``min + g * (max - min)`` (for maps whose scale differs from the paper's).
        max_component_size: the CC filter applied before scoring (40, spec C.9; 0 = none).
        setup: ``"mixed"`` scores all validation slices; ``"unhealthy"`` only those with image label
            ``UNHEALTHY`` (then ``labels`` are required).
    """

    uses_pixel_labels: bool = True

    def __init__(
        self,
        grid: Sequence[float] | np.ndarray | None = None,
        relative: bool = False,
        max_component_size: int = MAX_COMPONENT_SIZE,
        setup: Literal["mixed", "unhealthy"] = "mixed",
    ) -> None:
        self.grid = np.asarray(DEFAULT_ORACLE_GRID if grid is None else grid, dtype=np.float64).reshape(-1)
        if self.grid.size == 0:
            raise ValueError("OracleDiceThreshold: grid must hold at least one candidate threshold")
        if setup not in ("mixed", "unhealthy"):
            raise ValueError(f"OracleDiceThreshold: setup must be 'mixed' or 'unhealthy', got {setup!r}")
        self.relative = bool(relative)
        self.max_component_size = int(max_component_size)
        self.setup = setup
        self.threshold_: float | None = None
        self.best_dice_: float | None = None
        self.candidates_: np.ndarray | None = None
        self.mean_dice_: np.ndarray | None = None

    def fit(
        self,
        maps: ArrayLike,
        brain: ArrayLike | None = None,
        masks: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> "OracleDiceThreshold":
        """Search the grid for the best mean Dice on validation data.

        Args:
            maps: ``[B, 1, H, W]`` median-filtered validation maps.
            brain: unused (Dice is computed on the whole image, as in the official code).
            masks: ``[B, 1, H, W]`` ground-truth pixel masks (required).
            labels: ``[B]`` image labels (required for ``setup="unhealthy"``).

        Returns:
            self, with ``threshold_``, ``best_dice_``, ``candidates_`` (absolute thresholds) and
            ``mean_dice_`` (mean Dice per candidate).
        """
        arr = _check_maps(maps)
        if masks is None:
            raise ValueError("OracleDiceThreshold.fit needs pixel labels: pass masks=[B,1,H,W] ground truth")
        gt = as_bool_mask(masks, "masks")
        check_same_shape(arr, gt, "maps", "masks")
        if self.setup == "unhealthy":
            rows = _check_labels(labels, arr.shape[0], "OracleDiceThreshold") == UNHEALTHY
            if not rows.any():
                raise ValueError("OracleDiceThreshold.fit(setup='unhealthy'): no UNHEALTHY validation slice")
            arr, gt = arr[rows], gt[rows]
        # 1. candidate thresholds: absolute grid, or fractions of the validation maps' range
        if self.relative:
            low, high = float(arr.min()), float(arr.max())
            candidates = low + self.grid * (high - low)
        else:
            candidates = self.grid.copy()
        # 2. mean Dice (empty vs empty = 1) after the CC filter, per candidate (spec C.9, C.10)
        mean_dice = np.empty(candidates.size, dtype=np.float64)
        for i, tau in enumerate(candidates):
            pred = remove_small_components(arr >= tau, self.max_component_size)
            mean_dice[i] = dice_from_counts(*overlap_counts(pred, gt)).mean()
        # 3. best mean Dice; the smallest threshold on ties (np.argmax takes the first)
        best = int(np.argmax(mean_dice))
        self.threshold_ = float(candidates[best])
        self.best_dice_ = float(mean_dice[best])
        self.candidates_ = candidates
        self.mean_dice_ = mean_dice
        return self

    def predict(self, maps: ArrayLike) -> ArrayLike:
        """Masks ``map >= threshold_`` in the maps' framework (apply the CC filter after, see ``segment``).

        Raises:
            PolicyNotFittedError: ``fit`` was not called.
        """
        if self.threshold_ is None:
            raise PolicyNotFittedError("OracleDiceThreshold: call fit(maps, brain, masks=...) on validation data first")
        return like_input(_check_maps(maps) >= self.threshold_, maps)

    def to_dict(self) -> dict[str, Any]:
        """Description for a results row."""
        return {
            "policy": "oracle-dice" + ("(relative grid)" if self.relative else ""),
            "threshold": self.threshold_,
            "uses_pixel_labels": self.uses_pixel_labels,
        }


def segment(maps: ArrayLike, policy: ThresholdPolicy, max_component_size: int = MAX_COMPONENT_SIZE) -> ArrayLike:
    """Threshold median-filtered maps with a fitted policy, then apply the CC filter (spec C.9 steps 1-2).

    Args:
        maps: ``[B, 1, H, W]`` median-filtered anomaly maps.
        policy: a fitted ``ThresholdPolicy``.
        max_component_size: components of at most this many pixels are removed (40; 0 = none).

    Returns:
        ``[B, 1, H, W]`` bool masks in the maps' framework.
    """
    return remove_small_components(policy.predict(maps), max_component_size)
