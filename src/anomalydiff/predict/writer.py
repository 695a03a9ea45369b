"""Output files of ``anomalydiff predict`` (BIDS-derivatives style names), written so that a killed run leaves
nothing half-written and a rerun can skip finished subjects.

Layout of ``OUT/``::

    dataset_description.json            BIDS derivative description (what made the files)
    predict.json                        run record: fingerprint (models' sha256, method, config, calibration
                                        digest, preprocessing), sources, command; a resumed run must match it
    calibration.json                    the calibration used (loadable again with --calibration)
    predictions.csv                     one row per subject (PREDICTION_COLUMNS), written last
    <subject>/
        <subject>_desc-anomalymap.nii.gz    float32 anomaly map on the input's grid (shape, affine, header)
        <subject>_desc-anomalymask.nii.gz   uint8 0/1 mask on the input's grid
        <subject>_desc-slices.csv           one row per scored slice (SLICE_COLUMNS + the method's scalar extras)
        <subject>_desc-overlay.png          panel: input slices with map and mask outline
        <subject>_desc-summary.json         subject decision, score, volumes, files: the DONE marker, written last
    (2-D inputs: <subject>_desc-anomalymap.png (16-bit, value = map / map_png_max * 65535) and
     <subject>_desc-anomalymask.png (0/255), both of the input image's size, instead of the NIfTI files)

Atomicity: a subject's files are written into ``OUT/.partial/<subject>/`` and the folder is moved to
``OUT/<subject>/`` with one ``os.replace`` once every file (the summary last) is complete; JSON / CSV files at
the top are written to a temporary name and replaced. A killed run leaves at most ``OUT/.partial/``, which the
next run removes. A subject counts as done when ``OUT/<subject>/<subject>_desc-summary.json`` exists.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalydiff.data.geometry import save_volume_nifti, to_canonical

__all__ = [
    "PARTIAL_DIR",
    "PREDICTION_COLUMNS",
    "RUN_RECORD",
    "SLICE_COLUMNS",
    "OutputExistsError",
    "atomic_write_json",
    "atomic_write_text",
    "is_done",
    "open_output",
    "output_path",
    "read_done_row",
    "write_overlay",
    "write_predictions_csv",
    "write_subject",
]

PARTIAL_DIR = ".partial"
RUN_RECORD = "predict.json"
RUN_FORMAT = "anomalydiff-predict-run"
PREDICTIONS_CSV = "predictions.csv"
#: Columns of predictions.csv (one row per subject).
PREDICTION_COLUMNS: tuple[str, ...] = (
    "subject_id", "kind", "input", "method", "preset", "num_slices", "flagged_slices", "flagged_share",
    "max_image_score", "subject_score", "decision", "decision_label", "lesion_voxels", "lesion_volume_mm3",
    "voxel_volume_mm3", "threshold_policy", "folder", "warnings", "error",
)  # fmt: skip
#: Leading columns of <subject>_desc-slices.csv (method-specific scalar extras follow, e.g. AnoFPDM's ``cos``).
SLICE_COLUMNS: tuple[str, ...] = (
    "subject_id", "slice_index", "file_axis", "file_index", "image_score", "decision", "lesion_pixels",
    "lesion_voxels", "lesion_volume_mm3",
)  # fmt: skip


class OutputExistsError(FileExistsError):
    """The output folder already holds results that this run must not silently replace."""


# ----------------------------------------------------------------------------------------------------------
# Atomic small files
# ----------------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then ``os.replace`` it.

    Args:
        path: the target file.
        text: its content.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """:func:`atomic_write_text` of strict JSON (NaN / inf become null)."""
    return atomic_write_text(path, json.dumps(_json_safe(data), indent=2, default=str))


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c, "")) for c in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    if value is None:
        return ""
    return value


# ----------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------
def output_path(out: str | Path, subject_id: str, desc: str, suffix: str) -> Path:
    """``OUT/<subject>/<subject>_desc-<desc><suffix>`` (BIDS-derivatives style)."""
    return Path(out) / subject_id / f"{subject_id}_desc-{desc}{suffix}"


def is_done(out: str | Path, subject_id: str) -> bool:
    """True when the subject's summary (the done marker, written last) exists."""
    return output_path(out, subject_id, "summary", ".json").is_file()


def read_done_row(out: str | Path, subject_id: str) -> dict[str, Any]:
    """The ``predictions.csv`` row of a finished subject (from its summary JSON)."""
    data = json.loads(output_path(out, subject_id, "summary", ".json").read_text())
    return {key: ("" if value is None else value) for key, value in data.items() if not isinstance(value, (dict, list))}


def _clean_partials(out: Path) -> None:
    partial = out / PARTIAL_DIR
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)
    for stale in out.glob(".*.tmp*"):
        if stale.is_file():
            stale.unlink()


def _fingerprint_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def open_output(
    out: str | Path,
    fingerprint: Mapping[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
    record: Mapping[str, Any] | None = None,
) -> str:
    """Check and set up the output folder (call on one process only).

    Rules: a new or empty folder starts a run. A folder holding an unfinished run with the same fingerprint is
    continued (finished subjects are skipped). A finished run of the same fingerprint is refused unless
    ``resume`` (predict only subjects not done yet) or ``overwrite`` (redo every subject). Results of other
    settings, or a non-empty folder of something else, are refused unless ``overwrite``.

    Args:
        out: the output folder.
        fingerprint: :meth:`Predictor.fingerprint`.
        overwrite: redo subjects and replace another run's outputs (files of other tools are left alone).
        resume: continue a finished run of the same settings (new inputs only).
        record: extra facts for ``predict.json`` (sources, command, world size).

    Returns:
        ``"new"``, ``"continue"`` or ``"overwrite"`` (then done markers are ignored).

    Raises:
        OutputExistsError: the folder holds results this run may not replace (the message says what to pass).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; choose a folder")
    record_file = out / RUN_RECORD
    mode = "new"
    if record_file.is_file():
        try:
            previous = json.loads(record_file.read_text())
        except ValueError:
            previous = {}
        same = previous.get("fingerprint") == _json_safe(dict(fingerprint))
        finished = (out / PREDICTIONS_CSV).is_file()
        done = sum(1 for p in out.glob("*/*_desc-summary.json"))
        if overwrite:
            mode = "overwrite"
        elif same and (not finished or resume):
            mode = "continue"
        elif same:
            raise OutputExistsError(
                f"{out} already holds the finished predictions of this model and method ({done} subject(s), "
                f"{PREDICTIONS_CSV}); pass --overwrite to redo them, --resume to predict only inputs not done yet, "
                "or choose another --out"
            )
        else:
            changed = _fingerprint_difference(previous.get("fingerprint") or {}, _json_safe(dict(fingerprint)))
            raise OutputExistsError(
                f"{out} holds predictions ({done} subject(s)) made with other settings (differ in: {', '.join(changed)}); "
                "choose another --out, or pass --overwrite to replace them"
            )
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{out} is not empty and holds no predict run ({RUN_RECORD} missing); choose an empty --out, or pass "
                "--overwrite to write into it (other files are left alone)"
            )
        mode = "overwrite"
    out.mkdir(parents=True, exist_ok=True)
    _clean_partials(out)
    if (out / PREDICTIONS_CSV).exists():
        (out / PREDICTIONS_CSV).unlink()  # rewritten at the end: its presence means "finished"
    from anomalydiff import __version__ as version

    atomic_write_json(out / "dataset_description.json", {
        "Name": "anomalydiff predictions",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "anomalydiff", "Version": version, "Description": f"anomaly maps ({fingerprint.get('preset')})"}],
    })  # fmt: skip
    atomic_write_json(record_file, {
        "format": RUN_FORMAT,
        "version": 1,
        "fingerprint": dict(fingerprint),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode,
        "finished": False,
        **dict(record or {}),
    })  # fmt: skip
    return mode


def finish_run(out: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``predictions.csv`` and mark the run finished in ``predict.json`` (call on one process only).

    Args:
        out: the output folder.
        rows: one row per subject, in input order.

    Returns:
        The ``predictions.csv`` path.
    """
    out = Path(out)
    path = write_predictions_csv(out, rows)
    record_file = out / RUN_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        record.update({"finished": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "subjects": len(rows),
                       "errors": sum(1 for r in rows if r.get("error"))})
        atomic_write_json(record_file, record)
    return path


def write_predictions_csv(out: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``OUT/predictions.csv`` (PREDICTION_COLUMNS), atomically."""
    return atomic_write_text(Path(out) / PREDICTIONS_CSV, _csv_text(rows, PREDICTION_COLUMNS))


# ----------------------------------------------------------------------------------------------------------
# One subject
# ----------------------------------------------------------------------------------------------------------
def _save_png_gray(array: np.ndarray, path: Path, bits: int) -> None:
    from PIL import Image

    dtype = np.uint16 if bits == 16 else np.uint8  # Pillow picks mode I;16 / L from the dtype
    Image.fromarray(np.ascontiguousarray(array.astype(dtype))).save(path)


def write_subject(out: str | Path, prediction: Any, overlay: bool = True) -> dict[str, Any]:
    """Write one subject's files (module docstring) and return its ``predictions.csv`` row.

    Args:
        out: the output folder (set up by :func:`open_output`).
        prediction: a :class:`~anomalydiff.predict.predictor.Prediction`.
        overlay: also draw the PNG panel.

    Returns:
        The row (the summary's scalar entries plus ``folder``).
    """
    out = Path(out)
    sid = prediction.subject_id
    staging = out / PARTIAL_DIR / sid
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    files: dict[str, str] = {}

    def name(desc: str, suffix: str) -> Path:
        path = output_path(staging.parent, sid, desc, suffix)
        files[desc] = path.name
        return path

    summary = dict(prediction.summary)
    if prediction.kind == "volume":
        # 1. map and mask on the input's own grid, with its affine and header (geometry.save_volume_nifti)
        save_volume_nifti(prediction.anomaly_map.astype(np.float32), prediction.subject_info, name("anomalymap", ".nii.gz"))
        save_volume_nifti(prediction.mask.astype(bool), prediction.subject_info, name("anomalymask", ".nii.gz"))
    else:
        # 1'. 2-D: 16-bit map PNG and 0/255 mask PNG of the input image's size
        peak = float(prediction.anomaly_map.max())
        scale = peak if peak > 0 else 1.0
        scaled = np.clip(prediction.anomaly_map / scale, 0.0, 1.0) * 65535.0
        _save_png_gray(np.rint(scaled), name("anomalymap", ".png"), 16)
        _save_png_gray(prediction.mask.astype(np.uint8) * 255, name("anomalymask", ".png"), 8)
        summary["map_png_max"] = scale
    # 2. per-slice table
    columns = list(SLICE_COLUMNS) + sorted({k for row in prediction.slices for k in row} - set(SLICE_COLUMNS))
    (staging / f"{sid}_desc-slices.csv").write_text(_csv_text(prediction.slices, columns))
    files["slices"] = f"{sid}_desc-slices.csv"
    # 3. overlay panel
    if overlay:
        write_overlay(prediction, name("overlay", ".png"))
    # 4. the summary: written last inside the staging folder, then the folder moves into place at once
    summary["folder"] = sid
    summary["files"] = files
    summary["error"] = ""
    summary_file = staging / f"{sid}_desc-summary.json"
    summary_file.write_text(json.dumps(_json_safe(summary), indent=2, default=str))
    with open(summary_file, "rb") as handle:
        os.fsync(handle.fileno())
    final = out / sid
    if final.exists():
        retired = out / PARTIAL_DIR / f"{sid}.old"
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    return read_done_row(out, sid)


# ----------------------------------------------------------------------------------------------------------
# Overlay panel
# ----------------------------------------------------------------------------------------------------------
def _display(image: np.ndarray) -> np.ndarray:
    """Scale an image to [0, 1] by its 1st-99.5th percentiles (for display only)."""
    values = image[np.isfinite(image)]
    if values.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    low, high = np.percentile(values, [1.0, 99.5])
    if high <= low:
        high = low + 1.0
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def write_overlay(prediction: Any, path: str | Path, max_slices: int = 4) -> Path:
    """PNG panel of a prediction: input (first channel) above input + anomaly map + mask outline.

    3-D: up to ``max_slices`` axial slices of the input's own grid, shown in canonical RAS orientation (anterior
    up, the subject's right on the right), chosen by lesion volume (else by map maximum). 2-D: the image, its map,
    and the mask outline.

    Args:
        prediction: a :class:`~anomalydiff.predict.predictor.Prediction` (with ``loaded``).
        path: the PNG file.
        max_slices: slices shown for a volume.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    summary = prediction.summary
    loaded = prediction.loaded
    if prediction.kind == "image":
        image = loaded.arrays["image"] if loaded is not None else prediction.slice_images[0][None]
        base = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]
        panels = [(base, None, None, "input"), (None, prediction.anomaly_map, None, "anomaly map"),
                  (base, None, prediction.mask, "mask")]
        figure, axes = plt.subplots(1, 3, figsize=(9, 3.3), squeeze=False)
        for ax, (img, amap, mask, title) in zip(axes[0], panels):
            if img is not None:
                ax.imshow(_display(img), cmap="gray" if img.ndim == 2 else None)
            if amap is not None:
                ax.imshow(amap, cmap="inferno")
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    else:
        info = prediction.subject_info
        orientation = info["orientation"]
        first = next(iter(loaded.arrays)) if loaded is not None else None
        volume = to_canonical(loaded.arrays[first], orientation) if first is not None else None
        amap = to_canonical(prediction.anomaly_map, orientation)
        mask = to_canonical(prediction.mask, orientation)
        indices = list(prediction.slice_indices)
        lesion = {k: int(mask[:, :, k].sum()) for k in indices}
        # slices with the most lesion voxels first, then evenly spaced scored slices
        chosen = [k for k in sorted(indices, key=lambda k: -lesion[k]) if lesion[k] > 0][:max_slices]
        spread = [indices[round(i)] for i in np.linspace(0, len(indices) - 1, max_slices + 2)[1:-1]] if indices else []
        for k in spread:
            if len(chosen) < min(max_slices, len(indices)) and k not in chosen:
                chosen.append(k)
        chosen = sorted(chosen)
        vmax = float(np.percentile(amap[amap > 0], 99.5)) if np.any(amap > 0) else 1.0
        figure, axes = plt.subplots(2, max(1, len(chosen)), figsize=(2.6 * max(1, len(chosen)), 5.4), squeeze=False)
        for column, k in enumerate(chosen):
            base = np.rot90(_display(volume[:, :, k])) if volume is not None else None
            for row in (0, 1):
                ax = axes[row][column]
                if base is not None:
                    ax.imshow(base, cmap="gray")
                if row == 1:
                    slice_map = np.rot90(amap[:, :, k])
                    hidden = slice_map < 0.05 * vmax  # show the map where it matters, over the tissue
                    if volume is not None:
                        hidden |= np.rot90(volume[:, :, k]) == 0
                    ax.imshow(np.ma.masked_where(hidden, slice_map), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax)
                    slice_mask = np.rot90(mask[:, :, k])
                    if slice_mask.any():
                        ax.contour(slice_mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
                ax.set_title(f"axial {k}" if row == 0 else f"{lesion[k]} lesion voxels", fontsize=8)
                ax.axis("off")
    figure.suptitle(
        f"{prediction.subject_id}: {summary.get('decision_label')} (score {summary.get('subject_score', 0):.3g}; "
        f"{summary.get('preset')})",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)
