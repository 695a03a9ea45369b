"""``anomalydiff demo``: the whole pipeline on the built-in phantom with the committed models, in minutes on a CPU.

:func:`run_demo` does, with no download (stage lines with elapsed seconds go to stderr):

1. **Phantom**: a small BraTS 2021-layout phantom (:func:`anomalydiff.data.phantom.write_phantom_dataset`; 1 mm
   like the models' training phantom; seed 2024, so no subject was seen in training (seed 0) and none is shared
   with the benchmark (seed 1000); about 20 % of the subjects are lesion-free) in ``OUT/data/phantom_brats``.
2. **Slice store**: :func:`anomalydiff.data.prepare.prepare_dataset` with the models' own preprocessing
   (``MODELS/preprocess.json``: channels, resolution, normalisation, slice rule), split by subject into
   validation and test only (``OUT/data/store``).
3. **Models**: the parts the methods need from the model folder (``load_parts``: EMA weights, sha256, step).
4. **Methods** (one stage each): fit on a label-balanced validation sample (image labels only), score a
   label-balanced test sample, post-process and evaluate both setups (mixed / unhealthy-only) with
   :func:`anomalydiff.evaluation.runner.run_method`, written to ``OUT/<method>/`` (``metrics.json``,
   ``calibration.json``, ``maps.npz``). Defaults: AnoFPDM (DDIM) in the quick setting of
   ``benchmarks/phantom_quick.yaml`` (every 40th of 600 forward steps) at the paper's BraTS w = 2, and Wolleb et al. (the
   P2 re-run, L = 200 on a stride-25 grid) with a label-free threshold: the healthy-quantile policy (fitted on the
   healthy validation slices' maps, image labels only) as its primary mask; Otsu per image (label-free) and the
   oracle best-Dice threshold (pixel labels, shown for reference only) are evaluated on the same maps.
5. **Predict**: the held-out test subject(s) from the raw phantom NIfTI files with
   :class:`anomalydiff.predict.Predictor` built on the networks already loaded (so prediction and evaluation use
   the same weights) and each method's fresh calibration, into
   ``OUT/predict/<method>/``: BIDS-style NIfTI maps and masks in the scan's own space, a per-slice CSV and an
   overlay PNG (:mod:`anomalydiff.predict.writer`). The 3-D Dice against the phantom's segmentation is shown,
   never used.
6. **Report**: ``OUT/report.html`` (self-contained; PNGs also in ``OUT/figures``) and ``OUT/demo.json`` (the same
   facts, machine-readable), through :func:`anomalydiff.evaluation.report.write_report`.

Nothing here depends on the numbers of the committed weights: a model folder with the same layout (the parts
and ``preprocess.json``) runs unchanged. ``OUT`` must be new or empty; ``overwrite=True`` replaces an earlier
demo there (only the demo's own files; a folder that is not a demo's is never emptied).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anomalydiff.config import ConfigError, from_dict, to_dict
from anomalydiff.data.store import SliceStore
from anomalydiff.evaluation.models import (
    PART_NAMES,
    Parts,
    build_method_from_parts,
    load_parts,
    parts_needed,
    train_command,
)
from anomalydiff.evaluation.runner import EvaluationConfig, MethodResult, run_method
from anomalydiff.labels import UNHEALTHY
from anomalydiff.machine import machine_facts
from anomalydiff.methods import CONFIG_DIR
from anomalydiff.models.io import CheckpointError

if TYPE_CHECKING:
    from anomalydiff.predict.inputs import PreprocessRecord

__all__ = ["DEMO_FILE", "DEMO_FORMAT", "DemoConfig", "DemoMethod", "run_demo"]

#: The machine-readable record of a demo folder (also what ``write_report`` recognises a demo by).
DEMO_FILE = "demo.json"
DEMO_FORMAT = "anomalydiff-demo"
#: Repository root (models/ lives here; the package is installed editable).
REPO_ROOT = CONFIG_DIR.parent
#: What a demo writes into OUT (all that ``overwrite`` removes).
_OWN_ENTRIES = ("data", "figures", "predict", "report.html", DEMO_FILE)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoMethod:
    """One method of the demo: a preset with overrides and how its masks are thresholded."""

    #: Short name: the output folder ``OUT/<key>/`` and ``OUT/predict/<key>/``.
    key: str
    #: Label in the report.
    label: str
    #: Method preset in configs/methods.
    preset: str
    #: ``key=value`` overrides of the preset (the quick settings of benchmarks/phantom_quick.yaml).
    set: tuple[str, ...] = ()
    #: Primary threshold policy of a method without its own threshold (label-free: healthy_quantile or otsu).
    threshold_policy: str = "healthy_quantile"
    #: Further policies evaluated on the same maps (oracle_dice uses pixel labels: shown as a reference).
    alternative_policies: tuple[str, ...] = ("otsu", "oracle_dice")


#: AnoFPDM (DDIM) and Wolleb (P2 re-run) in the quick setting of benchmarks/phantom_quick.yaml.
DEFAULT_METHODS: tuple[DemoMethod, ...] = (
    # w = 2, the value the AnoFPDM paper selected on BraTS (no pixel label): with the committed CPU-trained weights the
    # cosine gate is at chance for every w, so the selection rule (C.6) degenerates to the largest w of the grid;
    # the benchmark runs the rule and shows Dice against w (benchmarks/results/phantom_quick.md)
    DemoMethod("anofpdm", "AnoFPDM (DDIM)", "anofpdm_ddim", ("step_stride=40", "select_w=false", "guidance_w=2.0")),
    # P2's L and s are kept (not tuned here); the mask threshold is label-free, so no pixel label is used
    DemoMethod("wolleb", "DDIM clf [Wolleb]", "wolleb_p2", ("step_stride=25", "tuned_with_pixel_labels=false")),
)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (defaults sized to finish in ~5 minutes on 2 idle CPU cores with 64 px models)."""

    #: Phantom subjects (each ~140 axial slices with brain at 1 mm); split into validation and test.
    subjects: int = 8
    #: Phantom seed: training used 0, benchmarks/phantom_quick.yaml 1000, so these subjects are unseen.
    seed: int = 2024
    #: PhantomConfig fields (anomalydiff.data.phantom); {} = 1 mm, 20 % lesion-free (the training phantom's).
    phantom: Mapping[str, Any] = field(default_factory=dict)
    #: Share of the subjects in the validation split (at least one subject each in val and test).
    val_fraction: float = 0.4
    #: Label-balanced validation slices used for fitting (quick benchmark: 32).
    val_slices: int = 24
    #: Label-balanced test slices scored and evaluated (quick benchmark: 40).
    test_slices: int = 32
    #: Seed of the slice samples (spec E.11).
    sample_seed: int = 0
    #: Slices per score() call (CPU: 16-32; results do not depend on it).
    batch_size: int = 16
    #: Oracle-threshold grid relative to the validation maps' range (CPU-trained maps' scale, as the quick benchmark).
    oracle_grid: str = "relative"
    #: Methods (fit, score, evaluate, predict).
    methods: tuple[DemoMethod, ...] = DEFAULT_METHODS
    #: Held-out test subjects predicted from their NIfTI files (lesioned subjects first, then a lesion-free one).
    predict_subjects: int = 1
    #: Methods whose predictions are written (keys of ``methods``; a 1 mm volume is ~140 slices); None = all.
    predict_methods: tuple[str, ...] | None = ("anofpdm",)

    def __post_init__(self) -> None:
        if self.subjects < 2:
            raise ConfigError(f"the demo needs at least 2 phantom subjects (one validation, one test), got {self.subjects}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"DemoConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_slices < 2 or self.test_slices < 2:
            raise ConfigError("DemoConfig.val_slices and test_slices must be >= 2 (one healthy, one unhealthy)")
        if self.predict_subjects < 0:
            raise ConfigError(f"DemoConfig.predict_subjects must be >= 0, got {self.predict_subjects}")
        keys = [m.key for m in self.methods]
        if not keys or len(set(keys)) != len(keys) or any(k in _OWN_ENTRIES or "/" in k for k in keys):
            raise ConfigError(f"DemoConfig.methods needs unique keys that are plain folder names, got {keys}")
        unknown = set(self.predict_methods or ()) - set(keys)
        if unknown:
            raise ConfigError(f"DemoConfig.predict_methods names {sorted(unknown)}, not among the methods {keys}")

    def split_counts(self) -> tuple[int, int, int]:
        """``(train, val, test)`` subject counts of the store: no training split."""
        n_val = min(max(1, round(self.val_fraction * self.subjects)), self.subjects - 1)
        return 0, n_val, self.subjects - n_val


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
class _Stages:
    """Stage lines on stderr (``[2/7] preparing the slice store ... 8.1 s``) and the time of each stage."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def run(self, name: str, title: str, work: Callable[[], Any]) -> Any:
        self.index += 1
        prefix = f"[{self.index}/{self.total}]"
        print(f"{prefix} {title} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        self.records.append({"stage": name, "title": title, "seconds": seconds, "cpu_seconds": cpu_seconds})
        print(f"{prefix} {title}: done in {seconds:.1f} s (total {time.perf_counter() - self.started:.0f} s)",
              file=sys.stderr, flush=True)
        return result


def _resolve(path: str | Path) -> Path:
    """A relative path: from the current folder if it exists there, else from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def _models_missing_message(folder: Path, what: str) -> str:
    commands = "; ".join(train_command(part, folder) for part in ("cfg", "classifier"))
    return (
        f"{what}. The demo runs on the committed phantom models (models/phantom/ in the repository: cfg/, "
        "classifier/, preprocess.json); restore them from the repository (e.g. `git checkout -- models/phantom`), "
        "or make a model folder yourself: `anomalydiff benchmark benchmarks/phantom_quick.yaml --train` trains "
        "every part into runs/phantom_quick/models/ (copy it, with runs/phantom_quick/data/store/store.json saved as "
        f"preprocess.json, to {folder}), or train the parts one by one: {commands} and write "
        "MODEL/preprocess.json with anomalydiff.predict.inputs.write_preprocess(STORE, MODEL). Then pass --models"
    )


def _check_models(folder: Path, needed: Sequence[str]) -> None:
    """A clear error (what is missing, how to get it) before any work is done."""
    if not folder.is_dir():
        raise CheckpointError(_models_missing_message(folder, f"model folder {folder} not found"))
    missing = [p for p in needed if not (folder / p / "ema.safetensors").is_file()]
    if missing:
        raise CheckpointError(_models_missing_message(
            folder, f"model folder {folder} lacks {', '.join(p + '/ema.safetensors' for p in missing)}"))
    if not (folder / "preprocess.json").is_file():
        raise CheckpointError(_models_missing_message(
            folder, f"{folder / 'preprocess.json'} not found (the preprocessing of the models' training store)"))


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT unless it holds an earlier demo and ``overwrite``; then remove the demo's files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    entries = [p for p in out.iterdir()] if out.is_dir() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return
    if not (out / DEMO_FILE).is_file():
        raise FileExistsError(
            f"--out {out} is not empty and holds no earlier demo ({DEMO_FILE} missing); choose a new or empty folder "
            "(the demo never empties a folder it did not write)"
        )
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds a demo; pass --overwrite to replace it, or choose another --out")
    record = json.loads((out / DEMO_FILE).read_text())
    own = set(_OWN_ENTRIES) | {str(m) for m in record.get("method_keys", [])}
    for entry in entries:
        if entry.name in own:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _write_json(path: Path, data: Any) -> None:
    from anomalydiff.evaluation.runner import _json_safe

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, default=str))
    tmp.replace(path)


def _model_facts(parts: Parts, used: Sequence[str]) -> dict[str, Any]:
    """part -> weights, sha256, EMA step and the training facts of its card.json (if present)."""
    facts = {}
    for name in used:
        part = parts.parts[name]
        entry = part.describe()
        card_file = part.run_dir / "card.json"
        if card_file.is_file():
            card = json.loads(card_file.read_text())
            entry["card"] = {k: card.get(k) for k in ("steps", "target_steps", "batch_size", "wall_time_hours",
                                                      "final_loss", "num_parameters", "data", "command") if k in card}
        facts[name] = entry
    return facts


def _metric_summary(result: MethodResult) -> dict[str, Any]:
    """evaluation -> {uses_pixel_labels, policy, mixed / unhealthy: dice, iou, auprc, pixel_auroc, ...}."""
    keys = ("dice", "iou", "auprc", "pixel_auroc", "image_accuracy", "image_auroc")
    out: dict[str, Any] = {}
    for name, evaluation in result.evaluations.items():
        entry: dict[str, Any] = {"uses_pixel_labels": bool(evaluation["uses_pixel_labels"]),
                                 "policy": evaluation["policy"]}
        for setup, report in evaluation["reports"].items():
            entry[setup] = {k: report.values.get(k) for k in keys if k in report.values}
            entry[setup]["n_slices"] = report.counts.get("n_slices")
        out[name] = entry
    return out


def _predict_subjects(store: SliceStore, count: int) -> list[tuple[str, bool]]:
    """Test subjects to predict: those with a lesion first (sorted), then one lesion-free one if there is one."""
    subjects = sorted(store.split_subjects("test"))
    lesioned = {store.slices[int(r)].subject_id for r in store.rows("test", UNHEALTHY)}
    with_lesion = [s for s in subjects if s in lesioned]
    without = [s for s in subjects if s not in lesioned]
    chosen = with_lesion[: max(count - 1, 1)] if without else with_lesion[:count]
    chosen += without[: count - len(chosen)]
    chosen += [s for s in with_lesion if s not in chosen][: count - len(chosen)]
    return [(s, s in lesioned) for s in chosen[:count]]


def _dice_3d(mask: np.ndarray, seg_file: Path) -> float | None:
    """Dice of a predicted volume mask against the phantom's segmentation (any positive label); both empty = 1."""
    import nibabel as nib

    if not seg_file.is_file():
        return None
    gt = np.asarray(nib.load(str(seg_file)).dataobj) > 0
    if gt.shape != mask.shape:
        return None
    total = int(gt.sum()) + int(mask.sum())
    return 1.0 if total == 0 else 2.0 * int((gt & mask).sum()) / total


# ----------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------
def run_demo(
    out: str | Path,
    models: str | Path = "models/phantom",
    subjects: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    config: DemoConfig | None = None,
    command: str | None = None,
) -> Path:
    """Run the demo (module docstring): phantom -> store -> fit, score, evaluate -> predict -> report.

    Args:
        out: output folder; must be new or empty, or hold an earlier demo with ``overwrite``.
        models: model folder with the parts the methods need (``cfg/`` and ``classifier/`` for the defaults) and
            ``preprocess.json``; a relative path is looked up in the current folder, then in the repository.
        subjects: phantom subjects (default ``config.subjects``, 8).
        seed: phantom seed (default ``config.seed``, 2024).
        device: ``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace an earlier demo in ``out``.
        progress: progress bars (stage lines with elapsed seconds are always printed to stderr).
        config: sizes, methods and settings (:class:`DemoConfig`); ``subjects`` / ``seed`` override it.
        command: the command line, recorded in ``demo.json``.

    Returns:
        The report path ``out/report.html`` (``out/demo.json`` beside it).

    Raises:
        CheckpointError: the model folder or a needed part or ``preprocess.json`` is missing (the message says how
            to get them).
        FileExistsError: ``out`` is not empty and holds no earlier demo, or holds one and ``overwrite`` is False.
        ConfigError: invalid settings.
    """
    from anomalydiff.data.phantom import PhantomConfig, write_phantom_dataset
    from anomalydiff.data.prepare import prepare_dataset
    from anomalydiff.evaluation.report import write_report
    from anomalydiff.predict.inputs import read_preprocess
    from anomalydiff.training.distributed import resolve_device

    config = config or DemoConfig()
    replaced = {k: v for k, v in (("subjects", subjects), ("seed", seed)) if v is not None}
    if replaced:
        config = dataclasses.replace(config, **replaced)
    phantom_config = from_dict(PhantomConfig, dict(config.phantom), where="DemoConfig.phantom")
    out = Path(out)
    model_dir = _resolve(models)
    needed = sorted({p for m in config.methods for p in parts_needed(m.preset, m.set)}, key=PART_NAMES.index)
    _check_models(model_dir, needed)
    record = read_preprocess(model_dir / "preprocess.json")
    if record.kind != "volume" or record.prepare.format not in ("brats2020", "brats2021", "brats2023"):
        raise ConfigError(
            f"{model_dir / 'preprocess.json'}: the models were trained on {record.prepare.format} data; the demo's "
            "phantom is in the BraTS layout (4 contrasts), so it needs models trained on a BraTS-format store"
        )
    torch_device = resolve_device(device)
    _prepare_out(out, overwrite)
    predict_keys = [m.key for m in config.methods if config.predict_methods is None or m.key in config.predict_methods]
    do_predict = config.predict_subjects > 0 and bool(predict_keys)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    demo: dict[str, Any] = {
        "format": DEMO_FORMAT,
        "version": 1,
        "status": "running",
        "command": command or f"run_demo({str(out)!r}, models={str(models)!r})",
        "started": started_at,
        "method_keys": [m.key for m in config.methods],
        "settings": {**to_dict(config), "models": str(model_dir), "device": str(torch_device),
                     "phantom_config": to_dict(phantom_config)},
        "machine": machine_facts(torch_device),
    }
    _write_json(out / DEMO_FILE, demo)  # marks OUT as a demo folder from the start (a rerun may replace it)
    stages = _Stages(4 + len(config.methods) + int(do_predict))
    root, store_path = out / "data" / "phantom_brats", out / "data" / "store"

    # 1. the phantom: unseen subjects (seed), the training phantom's settings
    stages.run("phantom", f"writing {config.subjects} phantom subjects (BraTS layout, {phantom_config.voxel_size:g} mm, "
               f"seed {config.seed}) to {root}",
               lambda: write_phantom_dataset(phantom_config, root, "brats", config.subjects, config.seed, progress=progress))

    # 2. the store: the models' own preprocessing, split by subject into val / test only
    prepare_config = dataclasses.replace(record.prepare, split_counts=config.split_counts(), max_subjects=None)
    stages.run("prepare", f"preparing the slice store ({record.resolution} px, {', '.join(record.channels)}; "
               f"{config.split_counts()[1]} validation / {config.split_counts()[2]} test subjects)",
               lambda: prepare_dataset(prepare_config, root, store_path, progress=progress))
    store = SliceStore(store_path)
    phantom_meta = json.loads((root / "phantom.json").read_text())
    demo["data"] = {
        "phantom_root": str(root.resolve()),
        "layout": "brats",
        "subjects": config.subjects,
        "seed": config.seed,
        "voxel_size_mm": phantom_config.voxel_size,
        "lesion_free_subjects": [s["subject_id"] for s in phantom_meta["subject_list"] if not s["has_lesion"]],
        "store": str(store_path.resolve()),
        "resolution": record.resolution,
        "channels": list(record.channels),
        "preprocess": str((model_dir / "preprocess.json").resolve()),
        "splits": {
            split: {"subjects": store.split_subjects(split), "slices": int(store.rows(split).size),
                    "unhealthy": int(store.rows(split, UNHEALTHY).size)}
            for split in ("val", "test")
        },
    }

    # 3. the models
    parts = stages.run("models", f"loading {', '.join(needed)} from {model_dir}",
                       lambda: load_parts(model_dir, device=torch_device, require=needed))
    demo["models"] = _model_facts(parts, needed)

    # 4. each method: fit on validation, score the test sample, post-process, evaluate both setups
    demo["methods"] = []
    for spec in config.methods:
        evaluation = EvaluationConfig(
            split="test", val_split="val", max_slices=config.test_slices, val_slices=config.val_slices,
            seed=config.sample_seed, balanced=True, balanced_val=True, batch_size=config.batch_size,
            threshold_policy=spec.threshold_policy,  # type: ignore[arg-type]
            alternative_policies=tuple(p for p in spec.alternative_policies if p != spec.threshold_policy),
            oracle_grid=config.oracle_grid,  # type: ignore[arg-type]
        )
        method, used = build_method_from_parts(spec.preset, parts, list(spec.set))
        run_dir = out / spec.key
        result: MethodResult = stages.run(
            f"method:{spec.key}", f"{spec.label}: fit on {config.val_slices} validation slices, score "
            f"{config.test_slices} test slices, evaluate",
            functools.partial(run_method, method, store, evaluation, out_dir=run_dir, name=spec.label,
                              device=torch_device, progress=progress,
                              info={"preset": spec.preset, "overrides": list(spec.set),
                                    "models": {p: parts.ids[p] for p in used}}),
        )
        calibration = result.calibration
        demo["methods"].append({
            "key": spec.key,
            "label": spec.label,
            "preset": spec.preset,
            "overrides": list(spec.set),
            "parts": list(used),
            "run_dir": str(run_dir.resolve()),
            "files": {name: str((run_dir / name).resolve()) for name in ("metrics.json", "calibration.json", "maps.npz")},
            "primary": result.primary,
            "evaluations": _metric_summary(result),
            "cost": result.cost,
            "samples": result.samples,
            "calibration": {
                **{k: calibration.get(k) for k in ("guidance_w", "tau_cos", "d_max_star") if k in calibration},
                **({"select_w": bool(calibration["config"].get("select_w"))} if isinstance(calibration.get("config"), dict) else {}),
            },
            "policies": result.policies,
            "method_config": result.info.get("method_config"),
        })
        _write_json(out / DEMO_FILE, demo)

    # 5. predict on held-out test subjects from their NIfTI files, in the scan's own space
    demo["predictions"] = []
    if do_predict:
        chosen = _predict_subjects(store, config.predict_subjects)
        names = ", ".join(f"{s} ({'lesion' if lesion else 'lesion-free'})" for s, lesion in chosen)
        demo["predictions"] = stages.run(
            "predict", f"predicting {names} from the NIfTI files with {', '.join(predict_keys)}",
            lambda: _predict(out, parts, record, root, config, chosen, predict_keys, torch_device, progress),
        )

    # 6. the report
    demo["stages"] = stages.records
    demo["status"] = "finished"
    demo["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    demo["total_seconds"] = time.perf_counter() - stages.started
    demo["report"] = str((out / "report.html").resolve())
    _write_json(out / DEMO_FILE, demo)
    report = stages.run("report", f"writing {out / 'report.html'}", lambda: write_report(out))
    demo["stages"] = stages.records
    demo["total_seconds"] = time.perf_counter() - stages.started
    _write_json(out / DEMO_FILE, demo)
    return Path(report)


def _predict(
    out: Path,
    parts: Parts,
    record: PreprocessRecord,
    root: Path,
    config: DemoConfig,
    chosen: Sequence[tuple[str, bool]],
    keys: Sequence[str],
    device: torch.device,
    progress: bool,
) -> list[dict[str, Any]]:
    """Stage 5: each method's calibration applied to the chosen subjects' raw files (predict's own outputs).

    The predictor runs on the networks already loaded (``parts``), so the predictions use exactly the weights that
    were evaluated even if the model folder changes meanwhile; ``read_calibration`` checks the calibration's
    sha256 against them, as ``Predictor.from_model_dir`` does.
    """
    import nibabel as nib

    from anomalydiff.predict.predictor import PredictConfig, Predictor, read_calibration
    from anomalydiff.predict.writer import output_path

    results = []
    methods = {m.key: m for m in config.methods}
    for key in keys:
        spec = methods[key]
        method, used = build_method_from_parts(spec.preset, parts, list(spec.set))
        predictor = Predictor(method, record, preset=spec.preset, parts=parts, used_parts=used,
                              config=PredictConfig(batch_size=config.batch_size), device=device,
                              calibration=read_calibration(out / key / "calibration.json"))
        target = out / "predict" / key
        for subject, has_lesion in chosen:
            started = time.perf_counter()
            rows = predictor.predict_path(root / subject, target, overwrite=True, progress=progress)
            seconds = time.perf_counter() - started
            row = next(r for r in rows if r.get("subject_id") == subject or r.get("folder") == subject)
            sid = str(row.get("folder") or subject)
            files = {desc: str(output_path(target, sid, desc, suffix).resolve())
                     for desc, suffix in (("anomalymap", ".nii.gz"), ("anomalymask", ".nii.gz"), ("slices", ".csv"),
                                          ("overlay", ".png"), ("summary", ".json"))}
            mask_image = nib.load(files["anomalymask"])
            mask = np.asarray(mask_image.dataobj) > 0
            seg = root / subject / f"{subject}_seg.nii.gz"
            num_slices = int(row.get("num_slices") or 0)
            results.append({
                "method": key,
                "label": spec.label,
                "preset": predictor.preset,
                "subject_id": sid,
                "has_lesion": has_lesion,
                "input": str((root / subject).resolve()),
                "out_dir": str((target / sid).resolve()),
                "files": files,
                "predictions_csv": str((target / "predictions.csv").resolve()),
                "decision": row.get("decision_label"),
                "subject_score": _float(row.get("subject_score")),
                "decision_rule": row.get("decision_rule"),
                "flagged_slices": _int(row.get("flagged_slices")),
                "num_slices": num_slices,
                "lesion_volume_mm3": _float(row.get("lesion_volume_mm3")),
                "true_lesion_volume_mm3": _true_volume(seg),
                "dice_3d": _dice_3d(mask, seg),
                "threshold_policy": row.get("threshold_policy"),
                "seconds": seconds,
                "seconds_per_slice": seconds / max(num_slices, 1),
                "shape": list(mask.shape),
            })
    return results


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _true_volume(seg_file: Path) -> float | None:
    """Lesion volume (mm^3) of the phantom's segmentation."""
    import nibabel as nib

    if not seg_file.is_file():
        return None
    image = nib.load(str(seg_file))
    voxel = float(abs(np.linalg.det(image.affine[:3, :3])))
    return float((np.asarray(image.dataobj) > 0).sum()) * voxel

