"""The :class:`Predictor`: a trained model + a calibrated method + the training store's preprocessing, applied
to users' scans, with maps and masks returned in the scan's own voxel grid.

Python API (what the README shows)::

    from anomalydiff.predict import Predictor

    predictor = Predictor.from_model_dir("models/phantom", method="anofpdm_ddim", device="auto")
    if not predictor.is_calibrated:
        predictor.fit("stores/brats64")                 # AnoFPDM: w, tau_cos, D*_max from the val split
    result = predictor.predict_array(flair_t1_t1ce_t2, affine=affine)   # [X, Y, Z, 4] array in memory
    result.anomaly_map.shape == flair_t1_t1ce_t2.shape[:3]              # the input's own grid
    rows = predictor.predict_path("scans/BraTS2021_00042", "out/")     # files, see anomalydiff.predict.writer

**Where the parts come from** (``from_model_dir``; the first match wins):

- networks: a model folder with ``cfg/ classifier/ healthy_gaussian/ healthy_simplex/`` run folders; a single
  ``train`` run folder (``ema.safetensors``); a ``benchmark`` output folder (its ``models/``, or the run folders
  its ``runs/*/seed_*/metrics.json`` name); explicit ``{part: run folder or ema.safetensors}``. Only
  safetensors + JSON are ever loaded (``anomalydiff.models.load_model``); pickle files are refused.
- calibration: ``--calibration FILE`` (the ``calibration.json`` of ``detect`` / ``benchmark`` / ``predict``, or a
  method's bare ``calibration()`` JSON); else a calibration of the same method in ``MODEL/calibration.json``,
  ``MODEL/calibrations/<preset>.json`` (also in the folder above a train run folder), or up to 3 levels below the
  folder given as ``MODEL`` (detect / benchmark runs; their ``metrics.json`` names the preset, the primary threshold
  policy and the networks' sha256). Order: calibrations of other networks last, then the exact preset, then
  presets by (name length, name), then by path (lowest seed first). Else :meth:`Predictor.fit` on a store's val
  split. Folders beside the model are never searched (a sibling's calibration is not this model's).
- preprocessing: see :mod:`anomalydiff.predict.inputs` (``preprocess.json`` / ``store.json``).

**Method config.** With a calibration and ``method`` naming the method (``anofpdm``) or the calibration's own
preset, the method runs with the config the calibration was fitted under (``--set key=value`` overrides apply on
top). Another preset of the method (e.g. ``anofpdm_ddim_te`` on a DDIM calibration), and any run without a
calibration, use the preset's YAML plus overrides. Either way the method refuses a calibration of another setting, model or
guidance strength w.

**Post-processing** (as ``anomalydiff.evaluation.runner.score_slices``, spec C.9 / D): a ``median_size`` median
filter on the map where the method applies none (a native per-image Otsu mask is then recomputed on the filtered
map); masks lose connected components of at most ``min_component`` pixels. Masks: AnoFPDM's Algorithm-1 mask
gated by its healthy/unhealthy decision; Otsu methods their own; others ``map >= threshold`` of the calibration's
threshold policy.

**Decisions.**

- per slice: the method's gate where it has one (AnoFPDM: ``s_cos <= tau_cos``); else
  ``image_score >= image_threshold`` when the calibration has an image threshold (``fit`` learns it: the
  ``1 - image_fpr`` quantile of the healthy validation slices' image scores); else "the mask is not empty".
- per subject: AnoFPDM (a gate): score = share of the subject's slices the gate flags; unhealthy iff the share is
  at least ``subject_share`` (default 0.1: the gate's false-positive rate on healthy validation slices is the
  chosen healthy quantile, at most 9.5 %, spec C.6). Others: score = the maximum image score over the slices;
  unhealthy iff it reaches the calibration's image threshold, or (without one) iff the mask has any voxel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalydiff.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    parse_override,
    to_dict,
)
from anomalydiff.data.geometry import (
    SLICE_AXIS,
    slice_to_image,
    slices_to_volume,
    to_canonical,
)
from anomalydiff.data.store import SliceStore
from anomalydiff.data.volumes import DataInputError
from anomalydiff.evaluation.models import (
    PART_NAMES,
    Parts,
    build_method_from_parts,
    load_parts,
)
from anomalydiff.evaluation.runner import (
    EvaluationConfig,
    has_native_threshold,
    iter_batches,
    make_policy,
    method_device,
    sample_rows,
)
from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.methods import METHODS, method_config, method_of_preset
from anomalydiff.methods.base import NotFittedError
from anomalydiff.models.io import CheckpointError
from anomalydiff.postprocess import (
    FixedThreshold,
    OtsuThreshold,
    median_filter,
    remove_small_components,
)
from anomalydiff.predict.inputs import (
    PREPROCESS_FILE,
    LoadedSubject,
    PreprocessRecord,
    find_preprocess,
    loaded_from_array,
    prepare_loaded,
    read_preprocess,
)
from anomalydiff.records import Batch

__all__ = [
    "CALIBRATION_FORMAT",
    "PICKLE_SUFFIXES",
    "PredictConfig",
    "Prediction",
    "Predictor",
    "find_calibration",
    "locate_model",
    "read_calibration",
]

#: ``format`` of the calibration files predict writes (``OUT/calibration.json``).
CALIBRATION_FORMAT = "anomalydiff-predict-calibration"
#: Checkpoint suffixes that are pickles: never loaded (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
#: Threshold policies in the order a calibration's primary is guessed when none is recorded.
_POLICY_ORDER = ("oracle_dice", "healthy_quantile", "otsu")


@dataclass(frozen=True)
class PredictConfig:
    """How predict scores, post-processes and decides (defaults = the evaluation protocol's, spec C.9 / D)."""

    batch_size: int = 16  # slices per score() call (CPU ~16-32; results do not depend on it)
    median_size: int = 5  # median filter on maps of methods without their own (spec C.9 / D: 5x5); 0 = off
    min_component: int = 40  # connected components of <= this many pixels are removed from masks (spec C.9)
    subject_share: float = 0.1  # gated methods: unhealthy subject iff >= this share of slices flagged (module doc)
    threshold_policy: str | None = None  # baselines: which policy of the calibration; None = its primary one
    fit_policy: str = "healthy_quantile"  # fit(): policy fitted for baselines (label-free: image labels only)
    healthy_fpr: float = 0.01  # fit(): healthy-quantile policy's pixel false-positive rate (runner default)
    image_fpr: float = 0.05  # fit(): image threshold = (1 - image_fpr) quantile of healthy val image scores
    val_slices: int | None = 1000  # fit(): distinct validation slices (spec C.1: 1,000)
    seed: int = 0  # fit(): seed of the validation sample (spec E.11)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"PredictConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"PredictConfig.median_size must be 0 or odd, got {self.median_size}")
        if self.min_component < 0:
            raise ValueError(f"PredictConfig.min_component must be >= 0, got {self.min_component}")
        if not 0.0 < self.subject_share <= 1.0:
            raise ValueError(f"PredictConfig.subject_share must be in (0, 1], got {self.subject_share}")
        if not 0.0 < self.image_fpr < 1.0 or not 0.0 < self.healthy_fpr < 1.0:
            raise ValueError("PredictConfig.image_fpr and healthy_fpr must be in (0, 1)")


@dataclass
class Prediction:
    """A subject's results, in the input's own grid and in the model's slice space.

    Attributes:
        subject_id: the subject.
        kind: ``"volume"`` or ``"image"``.
        anomaly_map: ``[X, Y, Z]`` (or ``[h, w]``) float32 on the input's grid; 0 outside the scored slices.
        mask: same shape, bool.
        slice_maps: ``[S, R, R]`` float32 maps at the model resolution.
        slice_masks: ``[S, R, R]`` bool masks at the model resolution.
        slice_images: ``[S, R, R]`` float32 first channel of the model input (for figures).
        slice_indices: ``S`` canonical axial slice indices (0 for a 2-D image).
        slices: one dict per slice (the per-slice CSV rows).
        summary: the subject-level decision, score and volumes (the ``predictions.csv`` row).
        subject_info: geometry record used to map slices back (``slices_to_volume`` / ``slice_to_image``).
        loaded: the loaded input (voxels, affine, sources).
    """

    subject_id: str
    kind: str
    anomaly_map: np.ndarray
    mask: np.ndarray
    slice_maps: np.ndarray
    slice_masks: np.ndarray
    slice_images: np.ndarray
    slice_indices: list[int]
    slices: list[dict[str, Any]]
    summary: dict[str, Any]
    subject_info: dict[str, Any]
    loaded: LoadedSubject | None = None


# ----------------------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelLocation:
    """What :func:`locate_model` found.

    Attributes:
        parts: the argument for :func:`~anomalydiff.evaluation.models.load_parts` (folder or ``{part: path}``).
        search_dirs: folders whose own ``calibration.json`` / ``preprocess.json`` count, most specific first.
        deep: the folder the user named, also searched up to 3 levels down (detect / benchmark runs, a store
            inside it); None for explicit files. Never a parent: a sibling's calibration is not this model's.
        description: how the folder was read (for messages and the run record).
    """

    parts: Any
    search_dirs: list[Path]
    description: str
    deep: Path | None = None


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint ({path.suffix}); anomalydiff loads models only from safetensors + JSON "
            "(unpickling can run arbitrary code). Use the ema.safetensors + ema.json of a `train` run folder, or "
            "export the network with anomalydiff.models.save_model"
        )


def _benchmark_runs(folder: Path) -> list[Path]:
    """``metrics.json`` files of detect / benchmark runs at most 3 levels below ``folder`` (folder included)."""
    found = []
    for depth in range(4):
        found.extend(sorted(folder.glob("/".join(["*"] * depth + ["metrics.json"]))))
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def locate_model(model: str | Path | Mapping[str, str | Path]) -> ModelLocation:
    """Find the networks of ``--model`` (module docstring lists the accepted folders and files).

    Args:
        model: a folder or ``ema.safetensors`` file, or ``{part: run folder or file}``.

    Returns:
        :class:`ModelLocation`.

    Raises:
        CheckpointError: a pickle file, a missing path, or a folder holding no model.
    """
    if isinstance(model, Mapping):
        for path in model.values():
            _refuse_pickle(Path(path))
        runs = {str(k): Path(v) for k, v in model.items()}
        dirs = [p if p.is_dir() else p.parent for p in runs.values()]
        return ModelLocation(runs, list(dict.fromkeys([*dirs, *[d.parent for d in dirs]])), "explicit parts")
    path = Path(model)
    _refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"--model {path} not found; pass a model folder, a train run folder or an ema.safetensors file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"--model {path}: expected a folder or an .safetensors file (with its .json beside it)")
        return ModelLocation(path, [path.parent, path.parent.parent], "weight file")
    if (path / "ema.safetensors").exists():
        return ModelLocation(path, [path, path.parent], "train run folder", deep=path)
    if any((path / part).is_dir() for part in PART_NAMES):
        return ModelLocation(path, [path, path.parent], "model folder", deep=path)
    if (path / "models").is_dir() and any((path / "models" / part).is_dir() for part in PART_NAMES):
        return ModelLocation(path / "models", [path, path / "models"], "benchmark folder (trained models)", deep=path)
    runs: dict[str, Path] = {}
    for metrics in _benchmark_runs(path):
        for part, facts in (_read_json(metrics).get("info", {}).get("models") or {}).items():
            if isinstance(facts, dict) and facts.get("run_dir") and part not in runs:
                runs[part] = Path(facts["run_dir"])
    if runs:
        return ModelLocation(runs, [path], "benchmark / detect folder (models named in metrics.json)", deep=path)
    raise CheckpointError(
        f"--model {path} holds no model: expected part folders ({', '.join(p + '/' for p in PART_NAMES)}), a train "
        "run folder (ema.safetensors), or a benchmark / detect output folder"
    )


# ----------------------------------------------------------------------------------------------------------
# Calibrations
# ----------------------------------------------------------------------------------------------------------
def read_calibration(path: str | Path) -> dict[str, Any]:
    """Read any calibration file into predict's normalised form.

    Accepted: predict's own ``calibration.json``; the ``calibration.json`` of ``detect`` / ``benchmark`` runs
    (``{"method": ..., "threshold_policies": ...}``, with the run's ``metrics.json`` beside it giving the preset,
    the primary policy and the models' sha256); a method's bare ``calibration()`` dict.

    Args:
        path: the JSON file.

    Returns:
        ``{"format", "method" (the method's calibration dict), "preset", "threshold_policies" {name: {policy,
        threshold}}, "primary_policy", "image_threshold", "models" {part: sha256}, "source"}``.
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise ConfigError(f"calibration file {path} not found")
    data = _read_json(path)
    if data.get("format") == CALIBRATION_FORMAT:
        return {**data, "source": str(path)}
    if isinstance(data.get("method"), dict):  # detect / benchmark run
        method = data["method"]
        policies = dict(data.get("threshold_policies") or {})
    elif isinstance(data.get("method"), str):  # a bare method.calibration()
        method, policies = data, {}
    else:
        raise ConfigError(f"{path} is not a calibration: it has no 'method' entry (write one with `anomalydiff detect` or predict --calibration-store)")
    preset, primary, models = None, None, {}
    metrics_file = path.parent / "metrics.json"
    if metrics_file.is_file():
        metrics = _read_json(metrics_file)
        info = metrics.get("info", {})
        preset = info.get("preset")
        primary = metrics.get("primary") if metrics.get("primary") in policies else None
        models = {p: f.get("sha256") for p, f in (info.get("models") or {}).items() if isinstance(f, dict)}
    return {
        "format": CALIBRATION_FORMAT,
        "version": 1,
        "method": method,
        "preset": preset or method.get("method"),
        "threshold_policies": policies,
        "primary_policy": primary,
        "image_threshold": data.get("image_threshold"),
        "models": {k: v for k, v in models.items() if v},
        "source": str(path),
    }


def _candidate_files(folder: Path, preset: str, deep: bool) -> list[Path]:
    files = [folder / "calibration.json", folder / "calibrations" / f"{preset}.json", folder / f"calibration_{preset}.json"]
    for depth in range(1, 4 if deep else 1):
        files.extend(sorted(folder.glob("/".join(["*"] * depth + ["calibration.json"]))))
    return [f for f in dict.fromkeys(files) if f.is_file()]


def find_calibration(
    search_dirs: Sequence[Path],
    preset: str,
    model_sha: Mapping[str, str] | None = None,
    deep: Path | None = None,
) -> dict[str, Any] | None:
    """The best calibration of ``preset``'s method with the model, or None.

    Order: exact preset match first, then other presets of the method sorted by (name length, name), then lowest
    seed / path. Calibrations whose recorded models differ from ``model_sha`` go last (loading one then fails
    with a clear message rather than silently using a calibration of another model).

    Args:
        search_dirs: folders whose own calibration files count (most specific first).
        preset: requested method or preset name.
        model_sha: part -> sha256 of the loaded networks.
        deep: a folder also searched up to 3 levels down (detect / benchmark runs inside it).

    Returns:
        The normalised calibration (:func:`read_calibration`) or None.
    """
    family = method_of_preset(preset)
    candidates = []
    folders = [(folder, folder == deep) for folder in search_dirs]
    if deep is not None and deep not in search_dirs:
        folders.append((deep, True))
    for rank, (folder, recursive) in enumerate(folders):
        if not folder.is_dir():
            continue
        for path in _candidate_files(folder, preset, recursive):
            try:
                calibration = read_calibration(path)
            except ConfigError:
                continue
            name = calibration["method"].get("method")
            if name != family:
                continue
            found = str(calibration.get("preset") or name)
            other_model = any(model_sha and p in model_sha and s != model_sha[p] for p, s in calibration["models"].items())
            key = (other_model, found != preset, len(found), found, rank, str(path))
            candidates.append((key, calibration))
    if not candidates:
        return None
    return min(candidates, key=lambda item: item[0])[1]


def _sha_of(calibration: Mapping[str, Any]) -> str:
    payload = {k: v for k, v in calibration.items() if k != "source"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------------------
class Predictor:
    """A calibrated method on trained networks, plus the preprocessing of the model's training store.

    Args:
        method: a method from :mod:`anomalydiff.methods` (built on the model's networks).
        record: the training store's preprocessing (:class:`~anomalydiff.predict.inputs.PreprocessRecord`).
        preset: the method preset name (recorded in outputs).
        parts: the loaded networks (for sha256 checks and the run record), or None for a method built by hand.
        used_parts: the parts the method runs on (e.g. ``("cfg",)``).
        config: scoring, post-processing and decision settings.
        device: where batches go; None = the device of the method's networks.
        calibration: a calibration (normalised, :func:`read_calibration`) to load now.

    Fitted attributes: ``calibration_`` (the normalised calibration in use), ``policy_`` (threshold policy of a
    method without a native threshold), ``policy_name_``, ``image_threshold_``.
    """

    def __init__(
        self,
        method: Any,
        record: PreprocessRecord,
        *,
        preset: str | None = None,
        parts: Parts | None = None,
        used_parts: Sequence[str] = (),
        config: PredictConfig = PredictConfig(),
        device: torch.device | str | None = None,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        self.method = method
        self.record = record
        self.preset = preset or str(getattr(method, "name", type(method).__name__))
        self.parts = parts
        self.used_parts = tuple(used_parts)
        self.config = config
        self.device = torch.device(device) if device is not None else method_device(method)
        self.calibration_: dict[str, Any] | None = None
        self.policy_: Any = None
        self.policy_name_: str | None = None
        self.image_threshold_: float | None = None
        self.native_: bool | None = None  # has_native_threshold(method), asked lazily (it may need a calibration)
        if calibration is not None:
            self.load_calibration(calibration)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model_dir(
        cls,
        model: str | Path | Mapping[str, str | Path],
        method: str = "anofpdm",
        *,
        device: torch.device | str = "auto",
        calibration: str | Path | Mapping[str, Any] | None = None,
        preprocess: str | Path | None = None,
        calibration_store: str | Path | None = None,
        overrides: Sequence[str] = (),
        config: PredictConfig = PredictConfig(),
        fit: bool = True,
    ) -> Predictor:
        """Load networks, calibration and preprocessing of a model (module docstring: where each comes from).

        Args:
            model: a model folder, a train run folder, a benchmark / detect output folder, an ``ema.safetensors``
                file, or ``{part: path}``.
            method: method or preset name (``anofpdm``, ``anofpdm_ddim``, ``wolleb_p1``, ``ddib``, ...).
            device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` or a torch device.
            calibration: a calibration file (or an already-read dict); None = search the model's folders.
            preprocess: the training store (folder, ``store.json`` or ``preprocess.json``); None = search.
            calibration_store: a slice store whose val split calibrates the method when no calibration is found
                (also a last-resort source of the preprocessing record).
            overrides: ``key=value`` overrides of the method config.
            config: :class:`PredictConfig`.
            fit: fit on ``calibration_store`` right away when no calibration is found (False: leave it to the
                caller, e.g. to fit on one rank only).

        Returns:
            The predictor; ``is_calibrated`` tells whether it can predict yet.

        Raises:
            CheckpointError: missing / mismatched networks, a pickle file, networks that do not fit the
                preprocessing (channels, classifier size), or a calibration of another model.
            ConfigError: unknown preset or override, a calibration of another method, setting or w.
            DataInputError: no preprocessing record can be found.
        """
        from anomalydiff.training.distributed import resolve_device

        torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        family = method_of_preset(Path(method).stem if str(method).endswith((".yaml", ".yml")) else method)
        location = locate_model(model)
        parts = load_parts(location.parts, device=torch_device)
        model_sha = parts.sha256
        if isinstance(calibration, Mapping):
            cal = dict(calibration) if calibration.get("format") == CALIBRATION_FORMAT else _wrap_bare(calibration)
        elif calibration is not None:
            cal = read_calibration(calibration)
        else:
            cal = find_calibration(location.search_dirs, method, model_sha, location.deep)
        if cal is not None and cal["method"].get("method") != family:
            raise ConfigError(
                f"calibration {cal.get('source', '')} is for method {cal['method'].get('method')!r}, not {family!r}; "
                "pass the calibration of this method (or --calibration-store STORE to fit one)"
            )
        record = _find_record(location, parts, cal, preprocess, calibration_store)
        _check_record_fits(record, parts)
        preset = str(cal.get("preset") or method) if cal is not None and method == family else method
        # the calibration's own setting, unless another preset of the method was asked for (e.g. the t_e variant
        # of a DDIM calibration): then that preset's YAML, which must be compatible with the calibration
        if cal is not None and isinstance(cal["method"].get("config"), dict) and method in (family, cal.get("preset")):
            spec = METHODS[family]
            try:
                method_cfg = from_dict(spec.config_cls, apply_overrides(cal["method"]["config"], overrides), where="calibration config")
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"--set {list(overrides)} on the calibration's {family} config: {exc}") from exc
        else:
            method_cfg = method_config(method, overrides)
        built, used = build_method_from_parts(method, parts, config=method_cfg)
        predictor = cls(built, record, preset=preset, parts=parts, used_parts=used, config=config, device=torch_device)
        if cal is not None:
            predictor.load_calibration(cal, overrides=overrides)
        elif calibration_store is not None and fit:
            predictor.fit(calibration_store)
        return predictor

    # ------------------------------------------------------------------ calibration
    @property
    def is_calibrated(self) -> bool:
        """True when the method can score (fitted or calibration loaded) and, without a native threshold, has a policy."""
        return self.calibration_ is not None

    def _native(self) -> bool:
        if self.native_ is None:
            self.native_ = bool(has_native_threshold(self.method))
        return self.native_

    def load_calibration(self, calibration: Mapping[str, Any], overrides: Sequence[str] = ()) -> Predictor:
        """Load a normalised calibration (:func:`read_calibration`), checking it belongs to this model and setting.

        Args:
            calibration: the calibration.
            overrides: the ``--set`` overrides used (a ``guidance_w`` override must equal the fitted w).

        Returns:
            self.

        Raises:
            CheckpointError: the calibration was made for other networks (sha256 differs).
            ConfigError: it was made for another method, setting or guidance strength w, or lacks the threshold a
                method without a native threshold needs.
        """
        cal = dict(calibration)
        family = str(getattr(self.method, "name", ""))
        if cal["method"].get("method") != family:
            raise ConfigError(f"calibration {cal.get('source', '')} is for method {cal['method'].get('method')!r}, not {family!r}")
        if self.parts is not None:
            for part, sha in (cal.get("models") or {}).items():
                mine = self.parts.sha256.get(part)
                if mine is not None and part in self.used_parts and sha != mine:
                    raise CheckpointError(
                        f"calibration {cal.get('source', '')} was made for another model: its {part} network has sha256 "
                        f"{sha[:16]}..., the loaded {part} has {mine[:16]}...; use the calibration written with this model "
                        "or fit one with --calibration-store STORE"
                    )
        fitted_w = cal["method"].get("guidance_w") if family == "anofpdm" else None
        for text in overrides:
            key, value = parse_override(text)
            if key == ["guidance_w"] and fitted_w is not None and float(value) != float(fitted_w):
                raise ConfigError(
                    f"calibration {cal.get('source', '')} was fitted for guidance w={float(fitted_w):g}, but --set "
                    f"guidance_w={value} asks for w={float(value):g}; drop the override or refit with --calibration-store"
                )
        try:
            self.method.load_calibration(cal["method"])
        except ValueError as exc:
            raise ConfigError(f"calibration {cal.get('source', '')}: {exc}") from exc
        self.native_ = None
        self.policy_, self.policy_name_ = None, None
        if not self._native():
            policies = dict(cal.get("threshold_policies") or {})
            name = self.config.threshold_policy or cal.get("primary_policy") or next(
                (p for p in _POLICY_ORDER if p in policies), next(iter(policies), None)
            )
            if name is None or name not in policies:
                raise ConfigError(
                    f"calibration {cal.get('source', '')} has no threshold for {family} (a method without its own "
                    f"threshold){'' if name is None else f'; policy {name!r} not among {sorted(policies)}'}: use the "
                    "calibration.json of a detect / benchmark run, or fit one with --calibration-store STORE"
                )
            self.policy_, self.policy_name_ = _policy_from_description(policies[name]), name
        self.image_threshold_ = None if cal.get("image_threshold") is None else float(cal["image_threshold"])
        self.calibration_ = cal
        return self

    def fit(self, store: str | Path | SliceStore, split: str = "val") -> Predictor:
        """Calibrate on a store's validation split (image labels; pixel labels only for an oracle policy).

        AnoFPDM fits w, tau_cos and D*_max (spec C.6, C.8). A method without a native threshold gets
        ``config.fit_policy`` fitted on its post-processed validation maps. Methods without a gate get an image
        threshold: the ``1 - image_fpr`` quantile of the healthy validation slices' image scores.

        Args:
            store: a slice store prepared like the training store (same channels and resolution).
            split: the split to fit on (never the test split).

        Returns:
            self (``calibration_`` set; :meth:`calibration_record` gives the JSON to save).

        Raises:
            ConfigError: the store was prepared differently from the model's training store.
            ValueError: the split lacks the labels the fit needs.
        """
        store = store if isinstance(store, SliceStore) else SliceStore(store)
        other = read_preprocess(store.path)
        if not other.same_preprocessing(self.record):
            raise ConfigError(
                f"--calibration-store {store.path} was prepared differently ({to_dict(other.prepare)}) from the model's "
                f"training store ({self.record.source}); prepare it with the same settings"
            )
        cfg = self.config
        rows = sample_rows(store, split, cfg.val_slices, cfg.seed)

        def batches() -> Iterator[Batch]:
            for batch in iter_batches(store, rows, cfg.batch_size):
                yield batch.to(self.device)

        self.method.fit(batches())
        self.native_ = None
        gated = False
        policies: dict[str, dict[str, Any]] = {}
        image_threshold = None
        if not self._native() or getattr(self.method, "name", None) != "anofpdm":
            maps, brains, gts, labels, scores, gates = [], [], [], [], [], []
            for batch in iter_batches(store, rows, cfg.batch_size):
                scored = self._score_batch(batch, need_mask=False)
                maps.append(scored["map"][:, None])
                brains.append(batch.brain.numpy())
                gts.append(None if batch.mask is None else batch.mask.numpy())
                labels.append(batch.label.numpy())
                scores.append(scored["image_score"])
                gates.append(scored["gate"])
            label_array = np.concatenate(labels)
            gated = gates[0] is not None
            if not self._native():
                policy = make_policy(cfg.fit_policy, EvaluationConfig(healthy_fpr=cfg.healthy_fpr, min_component=cfg.min_component))
                gt = None if any(g is None for g in gts) else np.concatenate(gts).astype(bool)
                if policy.uses_pixel_labels and gt is None:
                    raise ValueError(f"policy {cfg.fit_policy} needs pixel labels but split {split} of {store.path} has none; use healthy_quantile")
                policy.fit(np.concatenate(maps), np.concatenate(brains).astype(bool), gt, label_array)
                policies[cfg.fit_policy] = policy.to_dict()
            healthy = np.concatenate(scores)[label_array == HEALTHY]
            if not gated and healthy.size:
                image_threshold = float(np.quantile(healthy.astype(np.float64), 1.0 - cfg.image_fpr))
        record = {
            "format": CALIBRATION_FORMAT,
            "version": 1,
            "method": self.method.calibration(),
            "preset": self.preset,
            "threshold_policies": policies,
            "primary_policy": cfg.fit_policy if policies else None,
            "image_threshold": image_threshold,
            "models": {p: self.parts.sha256[p] for p in self.used_parts} if self.parts is not None else {},
            "fit": {"store": str(store.path), "split": split, "slices": int(rows.size), "seed": cfg.seed,
                    "unhealthy": int(sum(store.slices[int(r)].label == UNHEALTHY for r in rows))},
        }
        self.calibration_ = None
        return self.load_calibration(record)

    def calibration_record(self) -> dict[str, Any]:
        """The calibration in use, as predict writes it (``OUT/calibration.json``).

        Raises:
            NotFittedError: no calibration yet.
        """
        if self.calibration_ is None:
            raise NotFittedError(_not_calibrated_message(self.preset))
        out = {k: v for k, v in self.calibration_.items() if k != "source"}
        if self.parts is not None and not out.get("models"):
            out["models"] = {p: self.parts.sha256[p] for p in self.used_parts}
        if self.calibration_.get("source"):
            out["loaded_from"] = self.calibration_["source"]
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What determines the results (recorded in ``predict.json``; a resumed run must match it).

        Returns:
            models' sha256, preset, method config, calibration digest, preprocessing, post-processing.
        """
        calibration = self.calibration_record()
        calibration.pop("loaded_from", None)
        predict = to_dict(self.config)
        predict.pop("batch_size")
        return {
            "models": {p: self.parts.sha256[p] for p in self.used_parts} if self.parts is not None else {},
            "method": str(getattr(self.method, "name", "")),
            "preset": self.preset,
            "method_config": to_dict(self.method.config) if dataclasses.is_dataclass(getattr(self.method, "config", None)) else None,
            "calibration_sha256": _sha_of(calibration),
            "preprocess": {k: v for k, v in self.record.to_json().items() if k != "store"},
            "predict_config": predict,
        }

    # ------------------------------------------------------------------ scoring
    def _score_batch(self, batch: Batch, need_mask: bool = True) -> dict[str, Any]:
        """Score one batch and post-process as the evaluation does (module docstring).

        Returns:
            ``map`` ``[B, H, W]`` float32, ``mask`` ``[B, H, W]`` bool (final: gated where the method gates) or
            None when ``need_mask`` is False, ``gate`` ``[B]`` int or None, ``image_score`` ``[B]``, ``extras``
            {name: ``[B]``} scalar per-slice extras.
        """
        cfg = self.config
        with torch.no_grad():
            output = self.method.score(batch.to(self.device))
        own_median = int(getattr(getattr(self.method, "config", None), "median_size", 0) or 0)
        maps = output.anomaly_map.detach().float().cpu()
        refilter = own_median == 0 and cfg.median_size > 0
        if refilter:
            # 1. the shared median filter where the method has not filtered (spec C.9 / D)
            maps = median_filter(maps, size=cfg.median_size)
        gate = None if output.pred_label is None else output.pred_label.detach().cpu().numpy().astype(np.int64)
        mask = None
        if need_mask:
            if self._native():
                raw = output.extras.get("mask_ungated", output.pred_mask) if output.pred_label is not None else output.pred_mask
                if raw is None:
                    raise ValueError(f"{self.preset} has a native threshold but returned no mask")
                if refilter:
                    # 1b. a per-image Otsu mask follows its (now filtered) map
                    raw = torch.as_tensor(OtsuThreshold().predict(maps)).bool()
                    if getattr(self.method.config, "keep_largest_component", False):
                        from anomalydiff.methods.cgcdm import keep_largest_component

                        raw = keep_largest_component(raw)
            else:
                if self.policy_ is None:
                    raise NotFittedError(_not_calibrated_message(self.preset))
                raw = torch.as_tensor(np.asarray(self.policy_.predict(maps))).bool()
            # 2. connected-component filter (spec C.9), then the method's gate (mixed setup)
            mask_t = remove_small_components(raw.detach().cpu().bool(), max_size=cfg.min_component)
            mask = mask_t[:, 0].numpy().astype(bool)
            if gate is not None:
                mask &= (gate == UNHEALTHY)[:, None, None]
        extras = {
            key: value.detach().float().cpu().numpy()
            for key, value in output.extras.items()
            if isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape[0] == len(batch) and key != "timesteps"
        }
        return {
            "map": maps[:, 0].numpy().astype(np.float32),
            "mask": mask,
            "gate": gate,
            "image_score": output.image_score.detach().float().cpu().numpy(),
            "extras": extras,
        }

    def predict_loaded(self, loaded: LoadedSubject) -> Prediction:
        """Preprocess, score and map back one loaded subject.

        Args:
            loaded: from :func:`~anomalydiff.predict.inputs.load_subject` or ``loaded_from_array``.

        Returns:
            :class:`Prediction`.

        Raises:
            NotFittedError: no calibration (see :meth:`fit`).
        """
        if self.calibration_ is None:
            raise NotFittedError(_not_calibrated_message(self.preset))
        slices, info = prepare_loaded(loaded, self.record)
        images = torch.from_numpy(np.ascontiguousarray(slices.images, dtype=np.float32))
        brain = torch.from_numpy(np.ascontiguousarray(slices.brain, dtype=bool))[:, None]
        indices = [int(i) for i in slices.slice_indices]
        parts: dict[str, list[Any]] = {"map": [], "mask": [], "gate": [], "image_score": []}
        extras: dict[str, list[np.ndarray]] = {}
        step = self.config.batch_size
        for start in range(0, len(indices), step):
            stop = min(start + step, len(indices))
            batch = Batch(
                image=images[start:stop],
                label=torch.full((stop - start,), -1, dtype=torch.long),
                mask=None,
                brain=brain[start:stop],
                subject_id=[loaded.subject_id] * (stop - start),
                slice_index=torch.tensor(indices[start:stop], dtype=torch.long),
            )
            scored = self._score_batch(batch)
            for key, collected in parts.items():
                collected.append(scored[key])
            for key, value in scored["extras"].items():
                extras.setdefault(key, []).append(value)
        maps = np.concatenate(parts["map"])
        masks = np.concatenate(parts["mask"])
        gate = None if parts["gate"][0] is None else np.concatenate(parts["gate"])
        scores = np.concatenate(parts["image_score"]).astype(np.float64)
        extra = {k: np.concatenate(v) for k, v in extras.items() if sum(len(a) for a in v) == len(indices)}
        # back to the input's own grid (geometry.slices_to_volume / slice_to_image)
        if loaded.kind == "image":
            anomaly_map = slice_to_image(maps[0], info, 0)
            mask = slice_to_image(masks[0], info, 0)
            voxel_volume = None
            per_slice_voxels = [int(mask.sum())]
            file_axis, file_indices = None, [None]
        else:
            anomaly_map = slices_to_volume(maps, info, indices)
            mask = slices_to_volume(masks, info, indices)
            voxel_volume = float(abs(np.linalg.det(np.asarray(info["affine"])[:3, :3])))
            canonical = to_canonical(mask, info["orientation"])
            per_slice_voxels = [int(canonical[:, :, k].sum()) for k in indices]
            file_axis, file_indices = _file_slice_positions(info, indices)
        decisions, summary = self._decide(loaded, scores, gate, masks, mask, voxel_volume)
        rows = []
        for k, index in enumerate(indices):
            row: dict[str, Any] = {
                "subject_id": loaded.subject_id,
                "slice_index": index,
                "file_axis": "" if file_axis is None else file_axis,
                "file_index": "" if file_indices[k] is None else file_indices[k],
                "image_score": float(scores[k]),
                "decision": int(decisions[k]),
                "lesion_pixels": int(masks[k].sum()),
                "lesion_voxels": per_slice_voxels[k],
                "lesion_volume_mm3": "" if voxel_volume is None else per_slice_voxels[k] * voxel_volume,
            }
            for key in sorted(extra):
                row[key] = float(extra[key][k])
            rows.append(row)
        summary.update({"slice_range": info.get("slice_range"), "shape": list(anomaly_map.shape)})
        return Prediction(
            subject_id=loaded.subject_id,
            kind=loaded.kind,
            anomaly_map=np.asarray(anomaly_map, dtype=np.float32),
            mask=np.asarray(mask, dtype=bool),
            slice_maps=maps,
            slice_masks=masks,
            slice_images=slices.images[:, 0].astype(np.float32),
            slice_indices=indices,
            slices=rows,
            summary=summary,
            subject_info=info,
            loaded=loaded,
        )

    def _decide(
        self,
        loaded: LoadedSubject,
        scores: np.ndarray,
        gate: np.ndarray | None,
        slice_masks: np.ndarray,
        mask: np.ndarray,
        voxel_volume: float | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-slice decisions and the subject summary (module docstring "Decisions")."""
        num = len(scores)
        if gate is not None:
            decisions = gate == UNHEALTHY
            share = float(decisions.mean()) if num else 0.0
            score, decision = share, share >= self.config.subject_share
            rule = f"share of slices flagged by the method's gate >= {self.config.subject_share:g}"
        elif self.image_threshold_ is not None:
            decisions = scores >= self.image_threshold_
            score = float(scores.max()) if num else 0.0
            decision = score >= self.image_threshold_
            rule = f"max image score >= calibrated image threshold {self.image_threshold_:.6g}"
        else:
            decisions = slice_masks.reshape(num, -1).any(axis=1)
            score = float(scores.max()) if num else 0.0
            decision = bool(mask.any())
            rule = "any predicted lesion voxel (the calibration has no image threshold)"
        voxels = int(mask.sum())
        summary = {
            "subject_id": loaded.subject_id,
            "kind": loaded.kind,
            "input": loaded.source,
            "method": str(getattr(self.method, "name", "")),
            "preset": self.preset,
            "num_slices": num,
            "flagged_slices": int(decisions.sum()),
            "flagged_share": float(decisions.mean()) if num else 0.0,
            "max_image_score": float(scores.max()) if num else 0.0,
            "subject_score": float(score),
            "decision": int(bool(decision)),
            "decision_label": "unhealthy" if decision else "healthy",
            "decision_rule": rule,
            "lesion_voxels": voxels,
            "voxel_volume_mm3": voxel_volume if voxel_volume is not None else "",
            "lesion_volume_mm3": voxels * voxel_volume if voxel_volume is not None else "",
            "threshold_policy": self.policy_name_ or ("native" if self._native() else ""),
            "warnings": " | ".join(loaded.warnings),
        }
        return decisions.astype(bool), summary

    def predict_array(
        self,
        volume_or_image: np.ndarray | Mapping[str, np.ndarray],
        affine: np.ndarray | None = None,
        subject_id: str = "array",
    ) -> Prediction:
        """Predict on voxels in memory; maps and masks come back on the array's own grid.

        Args:
            volume_or_image: 3-D models: ``[X, Y, Z]`` (1 channel), ``[X, Y, Z, C]`` in the model's channel order
                (``predictor.record.channels``) or ``{modality: [X, Y, Z]}``; 2-D models: ``[h, w]``, ``[h, w, C]``
                or ``[C, h, w]`` raw intensities.
            affine: ``[4, 4]`` voxel-to-world affine of a volume (default identity: voxel axes are R, A, S).
            subject_id: name (also seeds AnoFPDM's per-image noise).

        Returns:
            :class:`Prediction` (``anomaly_map`` / ``mask`` with the input's spatial shape).
        """
        return self.predict_loaded(loaded_from_array(volume_or_image, self.record, affine, subject_id))

    def predict_path(
        self,
        inputs: str | Path | Sequence[str | Path],
        out: str | Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
        fmt: str | None = None,
        subject_id: str | None = None,
        skip_bad: bool = False,
        overlay: bool = True,
    ) -> list[dict[str, Any]]:
        """Predict on scans on disk and write every output (see :mod:`anomalydiff.predict.writer`).

        Args:
            inputs: a path (subject folder, dataset folder, file) or several; ``name=path`` items name modalities.
            out: output folder.
            overwrite: redo subjects and replace the outputs of another run in ``out``.
            resume: continue a finished run in ``out`` too (new inputs only); an unfinished run of the same
                settings is always continued.
            progress: progress bar.
            fmt: force an input layout.
            subject_id: output name of a single subject given as files.
            skip_bad: a subject that fails to load is reported (``error`` column) instead of stopping the run.
            overlay: write the PNG overlay panels.

        Returns:
            The ``predictions.csv`` rows.
        """
        from anomalydiff.predict.distributed import run_prediction

        items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        return run_prediction(self, items, out, overwrite=overwrite, resume=resume, progress=progress, fmt=fmt,
                              subject_id=subject_id, skip_bad=skip_bad, overlay=overlay)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _not_calibrated_message(preset: str) -> str:
    return (
        f"{preset} is not calibrated: no calibration was found with the model. Pass --calibration FILE (the "
        "calibration.json written by `anomalydiff detect` / `benchmark` / an earlier predict), or let predict fit "
        "one on a store's validation split with --calibration-store STORE (prepared like the training store)"
    )


def _wrap_bare(calibration: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": CALIBRATION_FORMAT, "version": 1, "method": dict(calibration), "preset": calibration.get("method"),
            "threshold_policies": {}, "primary_policy": None, "image_threshold": None, "models": {}, "source": "given dict"}


def _policy_from_description(description: Mapping[str, Any]) -> Any:
    """A predict-time policy from a fitted policy's ``to_dict()`` (a fixed threshold, or per-image Otsu)."""
    threshold = description.get("threshold")
    if threshold is None:
        if str(description.get("policy", "")).startswith("otsu"):
            return OtsuThreshold()
        raise ConfigError(f"threshold policy {dict(description)} has no threshold value; refit it")
    return FixedThreshold(float(threshold), uses_pixel_labels=bool(description.get("uses_pixel_labels", False)))


def _file_slice_positions(info: Mapping[str, Any], indices: Sequence[int]) -> tuple[int, list[int]]:
    """Which file voxel axis the canonical axial axis is, and each canonical slice's index along it."""
    orientation = np.asarray(info["orientation"], dtype=np.float64)
    axis = int(np.flatnonzero(orientation[:, 0] == SLICE_AXIS)[0])
    size = int(info["original_shape"][axis])
    flipped = orientation[axis, 1] < 0
    return axis, [size - 1 - int(k) if flipped else int(k) for k in indices]


def _find_record(
    location: ModelLocation,
    parts: Parts,
    calibration: Mapping[str, Any] | None,
    preprocess: str | Path | None,
    calibration_store: str | Path | None,
) -> PreprocessRecord:
    """The preprocessing record (see :mod:`anomalydiff.predict.inputs` for the order)."""
    if preprocess is not None:
        return read_preprocess(preprocess)
    candidates: list[Path] = []
    for folder in location.search_dirs:
        candidates.append(folder / PREPROCESS_FILE)
    for part in parts.parts.values():
        candidates.extend([part.run_dir / PREPROCESS_FILE, part.run_dir.parent / PREPROCESS_FILE])
    if calibration is not None and calibration.get("source"):
        metrics = Path(calibration["source"]).parent / "metrics.json"
        if metrics.is_file():
            store = _read_json(metrics).get("info", {}).get("store")
            if store:
                candidates.append(Path(store))
        fit_store = (calibration.get("fit") or {}).get("store") if isinstance(calibration.get("fit"), dict) else None
        if fit_store:
            candidates.append(Path(fit_store))
    record = find_preprocess(candidates)
    if record is None and location.deep is not None:
        # a store inside the model's own folder (benchmark: data/store); several different ones are ambiguous
        stores = [p.parent for depth in range(1, 4) for p in sorted(location.deep.glob("/".join(["*"] * depth + ["store.json"])))]
        records = [read_preprocess(store) for store in stores]
        if any(not r.same_preprocessing(records[0]) for r in records[1:]):
            raise DataInputError(
                str(location.deep), f"holds several slice stores prepared differently ({', '.join(map(str, stores))}); "
                "pass --preprocess with the one the model was trained on"
            )
        record = records[0] if records else None
    if record is None and calibration_store is not None:
        record = read_preprocess(calibration_store)
    if record is None:
        raise DataInputError(
            str(location.search_dirs[0]),
            "no preprocessing record found with the model: predict must prepare scans exactly like the model's "
            "training store (channels, resolution, normalisation). Pass --preprocess STORE (that slice store or its "
            "store.json), or save it beside the model once: python -c \"from anomalydiff.predict import "
            f"write_preprocess; write_preprocess('STORE', '{location.search_dirs[0]}')\"",
        )
    return record


def _check_record_fits(record: PreprocessRecord, parts: Parts) -> None:
    """The networks take the record's channels (and, for the classifier, its image size)."""
    channels = len(record.channels)
    for name, part in parts.parts.items():
        cfg = part.module.config
        if getattr(cfg, "in_channels", channels) != channels:
            raise CheckpointError(
                f"{part.weights} takes {cfg.in_channels} channel(s) but the preprocessing record {record.source} "
                f"prepares {channels} ({list(record.channels)}); pass the store the model was trained on (--preprocess)"
            )
        if name == "classifier" and getattr(cfg, "image_size", record.resolution) != record.resolution:
            raise CheckpointError(
                f"{part.weights} was built for {cfg.image_size} px images but the preprocessing record {record.source} "
                f"prepares {record.resolution} px slices; pass the store the model was trained on (--preprocess)"
            )


def fit_predictor_if_needed(predictor: Predictor, calibration_store: str | Path | None) -> Predictor:
    """Fit on ``calibration_store`` when the predictor has no calibration, else refuse with what to do.

    Args:
        predictor: the predictor.
        calibration_store: the store to fit on, or None.

    Returns:
        The (now calibrated) predictor.
    """
    if predictor.is_calibrated:
        return predictor
    if calibration_store is None:
        raise NotFittedError(_not_calibrated_message(predictor.preset))
    return predictor.fit(calibration_store)
