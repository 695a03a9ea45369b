"""The phantom benchmark: AnoFPDM's Table 1 (methods x {mixed, unhealthy} x {Dice, IoU, AUPRC}, mean +- std over
seeds) with cost columns, the AnoFPDM quality-versus-speed curve over ``step_stride`` and the paper's
ablations (spec C.6-C.10, F.1, F.2), on the built-in brain phantom.

``run_benchmark(config, out)`` does, each stage resumable (a rerun skips what exists):

1. **Data**: the phantom (``anomalydiff.data.phantom.write_phantom_dataset``) in the BraTS 2021 (or ATLAS)
   layout, then ``anomalydiff.data.prepare.prepare_dataset`` into a slice store.
2. **Models**: the committed weights of the model folder named in the config (e.g. ``models/phantom/``), or,
   with ``train=True``, the training library functions (``train_diffusion`` / ``train_classifier``) into
   ``OUT/models/<part>``. The sha256 of every weight file goes into ``results.json``.
3. **Methods**: each preset row of the config, once per seed (the method's ``seed`` field; a method without
   one, e.g. DDIB, is deterministic and runs once), through :func:`anomalydiff.evaluation.runner.run_method`:
   fit on validation, score the test sample, post-process, evaluate. AnoFPDM presets that differ only in
   settings ``fit`` does not use (the ``t_e`` variants) share one fitted calibration per seed.
4. **Step-stride curve** (AnoFPDM): quality and cost per ``step_stride``, each stride fitted on validation.
5. **Ablations** (AnoFPDM, on a label-balanced test subset; nothing here is used to choose anything):
   Dice vs guidance strength w with the validation selection rule marked (C.6, Fig. 5a/b); Dice vs end-step
   ratio ``round(r t_e)`` computed from the per-step outputs (``keep_steps``; the config has no ratio knob,
   C.7, Fig. 5c); dynamic (Algorithm 1) vs fixed thresholds on the same maps (C.8, Fig. 5d).
6. ``results.json`` (command, machine, config, seeds, timings, weights' sha256, every row), ``results.csv``,
   ``results.md`` (Table-1 layout with the pixel-label tick/cross column and cost columns) and the figures.

Rows of the table: one per method preset, with its primary evaluation (native threshold, or the oracle
best-Dice threshold fitted on validation with pixel labels, as AnoFPDM's Table 1 tuned its baselines), plus
one row per label-free alternative threshold policy of the baselines (evaluated on the same maps).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import yaml

from anomalydiff.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from anomalydiff.data.store import SliceStore
from anomalydiff.labels import UNHEALTHY
from anomalydiff.machine import machine_facts
from anomalydiff.methods import CONFIG_DIR, method_config, method_of_preset
from anomalydiff.metrics import MetricReport, aggregate_runs, dice_from_counts, evaluate_setups, overlap_counts
from anomalydiff.models.io import CheckpointError
from anomalydiff.postprocess import remove_small_components
from anomalydiff.evaluation.models import PART_NAMES, Parts, build_method_from_parts, load_parts, parts_needed
from anomalydiff.evaluation.runner import (
    EvaluationConfig,
    MethodResult,
    _json_safe,
    iter_batches,
    load_result,
    run_method,
    sample_rows,
    score_slices,
)

__all__ = [
    "AblationConfig",
    "BenchmarkConfig",
    "DataConfig",
    "MethodRow",
    "ModelsConfig",
    "StrideCurveConfig",
    "TrainPart",
    "load_benchmark_config",
    "run_benchmark",
]

#: Repository root (benchmarks/, configs/, models/ live here; the package is installed editable).
REPO_ROOT = CONFIG_DIR.parent
#: AnoFPDM config fields that ``fit`` does not read: presets differing only in these share a calibration.
_ANOFPDM_FIT_FREE = ("single_sam", "keep_steps", "median_size", "min_component", "quantile_range", "quantile_levels")
#: Method family -> the "type" column of Table 1 (spec F.1).
_TYPES = {"anoddpm": "Recon.", "wolleb": "Recon.", "ddib": "Recon.", "cgcdm": "Gradient", "anofpdm": "Gradient"}


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """The phantom dataset and its slice store."""

    #: Phantom layout: "brats" (4 contrasts, BraTS 2021 tree) or "atlas" (T1w, ATLAS v2.0 tree) (data.md).
    layout: Literal["brats", "atlas"] = "brats"
    #: Number of phantom subjects (each ~140 axial slices at 64 px with brain).
    subjects: int = 30
    #: Dataset seed (subject k depends only on (seed, k)).
    seed: int = 0
    #: PhantomConfig fields (anomalydiff.data.phantom), e.g. {voxel_size: 3.0} for fast tests only.
    phantom: dict[str, Any] = field(default_factory=dict)
    #: PrepareConfig fields (anomalydiff.data.prepare), e.g. {resolution: 64, split_counts: [20, 4, 6]}.
    prepare: dict[str, Any] = field(default_factory=dict)
    #: Use this prepared store instead of generating one (must be the store the models were trained on).
    store: str | None = None


@dataclass(frozen=True)
class TrainPart:
    """How ``--train`` trains one part of the model folder."""

    #: Training YAML (relative paths: to the current folder, else the repository root).
    config: str
    #: ``key=value`` overrides of that YAML (e.g. steps=200).
    set: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelsConfig:
    """The model folder (committed weights) and how ``--train`` makes one."""

    #: Model folder with cfg/, classifier/, healthy_gaussian/, healthy_simplex/ (relative: cwd, else repo root).
    dir: str = "models/phantom"
    cfg: TrainPart = TrainPart("configs/train/phantom_cfg_cpu.yaml")
    classifier: TrainPart = TrainPart("configs/train/phantom_classifier_cpu.yaml")
    healthy_gaussian: TrainPart = TrainPart("configs/train/phantom_healthy_cpu.yaml")
    healthy_simplex: TrainPart = TrainPart("configs/train/phantom_simplex_cpu.yaml")


@dataclass(frozen=True)
class MethodRow:
    """One row of the table: a method preset plus overrides."""

    #: Preset name in configs/methods (or a preset YAML path).
    preset: str
    #: Row label (default: the preset name).
    label: str | None = None
    #: "Recon." or "Gradient" (Table 1 type column); default from the method family.
    type: str | None = None
    #: ``key=value`` overrides of the preset (e.g. the quick setting's smaller noise levels).
    set: tuple[str, ...] = ()


@dataclass(frozen=True)
class StrideCurveConfig:
    """AnoFPDM's quality-versus-speed curve over ``step_stride``."""

    #: AnoFPDM preset; its row's overrides in ``methods`` are applied first, then ``set``, then the stride.
    preset: str = "anofpdm_ddim"
    #: Strides evaluated (the issue: 1, 2, 5, 10, 20).
    strides: tuple[int, ...] = (1, 2, 5, 10, 20)
    #: Extra overrides.
    set: tuple[str, ...] = ()
    #: Validation / test slices for the curve (None = the evaluation's).
    val_slices: int | None = None
    test_slices: int | None = None


@dataclass(frozen=True)
class AblationConfig:
    """The AnoFPDM ablations (spec F.2: Figs. 5a-d)."""

    #: AnoFPDM preset; its row's overrides in ``methods`` are applied first, then ``set``.
    preset: str = "anofpdm_ddim"
    #: Extra overrides.
    set: tuple[str, ...] = ()
    #: Size of the label-balanced test subset for the w and end-step ablations.
    slices: int = 64
    #: Dice vs guidance strength over the preset's ``w_grid`` (needs select_w, C.6).
    guidance: bool = True
    #: End-step ratios r (AAM over [0, round(r t_e)), spec C.7 t_e_ratio); [] = skip.
    end_step_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    #: Number of fixed thresholds compared with Algorithm 1 on the main run's maps; 0 = skip.
    fixed_thresholds: int = 40


@dataclass(frozen=True)
class BenchmarkConfig:
    """A benchmark: data, models, evaluation protocol, method rows, curve and ablations."""

    #: Name (default output folder runs/<name>).
    name: str = "benchmark"
    #: One line on what this configuration is for.
    description: str = ""
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    #: Protocol of every run (samples, policies, post-processing; anomalydiff.evaluation.runner).
    evaluation: EvaluationConfig = EvaluationConfig()
    #: Method seeds; Table 1 reports mean +- std over 3 runs (spec C.10).
    seeds: tuple[int, ...] = (0, 1, 2)
    #: auto (cuda if available), cpu, cuda, cuda:N.
    device: str = "auto"
    #: Table rows.
    methods: tuple[MethodRow, ...] = ()
    #: None = skip the step-stride curve.
    stride_curve: StrideCurveConfig | None = StrideCurveConfig()
    #: None = skip the ablations.
    ablations: AblationConfig | None = AblationConfig()

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("benchmark config: `methods` lists no preset; add rows like {preset: anofpdm_ddim}")
        if not self.seeds:
            raise ConfigError("benchmark config: `seeds` is empty")


def load_benchmark_config(path: str | Path, overrides: Sequence[str] = ()) -> BenchmarkConfig:
    """Read a benchmark YAML (strict: unknown keys are errors) with ``key=value`` overrides.

    Args:
        path: the YAML (e.g. ``benchmarks/phantom_quick.yaml``).
        overrides: e.g. ``["evaluation.max_slices=16"]``.

    Returns:
        The config; every method row's preset and overrides are checked by building its method config.
    """
    data = apply_overrides(read_yaml(path), overrides)
    config = from_dict(BenchmarkConfig, data, where=str(path))
    for row in config.methods:
        method_config(row.preset, row.set)  # unknown presets / keys fail here, before any work
    for section in (config.stride_curve, config.ablations):
        if section is not None and method_of_preset(section.preset) != "anofpdm":
            raise ConfigError(f"{path}: the step-stride curve and the ablations are AnoFPDM's; {section.preset!r} is not "
                              "an AnoFPDM preset (e.g. anofpdm_ddim)")
    return config


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def _resolve(path: str | Path) -> Path:
    """A relative path: from the current folder if it exists there, else from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "row"


def _row_label(row: MethodRow) -> str:
    return row.label or row.preset


def _row_overrides(config: BenchmarkConfig, preset: str, extra: Sequence[str]) -> list[str]:
    """Overrides of the first table row with this preset, then ``extra``."""
    for row in config.methods:
        if row.preset == preset:
            return [*row.set, *extra]
    return list(extra)


def _has_seed(preset: str, overrides: Sequence[str]) -> bool:
    return any(f.name == "seed" for f in dataclasses.fields(method_config(preset, overrides)))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, default=str))
    tmp.replace(path)


def _calibration_key(result_or_config: Any, model_sha: str, evaluation: EvaluationConfig) -> str:
    """Key under which AnoFPDM calibrations are shared: fit-relevant config + weights + validation sample."""
    cfg = dict(result_or_config)
    for key in _ANOFPDM_FIT_FREE:
        cfg.pop(key, None)
    sample = (evaluation.val_split, evaluation.val_slices, evaluation.seed, evaluation.balanced_val)
    return json.dumps([cfg, model_sha, sample], sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------
def prepare_data(config: DataConfig, out: Path, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Stage 1: the phantom and its slice store (skipped when a complete one exists with the same settings).

    Args:
        config: data settings.
        out: the benchmark folder (data goes into ``out/data``).
        progress: progress bars.

    Returns:
        ``(store path, facts: timings, counts, settings)``.
    """
    from anomalydiff.data.phantom import PhantomConfig, write_phantom_dataset
    from anomalydiff.data.prepare import PrepareConfig, prepare_dataset

    facts: dict[str, Any] = {"phantom_seconds": 0.0, "prepare_seconds": 0.0}
    if config.store is not None:
        store_path = _resolve(config.store)
        SliceStore(store_path)  # a clear error if it is not a store
        facts["store_source"] = "given"
    else:
        root = out / "data" / f"phantom_{config.layout}"
        store_path = out / "data" / "store"
        phantom_config = from_dict(PhantomConfig, dict(config.phantom), where="data.phantom")
        settings = {"layout": config.layout, "subjects": config.subjects, "seed": config.seed,
                    "phantom": to_dict(phantom_config)}
        marker = root / "benchmark_phantom.json"
        if not (marker.exists() and json.loads(marker.read_text()) == settings):
            started = time.perf_counter()
            _log(f"writing {config.subjects} phantom subjects ({config.layout}) to {root}")
            write_phantom_dataset(phantom_config, root, config.layout, config.subjects, config.seed,
                                  overwrite=True, progress=progress)
            marker.write_text(json.dumps(settings))
            facts["phantom_seconds"] = time.perf_counter() - started
            if store_path.exists():
                import shutil

                shutil.rmtree(store_path)
        prepare_data_ = {"format": "brats2021" if config.layout == "brats" else "atlas", **config.prepare}
        prepare_config = from_dict(PrepareConfig, prepare_data_, where="data.prepare")
        if (store_path / "store.json").exists():
            stored = json.loads((store_path / "store.json").read_text()).get("prepare_config")
            if stored != to_dict(prepare_config):
                import shutil

                shutil.rmtree(store_path)
        if not (store_path / "store.json").exists():
            started = time.perf_counter()
            _log(f"preparing the slice store {store_path}")
            prepare_dataset(prepare_config, root, store_path, overwrite=True, progress=progress)
            facts["prepare_seconds"] = time.perf_counter() - started
        facts["store_source"] = "generated"
        facts["phantom_root"] = str(root)
    store = SliceStore(store_path)
    facts.update({
        "store": str(store_path),
        "shape": list(store.shape),
        "modalities": store.modalities,
        "splits": {
            split: {"subjects": len(store.split_subjects(split)), "slices": int(store.rows(split).size),
                    "unhealthy": int(store.rows(split, UNHEALTHY).size)}
            for split in ("train", "val", "test")
        },
    })
    return store_path, facts


def train_parts(config: ModelsConfig, parts: Sequence[str], store: Path, model_dir: Path, device: str) -> dict[str, float]:
    """Stage 2 with ``--train``: train each missing part into ``model_dir/<part>`` (resuming a killed run).

    Args:
        config: which training YAML each part uses.
        parts: the parts to make.
        store: the slice store.
        model_dir: the model folder to fill.
        device: training device.

    Returns:
        part -> training seconds (0 for parts that were already complete).
    """
    from anomalydiff.training import (
        ClassifierTrainConfig,
        DiffusionTrainConfig,
        load_train_config,
        train_classifier,
        train_diffusion,
    )

    seconds: dict[str, float] = {}
    for part in parts:
        run = model_dir / part
        if (run / "ema.safetensors").exists() and (run / "state" / "trainer.json").exists():
            state = json.loads((run / "state" / "trainer.json").read_text())
            target = read_yaml(run / "config.yaml").get("steps")
            if target is None or int(state.get("step", 0)) >= int(target):
                seconds[part] = 0.0
                continue
        spec: TrainPart = getattr(config, part)
        yaml_path = _resolve(spec.config)
        resume = (run / "config.yaml").exists()
        started = time.perf_counter()
        _log(f"training {part} into {run} ({yaml_path}{', resuming' if resume else ''})")
        if part == "classifier":
            cfg = load_train_config(ClassifierTrainConfig, yaml_path, spec.set)
            train_classifier(cfg, store, run, resume=resume, device=device)
        else:
            cfg = load_train_config(DiffusionTrainConfig, yaml_path, spec.set)
            train_diffusion(cfg, store, run, resume=resume, device=device)
        seconds[part] = time.perf_counter() - started
    return seconds


def _check_store_fits(parts: Parts, store: SliceStore) -> None:
    """The networks were built for the store's channels and size."""
    _, channels, height, _ = store.shape
    for name, part in parts.parts.items():
        cfg = part.module.config
        if getattr(cfg, "in_channels", channels) != channels:
            raise CheckpointError(
                f"{part.weights} takes {cfg.in_channels} channels but the store {store.path} has {channels}; use the "
                "store the models were trained on (data section / --store) or retrain with --train"
            )
        if name == "classifier" and getattr(cfg, "image_size", height) != height:
            raise CheckpointError(
                f"{part.weights} was built for {cfg.image_size} px images but the store {store.path} has {height} px; "
                "use the matching store or retrain with --train"
            )


def _dice_setups(pred: np.ndarray, gt: np.ndarray, labels: np.ndarray, gate: np.ndarray | None) -> dict[str, float]:
    """Mean per-slice Dice (empty vs empty = 1) in the mixed (gated) and unhealthy (un-gated) setups."""
    gated = pred if gate is None else pred & (gate == UNHEALTHY)[:, None, None, None]
    mixed = dice_from_counts(*overlap_counts(gated, gt))
    unhealthy = labels == UNHEALTHY
    unh = dice_from_counts(*overlap_counts(pred[unhealthy], gt[unhealthy])) if unhealthy.any() else np.array([np.nan])
    return {"mixed_dice": float(mixed.mean()), "unhealthy_dice": float(np.mean(unh))}


def ablation_guidance(
    method_factory: Callable[[], Any],
    calibration: dict[str, Any],
    store: SliceStore,
    rows: np.ndarray,
    evaluation: EvaluationConfig,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """Dice vs guidance strength w on a test subset, with the validation selection rule (spec C.6, Fig. 5a/b).

    Each w of the fitted grid is scored with its own validation-fitted tau_cos and D*_max (``by_w`` of the
    calibration); the selected w is the one ``fit`` chose from validation accuracy alone.

    Args:
        method_factory: builds a fresh AnoFPDM of the preset.
        calibration: the fitted calibration (with ``by_w``).
        store: the store.
        rows: the test subset.
        evaluation: post-processing settings.
        device: device of the batches.
        progress: progress bars.

    Returns:
        ``{"points": [{w, val_accuracy, tau_cos, mixed_dice, unhealthy_dice, mixed_auprc, unhealthy_auprc,
        test_accuracy}], "chosen_w", "accuracy_ratio", "peak_accuracy", "rule"}``.
    """
    points = []
    by_w = calibration.get("by_w", [])
    for entry in by_w:
        method = method_factory()
        cal = dict(calibration, guidance_w=entry["guidance_w"], tau_cos=entry["tau_cos"], d_max_star=entry["d_max_star"])
        method.load_calibration(cal)
        scored = score_slices(method, store, rows, evaluation, device, progress, desc=f"w={entry['guidance_w']:g}")
        reports = evaluate_setups(
            scored.anomaly_map, scored.native_mask, scored.gt_mask, scored.labels, uses_pixel_labels=False,
            foreground=scored.foreground, pred_labels=scored.pred_label, compute_auroc=False,
        )
        points.append({
            "guidance_w": float(entry["guidance_w"]),
            "val_accuracy": float(entry["accuracy"]),
            "tau_cos": float(entry["tau_cos"]),
            "mixed_dice": reports["mixed"]["dice"],
            "unhealthy_dice": reports["unhealthy"]["dice"],
            "mixed_auprc": reports["mixed"]["auprc"],
            "unhealthy_auprc": reports["unhealthy"]["auprc"],
            "test_accuracy": reports["mixed"]["image_accuracy"],
        })
    config = calibration.get("config", {})
    peak = max((p["val_accuracy"] for p in points), default=float("nan"))
    return {
        "points": points,
        "chosen_w": float(calibration["guidance_w"]),
        "accuracy_ratio": float(config.get("accuracy_ratio", 0.99)),
        "peak_accuracy": peak,
        "rule": f"largest w with validation accuracy >= {config.get('accuracy_ratio', 0.99)} x peak "
        f"({config.get('w_selection', 'global')})",
        "slices": int(len(rows)),
    }


def ablation_end_step(
    method: Any,
    store: SliceStore,
    rows: np.ndarray,
    ratios: Sequence[float],
    evaluation: EvaluationConfig,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """Dice vs end-step ratio r: AAM over evaluated steps [0, round(r k*)) (spec C.7 ``t_e_ratio``, Fig. 5c).

    AnoFPDM's config has no ratio knob, so the per-step HGPs are kept (``keep_steps``) and the AAM is rebuilt
    per ratio: ``SAM_t = (HGP_t - x0)^2`` (Eq. 19), ``AAM_r = mean_{t < n} SAM_t`` with
    ``n = clip(round(r k*), 1, T'')`` (k* = index of t_e; n = 1 is the method's own fallback for k* = 0);
    Algorithm 1 and the post-processing are unchanged (``dynamic_threshold``). At r = 1 this reproduces the
    method's own mask (checked and recorded as ``matches_method_at_ratio_1``).

    Args:
        method: a calibrated AnoFPDM.
        store: the store.
        rows: the test subset.
        ratios: end-step ratios.
        evaluation: batching.
        device: device of the batches.
        progress: progress bars.

    Returns:
        ``{"points": [{ratio, mixed_dice, unhealthy_dice, mixed_auprc, unhealthy_auprc}], "matches_method_at_ratio_1"}``.
    """
    from anomalydiff.methods.anofpdm import dynamic_threshold

    kept = method.with_config(keep_steps=True)
    cfg = kept.config
    maps: dict[float, list[np.ndarray]] = {r: [] for r in ratios}
    masks: dict[float, list[np.ndarray]] = {r: [] for r in ratios}
    gts, labels, gates, fgs = [], [], [], []
    matches = True
    from anomalydiff.metrics import foreground_from_image
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc="end-step ratios", unit="slice", disable=not progress, leave=False)
    for batch in iter_batches(store, rows, evaluation.batch_size):
        batch = batch.to(device)
        output = kept.score(batch)
        extras = output.extras
        mods = list(cfg.modalities) if cfg.modalities is not None else list(range(batch.image.shape[1]))
        x0_m = batch.image[:, mods]
        sam = (extras["hgp_steps"] - x0_m[:, None]) ** 2  # [B, T'', M, H, W] (Eq. 19)
        cumulative = sam.cumsum(dim=1)
        num_steps = sam.shape[1]
        k_star = torch.searchsorted(extras["timesteps"], extras["end_step"].contiguous())  # [B, M]
        d_star = torch.tensor(kept.d_max_star_, dtype=torch.float64, device=x0_m.device)
        for r in ratios:
            n = torch.clamp(torch.round(r * k_star.double()).long(), 1, num_steps)  # [B, M]
            index = (n - 1)[:, None, :, None, None].expand(-1, 1, -1, *sam.shape[3:])
            aam = cumulative.gather(1, index)[:, 0] / n[:, :, None, None].to(sam.dtype)
            result = dynamic_threshold(aam, extras["d_max"], d_star, cfg.quantile_range, cfg.quantile_levels,
                                       cfg.median_size, cfg.min_component)
            if r == 1.0 and not torch.equal(result["mask"], extras["mask_ungated"]):
                matches = False
            maps[r].append(result["anomaly_map"].float().cpu().numpy())
            masks[r].append(result["mask"].cpu().numpy())
        gts.append(batch.mask.cpu().numpy())
        labels.append(batch.label.cpu().numpy())
        gates.append(output.pred_label.cpu().numpy())
        fgs.append(np.asarray(foreground_from_image(batch.image.cpu())))
        bar.update(len(batch))
    bar.close()
    gt, label, gate, fg = (np.concatenate(a) for a in (gts, labels, gates, fgs))
    points = []
    for r in ratios:
        reports = evaluate_setups(np.concatenate(maps[r]), np.concatenate(masks[r]), gt, label, uses_pixel_labels=False,
                                  foreground=fg, pred_labels=gate, compute_auroc=False)
        points.append({"ratio": float(r), "mixed_dice": reports["mixed"]["dice"],
                       "unhealthy_dice": reports["unhealthy"]["dice"], "mixed_auprc": reports["mixed"]["auprc"],
                       "unhealthy_auprc": reports["unhealthy"]["auprc"]})
    return {"points": points, "matches_method_at_ratio_1": matches if 1.0 in ratios else None, "slices": int(len(rows))}


def ablation_thresholds(maps_file: Path, count: int, min_component: int) -> dict[str, Any]:
    """Algorithm 1 (dynamic, per image) vs fixed thresholds on the same maps (spec C.8, Fig. 5d).

    The fixed thresholds are quantiles (0.80 ... 0.999) of the maps' brain pixels; each mask goes through
    the same CC filter. This compares rules on the test maps; nothing is selected from it.

    Args:
        maps_file: ``maps.npz`` of an AnoFPDM run (un-gated dynamic masks and the gate).
        count: number of fixed thresholds.
        min_component: CC filter size.

    Returns:
        ``{"points": [{threshold, quantile, mixed_dice, unhealthy_dice}], "dynamic": {mixed_dice, unhealthy_dice}}``.
    """
    data = np.load(maps_file)
    maps = data["anomaly_map"].astype(np.float32)
    gt, labels, dynamic = data["gt_mask"], data["label"], data["pred_mask"]
    gate = data["pred_label"] if (data["pred_label"] >= 0).all() else None
    brain = data["brain"].astype(bool)
    values = maps[brain] if brain.any() else maps.reshape(-1)
    levels = np.linspace(0.80, 0.999, count)
    points = []
    for level, tau in zip(levels, np.quantile(values, levels)):
        pred = np.asarray(remove_small_components(maps >= tau, min_component))
        points.append({"threshold": float(tau), "quantile": float(level), **_dice_setups(pred, gt, labels, gate)})
    return {"points": points, "dynamic": _dice_setups(dynamic, gt, labels, gate), "slices": int(maps.shape[0])}


# ----------------------------------------------------------------------------------------------------------
# Aggregation and writers
# ----------------------------------------------------------------------------------------------------------
_METRICS = ("dice", "iou", "auprc")


def _aggregate_row(
    label: str, row: MethodRow, runs: list[MethodResult], evaluation: str, alternative: bool
) -> dict[str, Any]:
    """One table row: mean and std over runs of each setup's metrics, cost means, labels-used flag."""
    first = runs[0]
    uses = first.uses_pixel_labels(evaluation)
    setups: dict[str, dict[str, Any]] = {}
    for setup in ("mixed", "unhealthy"):
        reports: list[MetricReport] = [r.reports(evaluation)[setup] for r in runs if setup in r.reports(evaluation)]
        if not reports:
            continue
        merged = aggregate_runs(reports)
        setups[setup] = {
            **{m: merged.values[m] for m in _METRICS if m in merged.values},
            **{f"{m}_std": merged.values.get(f"{m}_runs_std") for m in _METRICS},
            "image_accuracy": merged.values.get("image_accuracy"),
            "slices": merged.counts.get("n_slices"),
        }
    cost_keys = ("nfe_per_slice", "classifier_evaluations_per_slice", "seconds_per_slice", "cpu_seconds_per_slice",
                 "peak_memory_mb", "fit_seconds")
    cost = {key: float(np.mean([r.cost[key] for r in runs])) for key in cost_keys}
    policy = first.evaluations[evaluation]["policy"]
    family = first.method
    chosen_w = sorted({r.calibration.get("guidance_w") for r in runs if r.calibration.get("guidance_w") is not None})
    return {
        "label": label if not alternative else f"{label} [{evaluation}]",
        "preset": row.preset,
        "method": family,
        "type": row.type or _TYPES.get(family, ""),
        "evaluation": evaluation,
        "alternative": alternative,
        "threshold_policy": policy.get("policy"),
        "thresholds": [r.evaluations[evaluation]["policy"].get("threshold") for r in runs],
        "uses_pixel_labels": bool(uses),
        "pixel_labels": "✗" if uses else "✓",
        "n_runs": len(runs),
        "seeds": [r.info.get("seed") for r in runs],
        "deterministic": len(runs) == 1,
        "mixed": setups.get("mixed", {}),
        "unhealthy": setups.get("unhealthy", {}),
        "cost": cost,
        "chosen_w": chosen_w,
        "overrides": list(row.set),
        "run_dirs": [str(r.out_dir) for r in runs],
    }


def _fmt(mean: Any, std: Any, n_runs: int) -> str:
    if mean is None or (isinstance(mean, float) and not np.isfinite(mean)):
        return "–"
    text = f"{100 * mean:.1f}"
    if n_runs > 1 and std is not None and np.isfinite(std):
        text += f" ± {100 * std:.1f}"
    return text


CSV_COLUMNS = (
    "label", "preset", "type", "pixel_labels", "uses_pixel_labels", "threshold_policy", "n_runs",
    "mixed_dice", "mixed_dice_std", "mixed_iou", "mixed_iou_std", "mixed_auprc", "mixed_auprc_std",
    "unhealthy_dice", "unhealthy_dice_std", "unhealthy_iou", "unhealthy_iou_std", "unhealthy_auprc",
    "unhealthy_auprc_std", "nfe_per_slice", "classifier_evaluations_per_slice", "seconds_per_slice",
    "cpu_seconds_per_slice", "peak_memory_mb", "fit_seconds", "chosen_w",
)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``results.csv``: one line per table row, metrics as fractions, setup-prefixed columns."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            flat = {key: row.get(key) for key in ("label", "preset", "type", "pixel_labels", "uses_pixel_labels",
                                                  "threshold_policy", "n_runs")}
            for setup in ("mixed", "unhealthy"):
                for metric in _METRICS:
                    flat[f"{setup}_{metric}"] = row[setup].get(metric)
                    flat[f"{setup}_{metric}_std"] = row[setup].get(f"{metric}_std")
            flat.update(row["cost"])
            flat["chosen_w"] = ";".join(f"{w:g}" for w in row["chosen_w"])
            writer.writerow({key: flat.get(key) for key in CSV_COLUMNS})


def table1_markdown(rows: list[dict[str, Any]]) -> str:
    """The Table-1 layout (percentages, mean ± std over runs) with the pixel-label column."""
    lines = [
        "| Type | Pixel labels | Method | Threshold | Mixed DICE | Mixed IoU | Mixed AUPRC | Unh. DICE | Unh. IoU | Unh. AUPRC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["type"], row["pixel_labels"], row["label"] + ("*" if row["deterministic"] else ""),
                 str(row["threshold_policy"])]
        for setup in ("mixed", "unhealthy"):
            for metric in _METRICS:
                cells.append(_fmt(row[setup].get(metric), row[setup].get(f"{metric}_std"), row["n_runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_markdown(rows: list[dict[str, Any]]) -> str:
    """Cost columns: NFE, classifier evaluations, seconds and peak memory per slice."""
    lines = [
        "| Method | NFE / slice | classifier evals / slice | s / slice (wall) | CPU s / slice | peak memory (MiB) | fit (s) | chosen w |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["alternative"]:
            continue
        c = row["cost"]
        lines.append(
            f"| {row['label']} | {c['nfe_per_slice']:.0f} | {c['classifier_evaluations_per_slice']:.0f} | "
            f"{c['seconds_per_slice']:.3f} | {c['cpu_seconds_per_slice']:.3f} | {c['peak_memory_mb']:.0f} | "
            f"{c['fit_seconds']:.1f} | {', '.join(f'{w:g}' for w in row['chosen_w']) or '–'} |"
        )
    return "\n".join(lines)


def stride_markdown(points: list[dict[str, Any]]) -> str:
    """The step-stride curve as a table."""
    lines = [
        "| step_stride | evaluated steps | NFE / slice | s / slice | Mixed DICE | Mixed AUPRC | Unh. DICE | Unh. AUPRC | chosen w |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['step_stride']} | {p['evaluated_steps']} | {p['nfe_per_slice']:.0f} | {p['seconds_per_slice']:.3f} | "
            f"{_fmt(p['mixed_dice'], None, 1)} | {_fmt(p['mixed_auprc'], None, 1)} | {_fmt(p['unhealthy_dice'], None, 1)} | "
            f"{_fmt(p['unhealthy_auprc'], None, 1)} | {p['chosen_w']:g} |"
        )
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: settings, Table 1, costs, stride curve, ablation summaries, figure links."""
    config = results["config"]
    ev = config["evaluation"]
    parts = [
        f"# {results['benchmark']}: AnoFPDM Table 1 on the built-in phantom",
        "",
        config.get("description", ""),
        "",
        f"Test: {results['samples']['test_slices']} distinct `{ev['split']}` slices "
        f"({results['samples']['test_unhealthy']} unhealthy), validation: {results['samples']['val_slices']} slices "
        f"(seed {ev['seed']}). Seeds: {results['seeds']}. Values in %, mean ± std over runs (seeds). "
        "Pixel labels: ✓ = nothing was tuned with pixel labels, ✗ = the threshold or the method's settings were "
        "tuned with pixel labels (the check/cross column of AnoFPDM Table 1). Mixed = all test slices (masks gated "
        "by the method's healthy/unhealthy decision where it has one); Unh. = ground-truth unhealthy slices, "
        "un-gated masks. Dice/IoU after the 5x5 median filter and removal of components <= 40 px; an empty "
        "prediction on an empty slice scores 1 (spec C.10). `*` = deterministic method (one run).",
        "",
        table1_markdown(results["rows"]),
        "",
        "## Cost",
        "",
        f"Device {results['machine'].get('cuda') or 'CPU'}, {results['machine']['torch_threads']} torch threads, "
        f"{results['machine']['cpu_count']} cores. NFE = diffusion-network evaluations per slice (the method's count).",
        "",
        cost_markdown(results["rows"]),
    ]
    if results.get("stride_curve"):
        parts += ["", "## AnoFPDM quality vs speed over step_stride", "", stride_markdown(results["stride_curve"]["points"])]
    ablations = results.get("ablations") or {}
    if ablations.get("guidance"):
        g = ablations["guidance"]
        parts += ["", "## Ablation: guidance strength w", "",
                  f"Selected on validation: w = {g['chosen_w']:g} ({g['rule']}).", "",
                  "| w | val accuracy | test accuracy | Mixed DICE | Unh. DICE |", "|---|---|---|---|---|"]
        for p in g["points"]:
            mark = " (selected)" if p["guidance_w"] == g["chosen_w"] else ""
            parts.append(f"| {p['guidance_w']:g}{mark} | {100 * p['val_accuracy']:.1f} | {100 * p['test_accuracy']:.1f} | "
                         f"{_fmt(p['mixed_dice'], None, 1)} | {_fmt(p['unhealthy_dice'], None, 1)} |")
    if ablations.get("end_step"):
        e = ablations["end_step"]
        parts += ["", "## Ablation: end-step ratio", "", "| ratio r | Mixed DICE | Unh. DICE |", "|---|---|---|"]
        parts += [f"| {p['ratio']:g} | {_fmt(p['mixed_dice'], None, 1)} | {_fmt(p['unhealthy_dice'], None, 1)} |"
                  for p in e["points"]]
    if ablations.get("thresholds"):
        t = ablations["thresholds"]
        best_mixed = max(p["mixed_dice"] for p in t["points"])
        best_unh = max(p["unhealthy_dice"] for p in t["points"])
        parts += ["", "## Ablation: dynamic vs fixed thresholds", "",
                  f"Algorithm 1 (dynamic): mixed Dice {_fmt(t['dynamic']['mixed_dice'], None, 1)}, unhealthy Dice "
                  f"{_fmt(t['dynamic']['unhealthy_dice'], None, 1)}; best of {len(t['points'])} fixed thresholds "
                  f"(chosen on the test maps themselves, an upper bound): mixed {_fmt(best_mixed, None, 1)}, unhealthy "
                  f"{_fmt(best_unh, None, 1)}."]
    if results.get("figures"):
        parts += ["", "## Figures", ""] + [f"- [{name}]({path})" for name, path in results["figures"].items()]
    parts += ["", "## Models", "", "| part | sha256 | step | weights |", "|---|---|---|---|"]
    for name, model in results["models"].items():
        parts.append(f"| {name} | `{model['sha256'][:16]}…` | {model['step']} | {model['weights']} |")
    parts += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# run_benchmark
# ----------------------------------------------------------------------------------------------------------
def run_benchmark(
    config: BenchmarkConfig,
    out: str | Path,
    *,
    train: bool = False,
    seeds: int | Sequence[int] | None = None,
    device: str | None = None,
    progress: bool = True,
    command: str | None = None,
    config_path: str | Path | None = None,
) -> Path:
    """Run the benchmark into ``out`` (resumable: finished stages and runs are skipped on a rerun).

    Args:
        config: the benchmark config.
        out: output folder (created).
        train: train the model parts into ``out/models`` instead of loading the committed model folder.
        seeds: a number of seeds (0..n-1) or explicit seeds, replacing ``config.seeds``.
        device: replaces ``config.device``.
        progress: progress bars.
        command: the command line, recorded in ``results.json``.
        config_path: the YAML the config came from, recorded.

    Returns:
        ``out`` (with ``results.json``, ``results.csv``, ``results.md``, ``figures/`` and ``runs/``).
    """
    from anomalydiff.evaluation import figures
    from anomalydiff.training.distributed import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds))
    if device is not None:
        config = dataclasses.replace(config, device=device)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    torch_device = resolve_device(config.device)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started, started_cpu = time.perf_counter(), time.process_time()
    # stage timings survive a resumed run: a skipped stage keeps the seconds it took when it ran
    stages_file = out / "stage_seconds.json"
    timings: dict[str, float] = json.loads(stages_file.read_text()) if stages_file.exists() else {}

    def record(stage: str, seconds: float) -> None:
        if seconds > 0 or stage not in timings:
            timings[stage] = seconds
        _write_json(stages_file, timings)

    evaluation = config.evaluation

    # 1. data
    store_path, data_facts = prepare_data(config.data, out, progress)
    record("phantom_seconds", data_facts["phantom_seconds"])
    record("prepare_seconds", data_facts["prepare_seconds"])
    store = SliceStore(store_path)

    # 2. models (committed weights, or --train)
    needed = sorted({p for row in config.methods for p in parts_needed(row.preset, row.set)}, key=PART_NAMES.index)
    if train:
        model_dir = out / "models"
        train_seconds = train_parts(config.models, needed, store_path, model_dir, config.device)
        record("train_seconds", sum(train_seconds.values()))
    else:
        model_dir = _resolve(config.models.dir)
        if not model_dir.exists():
            raise CheckpointError(
                f"model folder {model_dir} (models.dir of the config) not found. Train the models with "
                f"`anomalydiff benchmark {config_path or 'CONFIG'} --train` (they go into {out / 'models'}; copy "
                f"that folder to {config.models.dir} to commit them), or point models.dir at a model folder"
            )
    parts = load_parts(model_dir, device=torch_device, require=needed)
    _check_store_fits(parts, store)
    _log(f"models from {model_dir}: " + ", ".join(f"{k}@{v[:12]}" for k, v in parts.sha256.items()))

    # 3. methods x seeds
    calibrations: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    row_runs: dict[str, list[MethodResult]] = {}
    used_keys: set[str] = set()
    for row in config.methods:
        label = _row_label(row)
        key = _slug(label)
        while key in used_keys:
            key += "_"
        used_keys.add(key)
        row_seeds = config.seeds if _has_seed(row.preset, row.set) else config.seeds[:1]
        runs = []
        for seed in row_seeds:
            overrides = [*row.set, f"seed={seed}"] if _has_seed(row.preset, row.set) else list(row.set)
            run_dir = out / "runs" / key / f"seed_{seed}"
            method, used = build_method_from_parts(row.preset, parts, overrides)
            cal_key = None
            if method.name == "anofpdm":
                cal_key = _calibration_key(to_dict(method.config), parts.sha256[used[0]], evaluation)
            if (run_dir / "metrics.json").exists():
                result = load_result(run_dir)
                _log(f"{label} seed {seed}: done before ({run_dir})")
            else:
                _log(f"{label} seed {seed}: running")
                result = run_method(
                    method, store, evaluation, out_dir=run_dir, name=label, device=torch_device, progress=progress,
                    calibration=calibrations.get(cal_key) if cal_key else None,
                    info={"preset": row.preset, "overrides": overrides, "seed": seed,
                          "models": {p: parts.ids[p] for p in used}},
                )
            if cal_key:
                calibrations.setdefault(cal_key, result.calibration)
            runs.append(result)
        row_runs[key] = runs
        rows.append(_aggregate_row(label, row, runs, runs[0].primary, alternative=False))
        for evaluation_name in runs[0].evaluations:
            if evaluation_name != runs[0].primary:
                rows.append(_aggregate_row(label, row, runs, evaluation_name, alternative=True))
    # seconds of every run (fresh or loaded): what the table cost, resumed or not
    record("methods_seconds", sum(r.cost["total_seconds"] for runs in row_runs.values() for r in runs))

    # 4. step-stride curve
    stride_curve = None
    if config.stride_curve is not None:
        sc = config.stride_curve
        curve_eval = dataclasses.replace(
            evaluation,
            val_slices=sc.val_slices if sc.val_slices is not None else evaluation.val_slices,
            max_slices=sc.test_slices if sc.test_slices is not None else evaluation.max_slices,
        )
        points = []
        for stride in sc.strides:
            overrides = _row_overrides(config, sc.preset, [*sc.set, f"step_stride={stride}", f"seed={config.seeds[0]}"])
            run_dir = out / "stride_curve" / f"stride_{stride}"
            if (run_dir / "metrics.json").exists():
                result = load_result(run_dir)
            else:
                _log(f"step_stride curve: stride {stride}")
                method, used = build_method_from_parts(sc.preset, parts, overrides)
                result = run_method(method, store, curve_eval, out_dir=run_dir, name=f"{sc.preset} stride {stride}",
                                    device=torch_device, progress=progress,
                                    info={"preset": sc.preset, "overrides": overrides, "seed": config.seeds[0]})
            reports = result.reports()
            points.append({
                "step_stride": stride,
                "evaluated_steps": len(range(0, result.calibration["config"]["forward_steps"], stride)),
                "nfe_per_slice": result.cost["nfe_per_slice"],
                "seconds_per_slice": result.cost["seconds_per_slice"],
                "cpu_seconds_per_slice": result.cost["cpu_seconds_per_slice"],
                "chosen_w": result.calibration["guidance_w"],
                "total_seconds": result.cost["total_seconds"],
                **{f"{s}_{m}": reports[s][m] for s in ("mixed", "unhealthy") for m in _METRICS if s in reports},
                "run_dir": str(run_dir),
            })
        stride_curve = {"preset": sc.preset, "points": points,
                        "slices": {"val": curve_eval.val_slices, "test": curve_eval.max_slices}}
        record("stride_curve_seconds", sum(p["total_seconds"] for p in points))

    # 5. ablations
    ablations: dict[str, Any] = {}
    if config.ablations is not None:
        ablation_started = time.perf_counter()
        fresh_ablation = False
        ab = config.ablations
        folder = out / "ablations"
        folder.mkdir(exist_ok=True)
        overrides = _row_overrides(config, ab.preset, [*ab.set, f"seed={config.seeds[0]}"])
        subset = sample_rows(store, evaluation.split, ab.slices, evaluation.seed, balanced=True)

        def fresh() -> Any:
            return build_method_from_parts(ab.preset, parts, overrides)[0]

        base = fresh()
        cal_key = _calibration_key(to_dict(base.config), parts.sha256["cfg"], evaluation)
        if cal_key in calibrations:
            base.load_calibration(calibrations[cal_key])
        else:
            from anomalydiff.evaluation.runner import iter_batches_to

            _log("ablations: fitting the AnoFPDM calibration on validation")
            val_rows = sample_rows(store, evaluation.val_split, evaluation.val_slices, evaluation.seed,
                                   evaluation.balanced_val)
            base.fit(iter_batches_to(store, val_rows, evaluation.batch_size, torch_device))
            calibrations[cal_key] = base.calibration()
        if ab.guidance:
            path = folder / "guidance.json"
            if path.exists():
                ablations["guidance"] = json.loads(path.read_text())
            else:
                _log("ablation: Dice vs guidance strength w")
                fresh_ablation = True
                ablations["guidance"] = ablation_guidance(fresh, base.calibration(), store, subset, evaluation,
                                                          torch_device, progress)
                _write_json(path, ablations["guidance"])
        if ab.end_step_ratios:
            path = folder / "end_step.json"
            if path.exists():
                ablations["end_step"] = json.loads(path.read_text())
            else:
                _log("ablation: Dice vs end-step ratio")
                fresh_ablation = True
                ablations["end_step"] = ablation_end_step(base, store, subset, ab.end_step_ratios, evaluation,
                                                          torch_device, progress)
                _write_json(path, ablations["end_step"])
        if ab.fixed_thresholds > 0:
            main = next((runs for key, runs in row_runs.items()
                         if runs[0].info.get("preset") == ab.preset), None)
            if main is not None and main[0].out_dir is not None:
                ablations["thresholds"] = ablation_thresholds(main[0].out_dir / "maps.npz", ab.fixed_thresholds,
                                                              evaluation.min_component)
                ablations["thresholds"]["run_dir"] = str(main[0].out_dir)
                _write_json(folder / "thresholds.json", ablations["thresholds"])
        record("ablations_seconds", time.perf_counter() - ablation_started if fresh_ablation else 0.0)

    # 6. figures and results
    figure_dir = out / "figures"
    figure_dir.mkdir(exist_ok=True)
    figure_paths: dict[str, str] = {}
    if stride_curve:
        figures.plot_stride_curve(stride_curve["points"], figure_dir / "stride_curve.png")
        figure_paths["AnoFPDM quality vs speed (step_stride)"] = "figures/stride_curve.png"
    if "guidance" in ablations and ablations["guidance"]["points"]:
        figures.plot_guidance_ablation(ablations["guidance"], figure_dir / "ablation_guidance.png")
        figure_paths["Dice vs guidance strength w"] = "figures/ablation_guidance.png"
    if "end_step" in ablations:
        figures.plot_end_step_ablation(ablations["end_step"], figure_dir / "ablation_end_step.png")
        figure_paths["Dice vs end-step ratio"] = "figures/ablation_end_step.png"
    if "thresholds" in ablations:
        figures.plot_threshold_ablation(ablations["thresholds"], figure_dir / "ablation_thresholds.png")
        figure_paths["Dynamic vs fixed thresholds"] = "figures/ablation_thresholds.png"
    first_run = next(iter(row_runs.values()))[0]
    timings["this_invocation_seconds"] = time.perf_counter() - started
    # CPU seconds of this process (all threads): the fair cost on a shared machine
    timings["this_invocation_cpu_seconds"] = time.process_time() - started_cpu
    timings["total_seconds"] = sum(v for k, v in timings.items() if not k.startswith(("this_invocation", "total")))
    results = {
        "benchmark": config.name,
        "command": command or " ".join(sys.argv),
        "config_file": str(config_path) if config_path else None,
        "config": to_dict(config),
        "started": started_at,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "device": str(torch_device),
        "seeds": list(config.seeds),
        "trained_here": train,
        "model_dir": str(model_dir),
        "models": parts.ids,
        "data": data_facts,
        "samples": {
            "val_slices": first_run.samples["val_slices"],
            "val_unhealthy": first_run.samples["val_unhealthy"],
            "test_slices": first_run.samples["slices"],
            "test_unhealthy": first_run.samples["unhealthy"],
        },
        "timings": timings,
        "rows": rows,
        "stride_curve": stride_curve,
        "ablations": ablations,
        "figures": figure_paths,
    }
    _write_json(out / "results.json", results)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(results_markdown(json.loads((out / "results.json").read_text())))
    _log(f"done in {timings['total_seconds']:.0f} s: {out / 'results.md'}")
    return out
