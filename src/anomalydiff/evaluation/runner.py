"""Run one method over a split of a slice store: fit on validation, score, post-process, evaluate, write.

The one place the stages meet (architecture.md "evaluation/"). :func:`run_method` does, in order:

1. **Samples** (spec E.11): a fixed number of *distinct* slices of the validation and of the scored split,
   drawn without replacement with a fixed seed (optionally label-balanced). The order of the draw is kept
   (it matters only for the per-batch AUPRC protocol).
2. **Fit on validation only** (never on the scored split): ``method.fit(val batches)`` (AnoFPDM learns w,
   tau_cos and D*_max from image labels, spec C.6 / C.8), or loads a given calibration. A method without a
   native threshold (AnoDDPM, DDIB, Wolleb P2) gets a fitted threshold policy on its validation maps: the
   oracle best-Dice one (pixel labels; how AnoFPDM's Table 1 tuned its baselines, spec C.10) and, as
   label-free alternatives, e.g. the healthy-quantile one (image labels only). Each is evaluated.
3. **Score** the slices batch by batch (progress bar), timing ``score`` and counting NFE per slice.
4. **Post-process consistently** (spec C.9 / D): a 5x5 median filter on the map where the method has not
   already applied one (a native Otsu mask is then recomputed on the filtered map, so map and mask agree),
   and removal of connected components of at most 40 pixels from every mask before Dice/IoU.
5. **Evaluate** with :func:`anomalydiff.metrics.evaluate_setups`: *mixed* (gated masks where the method has
   a healthy/unhealthy gate, AnoFPDM) and *unhealthy* (un-gated masks, ground-truth unhealthy slices);
   AUPRC on the continuous, un-gated map over foreground pixels (spec C.10). Every result states whether
   pixel labels were used (the tick/cross column of AnoFPDM Table 1).
6. **Write** (when ``out_dir`` is given): ``maps.npz`` (float16 maps, masks, labels, a display channel of the
   input and of the healthy counterfactual), ``calibration.json`` and ``metrics.json``.

Peak memory is the process's peak resident set size during the run (Linux: reset through
``/proc/self/clear_refs`` first, so it is this run's peak; elsewhere the process peak from ``getrusage``),
or ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from anomalydiff.config import to_dict
from anomalydiff.data.store import SliceStore
from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.metrics import MetricReport, evaluate_setups, foreground_from_image
from anomalydiff.postprocess import (
    HealthyQuantileThreshold,
    OracleDiceThreshold,
    OtsuThreshold,
    median_filter,
    remove_small_components,
)
from anomalydiff.records import Batch, collate_batch

__all__ = [
    "EvaluationConfig",
    "MethodResult",
    "POLICIES",
    "ScoredSlices",
    "has_native_threshold",
    "iter_batches",
    "iter_batches_to",
    "load_result",
    "make_policy",
    "method_device",
    "peak_memory_mb",
    "report_from_json",
    "reset_peak_memory",
    "run_method",
    "sample_rows",
    "score_slices",
]

PolicyName = Literal["oracle_dice", "healthy_quantile", "otsu"]
#: Threshold policies for methods without a native threshold (see ``anomalydiff.postprocess.thresholds``).
POLICIES: tuple[str, ...] = ("oracle_dice", "healthy_quantile", "otsu")
#: Relative oracle grid: fractions of the validation maps' range, finer near 0 where lesion thresholds sit.
RELATIVE_ORACLE_GRID: np.ndarray = np.geomspace(1e-3, 1.0, 120)


@dataclass(frozen=True)
class EvaluationConfig:
    """How a method is run over a store (defaults = the AnoFPDM protocol where it fixes a value)."""

    #: Split that is scored and evaluated; fitting always uses ``val_split`` (never tune on test).
    split: str = "test"
    #: Split used for fitting (AnoFPDM calibration, threshold policies).
    val_split: str = "val"
    #: Number of distinct slices scored; None = the whole split (spec C.1: 10,000 BraTS / 4,000 ATLAS).
    max_slices: int | None = None
    #: Number of distinct validation slices used for fitting; None = all (spec C.1: 1,000).
    val_slices: int | None = 1000
    #: Seed of the slice samples (spec E.11: distinct slices drawn with a fixed seed; code uses seed 0).
    seed: int = 0
    #: Draw the scored sample label-balanced (half healthy, half unhealthy where possible); paper: random.
    balanced: bool = False
    #: Draw the validation sample label-balanced (useful for small samples: fit needs both labels).
    balanced_val: bool = False
    #: Slices per ``score`` call (AnoFPDM batches of 100 on a GPU, spec F.2; ~16-32 on a CPU).
    batch_size: int = 16
    #: Threshold policy of methods without a native threshold (spec C.10: oracle Dice grid search, pixel labels).
    threshold_policy: PolicyName = "oracle_dice"
    #: Extra policies evaluated on the same maps (label-free alternatives), for methods without a native one.
    alternative_policies: tuple[str, ...] = ("healthy_quantile",)
    #: Target pixel false-positive rate of the healthy-quantile policy on healthy validation brain pixels.
    healthy_fpr: float = 0.01
    #: Oracle grid: "paper" = np.arange(0.01, 0.7, 0.01) absolute (spec C.10); "relative" = fractions of the
    #: validation maps' range (for maps whose scale differs from the paper's, e.g. short CPU-trained models).
    oracle_grid: Literal["paper", "relative"] = "paper"
    #: Median filter applied where the method has not filtered its map (spec C.9 / D: 5x5); 0 = off.
    median_size: int = 5
    #: Components of at most this many pixels are removed from every mask before Dice/IoU (spec C.9).
    min_component: int = 40
    #: AUPRC protocol: None = pooled over all foreground pixels; 100 = the official per-batch mean (C.10).
    per_batch: int | None = None
    #: Channel shown as "input" in figures; None = the method's first inference modality (else 0).
    display_channel: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_slices", "val_slices", "per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EvaluationConfig.{name} must be >= 1 or None, got {value}")
        if self.batch_size < 1:
            raise ValueError(f"EvaluationConfig.batch_size must be >= 1, got {self.batch_size}")
        for policy in (self.threshold_policy, *self.alternative_policies):
            if policy not in POLICIES:
                raise ValueError(f"unknown threshold policy {policy!r}; choose from {POLICIES}")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"EvaluationConfig.median_size must be 0 or odd, got {self.median_size}")
        if not 0.0 < self.healthy_fpr < 1.0:
            raise ValueError(f"EvaluationConfig.healthy_fpr must be in (0, 1), got {self.healthy_fpr}")


# ----------------------------------------------------------------------------------------------------------
# Samples and batches
# ----------------------------------------------------------------------------------------------------------
def sample_rows(
    store: SliceStore, split: str, num: int | None, seed: int, balanced: bool = False
) -> np.ndarray:
    """Distinct store rows of ``split``, drawn without replacement with a fixed seed (spec E.11).

    Args:
        store: the slice store.
        split: ``train`` / ``val`` / ``test``.
        num: number of slices; None (or more than the split has) = every slice of the split, shuffled.
        seed: seed of ``numpy.random.default_rng``.
        balanced: draw half healthy and half unhealthy slices (the rest from the other label when one runs
            short).

    Returns:
        ``[n]`` int64 store rows in the order drawn.

    Raises:
        ValueError: the split is empty.
    """
    rows = store.rows(split)
    if rows.size == 0:
        raise ValueError(f"{store.path}: split {split!r} has no slice; prepare the store with a non-empty {split} split")
    rng = np.random.default_rng(seed)
    if num is None or num >= rows.size:
        return rng.permutation(rows)
    if not balanced:
        return rng.choice(rows, size=num, replace=False)
    labels = np.array([store.slices[int(r)].label for r in rows])
    healthy, unhealthy = rng.permutation(rows[labels == HEALTHY]), rng.permutation(rows[labels == UNHEALTHY])
    take_unhealthy = min(unhealthy.size, num // 2)
    take_healthy = min(healthy.size, num - take_unhealthy)
    take_unhealthy = min(unhealthy.size, num - take_healthy)
    chosen = np.concatenate([healthy[:take_healthy], unhealthy[:take_unhealthy]])
    if chosen.size < num:  # slices with unknown labels fill the rest
        rest = np.setdiff1d(rows, chosen)
        chosen = np.concatenate([chosen, rng.permutation(rest)[: num - chosen.size]])
    return rng.permutation(chosen)


def iter_batches(store: SliceStore, rows: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Batches of the given store rows, in order.

    Args:
        store: the slice store.
        rows: store rows.
        batch_size: slices per batch (the last batch may be smaller).

    Yields:
        :class:`~anomalydiff.records.Batch` on the CPU.
    """
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, rows.size, batch_size):
        yield collate_batch([store.item(int(r)) for r in rows[start : start + batch_size]])


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Reset the peak-memory counter (CUDA allocator, or Linux peak RSS via ``/proc/self/clear_refs``).

    Args:
        device: the device the method runs on.

    Returns:
        True if the counter was reset (peaks are then this run's), False if only the process peak is known.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory` (CUDA: allocated tensors; CPU: resident set).

    Args:
        device: the device the method runs on.

    Returns:
        MiB.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------------------------
# Methods: native thresholds, policies, post-processing
# ----------------------------------------------------------------------------------------------------------
def has_native_threshold(method: Any) -> bool:
    """True when the method makes its own masks (AnoFPDM's Algorithm 1, Otsu per image).

    Args:
        method: an anomaly-detection method.

    Returns:
        Whether ``score`` returns ``pred_mask``.
    """
    if getattr(method, "name", None) == "anofpdm":
        return True
    try:
        calibration = method.calibration()
    except Exception:  # noqa: BLE001 - a method that must be fitted first: ask its config instead
        calibration = {}
    if "native_threshold" in calibration:
        return calibration["native_threshold"] is not None
    return getattr(getattr(method, "config", None), "threshold", "policy") != "policy"


def make_policy(name: str, config: EvaluationConfig) -> Any:
    """A fresh threshold policy by name (``anomalydiff.postprocess``).

    Args:
        name: ``oracle_dice``, ``healthy_quantile`` or ``otsu``.
        config: grid, false-positive rate and CC size.

    Returns:
        An unfitted policy.
    """
    if name == "oracle_dice":
        relative = config.oracle_grid == "relative"
        return OracleDiceThreshold(
            grid=RELATIVE_ORACLE_GRID if relative else None,
            relative=relative,
            max_component_size=config.min_component,
            setup="mixed",
        )
    if name == "healthy_quantile":
        return HealthyQuantileThreshold(fpr=config.healthy_fpr)
    if name == "otsu":
        return OtsuThreshold()
    raise ValueError(f"unknown threshold policy {name!r}; choose from {POLICIES}")


def _method_median_size(method: Any) -> int:
    """Median filter size the method applies itself (0 = none)."""
    return int(getattr(getattr(method, "config", None), "median_size", 0) or 0)


def _display_channel(method: Any, config: EvaluationConfig, channels: int) -> int:
    if config.display_channel is not None:
        return min(config.display_channel, channels - 1)
    modalities = getattr(getattr(method, "config", None), "modalities", None)
    return int(modalities[0]) if modalities else 0


@dataclass
class ScoredSlices:
    """Post-processed outputs of a method on a set of slices (numpy, CPU).

    Attributes:
        rows: ``[N]`` store rows.
        labels: ``[N]`` image labels.
        subject_id: ``N`` subject ids.
        slice_index: ``[N]`` slice positions.
        gt_mask: ``[N,1,H,W]`` bool pixel labels, or None when the slices have none.
        brain: ``[N,1,H,W]`` bool foreground masks of the store.
        foreground: ``[N,1,H,W]`` bool AUPRC pixels (channel mean > -0.95, spec C.10).
        anomaly_map: ``[N,1,H,W]`` float32 median-filtered map (un-gated).
        native_mask: ``[N,1,H,W]`` bool un-gated native mask after the CC filter, or None.
        pred_label: ``[N]`` the method's healthy/unhealthy gate, or None.
        image_score: ``[N]`` image scores.
        image: ``[N,1,H,W]`` float16 display channel of the input.
        counterfactual: ``[N,1,H,W]`` float16 display channel of the healthy prediction / reconstruction, or None.
        extras: per-slice method extras (``[N]``, ``[N,K]`` or ``[N,K,M]``; e.g. AnoFPDM's ``end_step``, ``cos``).
        nfe: network evaluations per slice (method's count).
        classifier_evaluations: classifier evaluations per slice (0 if none).
        seconds: wall time spent in ``score``; cpu_seconds: process CPU time in ``score``.
    """

    rows: np.ndarray
    labels: np.ndarray
    subject_id: list[str]
    slice_index: np.ndarray
    gt_mask: np.ndarray | None
    brain: np.ndarray
    foreground: np.ndarray
    anomaly_map: np.ndarray
    native_mask: np.ndarray | None
    pred_label: np.ndarray | None
    image_score: np.ndarray
    image: np.ndarray
    counterfactual: np.ndarray | None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    nfe: int = 0
    classifier_evaluations: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def score_slices(
    method: Any,
    store: SliceStore,
    rows: np.ndarray,
    config: EvaluationConfig,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "score",
) -> ScoredSlices:
    """Score store rows with ``method`` and post-process consistently (spec C.9 / D).

    Post-processing: a ``config.median_size`` median filter on the map where the method has none (a native
    Otsu mask is then recomputed on the filtered map); the CC filter (``config.min_component``) on the
    native mask. AnoFPDM's native mask is its un-gated Algorithm-1 mask (``extras["mask_ungated"]``) and
    its gate is ``pred_label``.

    Args:
        method: a fitted method.
        store: the slice store.
        rows: store rows to score.
        config: post-processing and batching settings.
        device: where the batches go (the method's networks' device); None = CPU.
        progress: show a tqdm progress bar.
        desc: progress bar label.

    Returns:
        :class:`ScoredSlices`.
    """
    device = device or torch.device("cpu")
    own_median = _method_median_size(method)
    native = has_native_threshold(method)
    keep_largest = bool(getattr(getattr(method, "config", None), "keep_largest_component", False))
    parts: dict[str, list[Any]] = {}
    extras_parts: dict[str, list[np.ndarray]] = {}
    has_gt = True
    nfe, classifier_evaluations, seconds, cpu_seconds = 0, 0, 0.0, 0.0
    display = None
    bar = tqdm(total=len(rows), desc=desc, unit="slice", disable=not progress, leave=False)
    for batch in iter_batches(store, rows, config.batch_size):
        if display is None:
            display = _display_channel(method, config, batch.image.shape[1])
        wall, cpu = time.perf_counter(), time.process_time()
        output = method.score(batch.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - wall
        cpu_seconds += time.process_time() - cpu
        nfe = int(output.nfe)
        classifier_evaluations = int(output.extras.get("classifier_evaluations", 0) or 0)
        maps = output.anomaly_map.detach().float().cpu()
        refilter = own_median == 0 and config.median_size > 0
        if refilter:
            # 1. the shared 5x5 median filter where the method has not filtered (spec C.9 / D)
            maps = median_filter(maps, size=config.median_size)
        mask = None
        if native:
            raw = output.extras.get("mask_ungated", output.pred_mask) if output.pred_label is not None else output.pred_mask
            if raw is None:
                raise ValueError(f"{getattr(method, 'name', method)} has a native threshold but returned no pred_mask")
            if refilter:
                # 1b. a per-image Otsu mask follows its (now filtered) map
                raw = torch.as_tensor(OtsuThreshold().predict(maps)).bool()
                if keep_largest:
                    from anomalydiff.methods.cgcdm import keep_largest_component

                    raw = keep_largest_component(raw)
            # 2. CC filter before Dice/IoU (spec C.9)
            mask = remove_small_components(raw.detach().cpu().bool(), max_size=config.min_component)
        image = batch.image
        counterfactual = None
        if "hgp_at_end" in output.extras:
            modalities = getattr(method.config, "modalities", None) or list(range(image.shape[1]))
            index = list(modalities).index(display) if display in modalities else 0
            counterfactual = output.extras["hgp_at_end"][:, index : index + 1]
        elif "reconstruction" in output.extras:
            counterfactual = output.extras["reconstruction"][:, display : display + 1]
        if batch.mask is None:
            has_gt = False
        for key, value in (
            ("labels", batch.label.numpy()),
            ("slice_index", batch.slice_index.numpy()),
            ("brain", batch.brain.numpy()),
            ("foreground", np.asarray(foreground_from_image(image))),
            ("anomaly_map", maps.numpy().astype(np.float32)),
            ("image_score", output.image_score.detach().float().cpu().numpy()),
            ("image", image[:, display : display + 1].numpy().astype(np.float16)),
        ):
            parts.setdefault(key, []).append(value)
        parts.setdefault("subject_id", []).extend(batch.subject_id)
        if batch.mask is not None:
            parts.setdefault("gt_mask", []).append(batch.mask.numpy())
        if mask is not None:
            parts.setdefault("native_mask", []).append(mask.numpy())
        if output.pred_label is not None:
            parts.setdefault("pred_label", []).append(output.pred_label.detach().cpu().numpy())
        if counterfactual is not None:
            parts.setdefault("counterfactual", []).append(counterfactual.detach().float().cpu().numpy().astype(np.float16))
        for key, value in output.extras.items():
            if (
                isinstance(value, torch.Tensor)
                and 1 <= value.ndim <= 3
                and value.shape[0] == len(batch)
                and key not in ("mask_ungated", "timesteps")  # timesteps: [T''], not per slice
            ):
                extras_parts.setdefault(key, []).append(value.detach().float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not parts:
        raise ValueError("score_slices: no rows to score")
    cat = {key: (np.concatenate(value) if key != "subject_id" else value) for key, value in parts.items()}
    return ScoredSlices(
        rows=np.asarray(rows, dtype=np.int64),
        labels=cat["labels"].astype(np.int64),
        subject_id=list(cat["subject_id"]),
        slice_index=cat["slice_index"].astype(np.int64),
        gt_mask=cat["gt_mask"].astype(bool) if has_gt and "gt_mask" in cat else None,
        brain=cat["brain"].astype(bool),
        foreground=cat["foreground"].astype(bool),
        anomaly_map=cat["anomaly_map"],
        native_mask=cat.get("native_mask"),
        pred_label=cat["pred_label"].astype(np.int64) if "pred_label" in cat else None,
        image_score=cat["image_score"],
        image=cat["image"],
        counterfactual=cat.get("counterfactual"),
        # per-slice extras only (a key whose batches do not add up to one entry per slice is dropped)
        extras={
            key: np.concatenate(value)
            for key, value in extras_parts.items()
            if sum(v.shape[0] for v in value) == len(rows) and len({v.shape[1:] for v in value}) == 1
        },
        nfe=nfe,
        classifier_evaluations=classifier_evaluations,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


def _evaluate(
    scored: ScoredSlices, masks: np.ndarray, uses_pixel_labels: bool, config: EvaluationConfig
) -> dict[str, MetricReport]:
    """Mixed and unhealthy reports of one set of (un-gated, CC-filtered) masks."""
    if scored.gt_mask is None:
        return {}
    return evaluate_setups(
        scored.anomaly_map,
        masks,
        scored.gt_mask,
        scored.labels,
        uses_pixel_labels=uses_pixel_labels,
        foreground=scored.foreground,
        pred_labels=scored.pred_label,
        image_scores=scored.image_score,
        subject_ids=scored.subject_id,
        slice_index=scored.slice_index,
        per_batch=config.per_batch,
    )


def _report_to_json(report: MetricReport) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(report), default=float))


def report_from_json(data: dict[str, Any]) -> MetricReport:
    """Rebuild a :class:`~anomalydiff.metrics.MetricReport` from its ``metrics.json`` form."""
    return MetricReport(**data)


# ----------------------------------------------------------------------------------------------------------
# The result of one run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """What :func:`run_method` produced (also the content of ``metrics.json``).

    Attributes:
        name: a label of the run (e.g. the preset name).
        method: the method's ``name``.
        primary: the evaluation shown first: ``"native"`` or the threshold policy's name.
        evaluations: evaluation name -> ``{"uses_pixel_labels", "policy", "reports": {setup: MetricReport}}``.
        cost: ``nfe_per_slice``, ``classifier_evaluations_per_slice``, ``seconds_per_slice``,
            ``cpu_seconds_per_slice``, ``fit_seconds``, ``peak_memory_mb`` (and how it was measured).
        calibration: ``method.calibration()`` after fitting.
        policies: evaluation name -> fitted policy description (threshold, val Dice, ...).
        samples: sizes and seeds of the validation and scored samples.
        info: config of the run, method config, device, software versions.
        out_dir: where the files were written (None if not written).
    """

    name: str
    method: str
    primary: str
    evaluations: dict[str, dict[str, Any]]
    cost: dict[str, Any]
    calibration: dict[str, Any]
    policies: dict[str, dict[str, Any]]
    samples: dict[str, Any]
    info: dict[str, Any]
    out_dir: Path | None = None

    def reports(self, evaluation: str | None = None) -> dict[str, MetricReport]:
        """Setup -> report of ``evaluation`` (default: the primary one)."""
        return self.evaluations[evaluation or self.primary]["reports"]

    def uses_pixel_labels(self, evaluation: str | None = None) -> bool:
        """Whether anything behind ``evaluation`` (default primary) saw pixel labels."""
        return bool(self.evaluations[evaluation or self.primary]["uses_pixel_labels"])

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (the ``metrics.json`` content)."""
        return {
            "name": self.name,
            "method": self.method,
            "primary": self.primary,
            "evaluations": {
                key: {
                    "uses_pixel_labels": value["uses_pixel_labels"],
                    "policy": value["policy"],
                    "reports": {setup: _report_to_json(report) for setup, report in value["reports"].items()},
                }
                for key, value in self.evaluations.items()
            },
            "cost": self.cost,
            "calibration": self.calibration,
            "policies": self.policies,
            "samples": self.samples,
            "info": self.info,
        }


def load_result(out_dir: str | Path) -> MethodResult:
    """Read the ``metrics.json`` written by :func:`run_method` back into a :class:`MethodResult`.

    Args:
        out_dir: the run's output folder.

    Returns:
        The result (``out_dir`` set).
    """
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `anomalydiff detect ... --out {out_dir}` first")
    data = json.loads(path.read_text())
    evaluations = {
        key: {
            "uses_pixel_labels": value["uses_pixel_labels"],
            "policy": value["policy"],
            "reports": {setup: report_from_json(report) for setup, report in value["reports"].items()},
        }
        for key, value in data["evaluations"].items()
    }
    return MethodResult(
        name=data["name"],
        method=data["method"],
        primary=data["primary"],
        evaluations=evaluations,
        cost=data["cost"],
        calibration=data["calibration"],
        policies=data["policies"],
        samples=data["samples"],
        info=data["info"],
        out_dir=Path(out_dir),
    )


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, default=str))
    tmp.replace(path)


def method_device(method: Any) -> torch.device:
    """Where a method's networks live (the device its batches must go to); CPU for a method without networks."""
    for attribute in ("eps_model", "classifier"):
        module = getattr(method, attribute, None)
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                return parameter.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# run_method
# ----------------------------------------------------------------------------------------------------------
def run_method(
    method: Any,
    store: SliceStore | str | Path,
    config: EvaluationConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    name: str | None = None,
    calibration: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    **overrides: Any,
) -> MethodResult:
    """Fit a method on validation, score a split, post-process, evaluate and (optionally) write the files.

    Args:
        method: an unfitted (or calibrated) method from :mod:`anomalydiff.methods`.
        store: the slice store (or its path).
        config: :class:`EvaluationConfig`; ``overrides`` replace its fields (e.g. ``split="test",
            batch_size=8, max_slices=100, seed=0, threshold_policy="oracle_dice"``).
        out_dir: folder for ``maps.npz``, ``calibration.json`` and ``metrics.json`` (created); None = no files.
        name: label of the run (default: the method's name).
        calibration: a calibration dict to load instead of fitting (e.g. AnoFPDM (DDIM) and (DDIM t_e)
            share one fit, since their calibrations are identical).
        device: where batches go; None = the device of the method's networks.
        progress: show progress bars.
        info: extra facts stored in ``metrics.json`` (e.g. model sha256, preset, overrides).

    Returns:
        :class:`MethodResult`.

    Raises:
        ValueError: the scored split has no pixel labels and a policy needs them, or the samples are empty.
    """
    config = dataclasses.replace(config or EvaluationConfig(), **overrides)
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    device = torch.device(device) if device is not None else method_device(method)
    name = name or str(getattr(method, "name", type(method).__name__))
    exact_peak = reset_peak_memory(device)
    started = time.perf_counter()

    # 1. samples: distinct slices with a fixed seed (spec E.11); fitting sees validation only
    val_rows = sample_rows(store, config.val_split, config.val_slices, config.seed, config.balanced_val)
    test_rows = sample_rows(store, config.split, config.max_slices, config.seed, config.balanced)

    # 2. fit on validation (image labels for AnoFPDM, spec C.6 / C.8), or load a calibration
    fit_wall = time.perf_counter()
    if calibration is not None:
        method.load_calibration(calibration)
        fit_source = "loaded"
    else:
        method.fit(iter_batches_to(store, val_rows, config.batch_size, device))
        fit_source = "fitted"
    native = has_native_threshold(method)
    policies: dict[str, Any] = {}
    if not native:
        val_scored = score_slices(method, store, val_rows, config, device, progress, desc=f"{name} val")
        for policy_name in dict.fromkeys((config.threshold_policy, *config.alternative_policies)):
            policy = make_policy(policy_name, config)
            if policy.uses_pixel_labels and val_scored.gt_mask is None:
                raise ValueError(
                    f"threshold policy {policy_name} needs pixel labels but the {config.val_split} split of "
                    f"{store.path} has none; use --threshold-policy healthy_quantile"
                )
            policy.fit(val_scored.anomaly_map, val_scored.brain, val_scored.gt_mask, val_scored.labels)
            policies[policy_name] = policy
    fit_seconds = time.perf_counter() - fit_wall

    # 3.-4. score the split (post-processed as in spec C.9 / D)
    scored = score_slices(method, store, test_rows, config, device, progress, desc=f"{name} {config.split}")
    peak = peak_memory_mb(device)

    # 5. evaluate: native masks, or each fitted policy's masks (CC filter before Dice/IoU)
    method_labels = bool(getattr(method, "uses_pixel_labels", False))
    evaluations: dict[str, dict[str, Any]] = {}
    masks: dict[str, np.ndarray] = {}
    policy_info: dict[str, dict[str, Any]] = {}
    if native:
        assert scored.native_mask is not None
        masks["native"] = scored.native_mask
        evaluations["native"] = {
            "uses_pixel_labels": method_labels,
            "policy": {"policy": "native", "threshold": None, "uses_pixel_labels": False},
            "reports": _evaluate(scored, scored.native_mask, method_labels, config),
        }
        primary = "native"
    else:
        for policy_name, policy in policies.items():
            mask = np.asarray(remove_small_components(np.asarray(policy.predict(scored.anomaly_map)), config.min_component))
            uses = method_labels or bool(policy.uses_pixel_labels)
            masks[policy_name] = mask
            description = policy.to_dict()
            if getattr(policy, "best_dice_", None) is not None:
                description["val_dice"] = policy.best_dice_
            policy_info[policy_name] = description
            evaluations[policy_name] = {
                "uses_pixel_labels": uses,
                "policy": description,
                "reports": _evaluate(scored, mask, uses, config),
            }
        primary = config.threshold_policy
    n = max(len(scored), 1)
    cost = {
        "nfe_per_slice": scored.nfe,
        "classifier_evaluations_per_slice": scored.classifier_evaluations,
        "seconds_per_slice": scored.seconds / n,
        "cpu_seconds_per_slice": scored.cpu_seconds / n,
        "fit_seconds": fit_seconds,
        "fit": fit_source,
        "total_seconds": time.perf_counter() - started,
        "peak_memory_mb": peak,
        "peak_memory_scope": ("cuda max_memory_allocated" if device.type == "cuda" else "peak RSS of this run")
        if exact_peak
        else "peak RSS of the whole process",
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    samples = {
        "val_split": config.val_split,
        "val_slices": int(val_rows.size),
        "val_unhealthy": int(sum(store.slices[int(r)].label == UNHEALTHY for r in val_rows)),
        "split": config.split,
        "slices": int(test_rows.size),
        "unhealthy": int((scored.labels == UNHEALTHY).sum()),
        "seed": config.seed,
        "balanced": config.balanced,
        "balanced_val": config.balanced_val,
        "has_pixel_labels": scored.gt_mask is not None,
    }
    run_info = {
        "evaluation_config": to_dict(config),
        "method_config": to_dict(method.config) if dataclasses.is_dataclass(getattr(method, "config", None)) else None,
        "store": str(store.path),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **(info or {}),
    }
    result = MethodResult(
        name=name,
        method=str(getattr(method, "name", type(method).__name__)),
        primary=primary,
        evaluations=evaluations,
        cost=cost,
        calibration=method.calibration(),
        policies=policy_info,
        samples=samples,
        info=run_info,
    )

    # 6. files
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_maps(out / "maps.npz", scored, masks, primary)
        _write_json(
            out / "calibration.json",
            {"method": result.calibration, "threshold_policies": policy_info, "fit": fit_source,
             "val_rows": [int(r) for r in val_rows]},
        )
        _write_json(out / "metrics.json", result.to_json())
        result.out_dir = out
    return result


def iter_batches_to(store: SliceStore, rows: np.ndarray, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """:func:`iter_batches` moved to ``device``."""
    for batch in iter_batches(store, rows, batch_size):
        yield batch.to(device)


def _write_maps(path: Path, scored: ScoredSlices, masks: dict[str, np.ndarray], primary: str) -> None:
    """``maps.npz``: float16 maps, masks (primary un-gated and gated, one per policy), labels, display images."""
    primary_mask = masks[primary]
    gate = scored.pred_label
    gated = primary_mask if gate is None else primary_mask & (gate == UNHEALTHY)[:, None, None, None]
    arrays: dict[str, np.ndarray] = {
        "anomaly_map": scored.anomaly_map.astype(np.float16),
        "pred_mask": primary_mask.astype(bool),
        "pred_mask_gated": gated.astype(bool),
        "pred_label": np.full(len(scored), -1, np.int64) if gate is None else gate,
        "label": scored.labels,
        "image_score": scored.image_score.astype(np.float32),
        "subject_id": np.asarray(scored.subject_id, dtype=str),
        "slice_index": scored.slice_index,
        "row": scored.rows,
        "image": scored.image,
        "brain": scored.brain,
    }
    if scored.gt_mask is not None:
        arrays["gt_mask"] = scored.gt_mask
    if scored.counterfactual is not None:
        arrays["counterfactual"] = scored.counterfactual
    for policy_name, mask in masks.items():
        if policy_name != primary:
            arrays[f"pred_mask__{policy_name}"] = mask.astype(bool)
    for key, value in scored.extras.items():
        arrays[f"extras__{key}"] = value.astype(np.float32)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
