"""What ``anomalydiff predict`` reads: the preprocessing record of a model, and users' scans in every form.

**Preprocessing record.** A model only understands slices prepared exactly like its training store (spec C.1:
channel order, resolution, normalisation, slice rule, 2-D fitting). That recipe is the store's
``store.json`` ``prepare_config``. :class:`PreprocessRecord` holds it; it is read from (first found wins):

1. ``--preprocess PATH``: a slice store folder, its ``store.json``, or a ``preprocess.json``;
2. ``MODEL/preprocess.json`` (or ``preprocess.json`` in a part's run folder or the folder above it), written by
   :func:`write_preprocess`;
3. the store the calibration's detect / benchmark run recorded (``metrics.json`` ``info.store``), or the store a
   predict calibration was fitted on;
4. a store inside the folder given as ``MODEL`` (up to 3 levels down, e.g. ``OUT/data/store`` of
   ``anomalydiff benchmark``); several differently prepared stores there are an error;
5. the ``--calibration-store`` (it must have been prepared like the training store).

``preprocess.json`` (defined here)::

    {"format": "anomalydiff-preprocess", "version": 1,
     "prepare_config": {...PrepareConfig fields...},      # exactly store.json's prepare_config
     "channels": ["flair", "t1", "t1ce", "t2"],           # store.json's modalities (model channel order)
     "store": "/path/to/the/training/store"}              # provenance only

**Inputs** (:func:`discover_inputs`; each becomes a :class:`PredictSubject`):

- a BraTS 2020/2021/2023 subject folder (or a release folder of many), quirks as in ``data.layouts``;
- an ATLAS v2.0 BIDS subject (``sub-*/ses-*/anat/*_T1w.nii.gz``), or a tree of them;
- an MSD 4-D volume (channels named by the task's ``dataset.json`` if it is found beside or above the file,
  else the MSD Task01 order FLAIR, T1w, T1gd, T2w), or an MSD task folder;
- single-modality NIfTI files given by name (``flair=a.nii.gz t1=b.nii.gz ...``), one subject;
- one 3-D NIfTI file (1-channel models), or a folder of such files (one subject per file);
- 2-D images (PNG/JPEG/BMP/TIFF/``.npy``): one file, a folder tree of them, or a CheXpert folder / CSV
  (the ``Path`` column, filtered by the training store's view). One image = one subject.

Every load error is a :class:`~anomalydiff.data.volumes.DataInputError` naming the file: a missing modality,
the wrong number of channels, an unreadable or blank file. Inputs that load but do not look like the images
the model was trained on (negative "MR" values, a label map, no background, an implausible size, a saturated
image) raise an :class:`InputWarning` and are still processed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anomalydiff.config import from_dict, to_dict
from anomalydiff.data.geometry import volume_geometry
from anomalydiff.data.layouts import (
    BRATS_DIR_PATTERN,
    IMAGE_FORMATS,
    NIFTI_SUFFIXES,
    VOLUME_FORMATS,
    ModalityFile,
    VolumeSubject,
    canonical_modality,
    discover_atlas,
    discover_brats,
    discover_msd,
    find_chexpert_csvs,
)
from anomalydiff.data.prepare import PrepareConfig, load_volume_subject
from anomalydiff.data.preprocess import (
    PreparedSlices,
    preprocess_image,
    preprocess_volume_subject,
)
from anomalydiff.data.volumes import IMAGE_SUFFIXES, DataInputError, load_image

__all__ = [
    "MSD_DEFAULT_CHANNELS",
    "PREPROCESS_FILE",
    "InputWarning",
    "LoadedSubject",
    "PredictSubject",
    "PreprocessRecord",
    "check_intensities",
    "discover_inputs",
    "find_preprocess",
    "load_subject",
    "loaded_from_array",
    "prepare_loaded",
    "read_preprocess",
    "write_preprocess",
]

#: File name of the preprocessing record kept beside a model.
PREPROCESS_FILE = "preprocess.json"
PREPROCESS_FORMAT = "anomalydiff-preprocess"
#: MSD Task01_BrainTumour channel order (its dataset.json: FLAIR, T1w, t1gd, T2w), used without a dataset.json.
MSD_DEFAULT_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
#: Files that are never inputs (pickled checkpoints, our own outputs).
_OUTPUT_MARK = "_desc-anomaly"


class InputWarning(UserWarning):
    """An input loads but does not look like the images the model was trained on (it is still processed)."""


# ----------------------------------------------------------------------------------------------------------
# The preprocessing record
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessRecord:
    """How the model's training store was prepared: what predict must repeat on every scan.

    Attributes:
        prepare: the store's :class:`~anomalydiff.data.prepare.PrepareConfig` (format, modalities, resolution,
            normalisation, slice rule, 2-D fitting).
        channels: channel names in the model's order (canonical modality names; ``gray`` / ``red, green,
            blue`` for 2-D).
        source: where the record was read from (for messages).
        store: the training store it describes (provenance), or None.
    """

    prepare: PrepareConfig
    channels: tuple[str, ...]
    source: str = ""
    store: str | None = None

    @property
    def kind(self) -> str:
        """``"volume"`` for 3-D formats (BraTS, MSD, ATLAS), ``"image"`` for 2-D ones (CheXpert, folder)."""
        return "image" if self.prepare.format in IMAGE_FORMATS else "volume"

    @property
    def resolution(self) -> int:
        """Side of the square slices the model runs on."""
        return int(self.prepare.resolution)

    def to_json(self) -> dict[str, Any]:
        """The ``preprocess.json`` content."""
        return {
            "format": PREPROCESS_FORMAT,
            "version": 1,
            "prepare_config": to_dict(self.prepare),
            "channels": list(self.channels),
            "store": self.store,
        }

    def same_preprocessing(self, other: PreprocessRecord) -> bool:
        """True when both records prepare slices identically (provenance and split settings ignored)."""
        keep = ("format", "resolution", "normalisation", "percentile", "slice_range", "slice_threshold", "antialias",
                "brain_mask", "skull_strip", "resize_2d", "image_mode", "chexpert_view")
        return self.channels == other.channels and all(
            getattr(self.prepare, k) == getattr(other.prepare, k) for k in keep
        )


def _record_from_json(data: Mapping[str, Any], source: str, store: str | None) -> PreprocessRecord:
    config_data = data.get("prepare_config")
    if not isinstance(config_data, Mapping):
        raise DataInputError(
            source, "has no 'prepare_config': it is not a store made by `anomalydiff prepare` nor a preprocess.json; "
            "pass --preprocess with the slice store the model was trained on"
        )
    config = from_dict(PrepareConfig, dict(config_data), where=f"{source}: prepare_config")
    names = data.get("channels") if data.get("format") == PREPROCESS_FORMAT else data.get("modalities")  # store.json
    channels = tuple(names or config.channel_names())
    if tuple(config.channel_names()) != channels:
        raise DataInputError(source, f"channels {list(channels)} disagree with prepare_config ({list(config.channel_names())})")
    return PreprocessRecord(prepare=config, channels=channels, source=source, store=store)


def read_preprocess(path: str | Path) -> PreprocessRecord:
    """Read a preprocessing record from a store folder, a ``store.json`` or a ``preprocess.json``.

    Args:
        path: the file or folder.

    Returns:
        The :class:`PreprocessRecord`.

    Raises:
        DataInputError: nothing readable there, or the file lacks ``prepare_config``.
    """
    path = Path(path)
    if path.is_dir():
        for name in (PREPROCESS_FILE, "store.json"):
            if (path / name).is_file():
                return read_preprocess(path / name)
        raise DataInputError(path, f"holds neither {PREPROCESS_FILE} nor store.json; pass the slice store the model was trained on")
    if not path.is_file():
        raise DataInputError(path, "preprocessing record not found; pass the slice store the model was trained on (or its store.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataInputError(path, f"not readable JSON ({exc})") from exc
    store = data.get("store") if data.get("format") == PREPROCESS_FORMAT else str(path.parent)
    return _record_from_json(data, str(path), store)


def write_preprocess(store: str | Path, model_dir: str | Path) -> Path:
    """Save the preprocessing of a training store beside a model (``MODEL/preprocess.json``), atomically.

    Train, benchmark and demo runs can call this so that ``anomalydiff predict --model MODEL`` needs no
    ``--preprocess``.

    Args:
        store: the slice store the model was trained on (folder or ``store.json``).
        model_dir: the model folder or run folder.

    Returns:
        The written file.
    """
    record = read_preprocess(store)
    record = dataclasses.replace(record, store=str(Path(record.store).resolve()) if record.store else None)
    target = Path(model_dir) / PREPROCESS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2))
    tmp.replace(target)
    return target


def find_preprocess(candidates: Sequence[str | Path]) -> PreprocessRecord | None:
    """The first readable preprocessing record among candidate files/folders (missing ones are skipped).

    Args:
        candidates: ``preprocess.json`` / ``store.json`` files or store folders, in order of preference.

    Returns:
        The record, or None when no candidate exists.
    """
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() or (path.is_dir() and ((path / PREPROCESS_FILE).is_file() or (path / "store.json").is_file())):
            return read_preprocess(path)
    return None


# ----------------------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictSubject:
    """One subject to predict on, as found on disk.

    Attributes:
        subject_id: output name stem (unique within a run).
        kind: ``"volume"`` or ``"image"``.
        source: what the user pointed at (folder or file), for messages and ``predictions.csv``.
        volume: the 3-D subject's files (kind volume).
        image: the 2-D image file (kind image).
    """

    subject_id: str
    kind: str
    source: str
    volume: VolumeSubject | None = None
    image: Path | None = None


@dataclass
class LoadedSubject:
    """A subject's voxels in memory, validated, in the input's own voxel grid.

    Attributes:
        subject_id: output name stem.
        kind: ``"volume"`` or ``"image"``.
        arrays: 3-D: modality -> ``[X, Y, Z]`` float32 in file order, in the model's channel order;
            2-D: ``{"image": [C, h, w]}`` raw intensities.
        affine: ``[4, 4]`` voxel-to-world affine of the input (identity for 2-D).
        brain_mask: ``[X, Y, Z]`` brain mask (3-D, when the record or the subject supplies one) or None.
        sources: modality -> file it came from (empty for in-memory arrays).
        source: what the user pointed at.
        warnings: :class:`InputWarning` messages raised for this subject.
    """

    subject_id: str
    kind: str
    arrays: dict[str, np.ndarray]
    affine: np.ndarray
    brain_mask: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)
    source: str = ""
    warnings: list[str] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def safe_subject_id(text: str) -> str:
    """A file-name-safe subject ID (path separators and spaces become ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return cleaned or "subject"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _nifti_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:
        raise DataInputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-export or re-download it") from exc


def _msd_channels(path: Path) -> tuple[tuple[str, ...], Path | None]:
    """Channel names of a 4-D file: from the MSD ``dataset.json`` beside or above it, else the Task01 order."""
    for folder in (path.parent, path.parent.parent):
        meta = folder / "dataset.json"
        if meta.is_file():
            try:
                names = {int(k): v for k, v in json.loads(meta.read_text())["modality"].items()}
                return tuple(canonical_modality(names[i]) for i in sorted(names)), meta
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DataInputError(meta, f"cannot read the channel names ('modality') of this MSD dataset.json ({exc})") from exc
    return MSD_DEFAULT_CHANNELS, None


def _volume_file_subject(path: Path, channels: Sequence[str], subject_id: str | None = None) -> PredictSubject:
    """One NIfTI file as a subject: a 4-D multi-channel volume (MSD) or a single-modality 3-D volume."""
    shape = _nifti_shape(path)
    sid = safe_subject_id(subject_id or _stem(path))
    if len(shape) == 4 and shape[3] > 1:
        names, meta = _msd_channels(path)
        if shape[3] != len(names):
            where = f"its dataset.json {meta} lists {len(names)}" if meta else (
                f"without a dataset.json the MSD Task01 order {list(MSD_DEFAULT_CHANNELS)} is assumed")
            raise DataInputError(
                path, f"wrong number of channels: the 4-D volume has {shape[3]} channels but {where}; the model takes "
                f"{len(channels)} channel(s) {list(channels)}. Give each modality by name instead "
                f"(--input {channels[0]}=FILE ...)",
            )
        modalities = {name: ModalityFile(path, index) for index, name in enumerate(names)}
        volume = VolumeSubject(sid, path.parent, modalities, None, False, num_channels=shape[3])
        return PredictSubject(sid, "volume", str(path), volume=volume)
    if len(shape) not in (3, 4):
        raise DataInputError(path, f"expected a 3-D volume or a 4-D multi-channel volume, got shape {shape}")
    if len(channels) != 1:
        named = " ".join(f"--input {c}=FILE" for c in channels)
        raise DataInputError(
            path, f"wrong number of channels: this is one 3-D volume (1 channel) but the model takes {len(channels)} "
            f"channels {list(channels)}; pass the subject's folder, a 4-D file holding all channels, or each modality "
            f"by name: {named}",
        )
    volume = VolumeSubject(sid, path.parent, {channels[0]: ModalityFile(path)}, None, False)
    return PredictSubject(sid, "volume", str(path), volume=volume)


def _named_subject(items: Sequence[tuple[str, Path]], channels: Sequence[str], subject_id: str | None) -> PredictSubject:
    """Single-modality files given as ``name=path``: one subject."""
    modalities: dict[str, ModalityFile] = {}
    for name, path in items:
        try:
            canonical = canonical_modality(name)
        except ValueError as exc:
            raise DataInputError(path, f"--input {name}=...: {exc}") from exc
        if canonical in modalities:
            raise DataInputError(path, f"modality {canonical} is given twice (also {modalities[canonical].path})")
        modalities[canonical] = ModalityFile(path)
    if subject_id is None:
        stems = [_stem(p) for _, p in items]
        prefix = stems[0]
        for stem in stems[1:]:
            while not stem.startswith(prefix):
                prefix = prefix[:-1]
        subject_id = prefix.rstrip("_-. ") if len(stems) > 1 else stems[0]
        if len(subject_id) < 2:
            subject_id = "subject"
    sid = safe_subject_id(subject_id)
    folder = items[0][1].parent
    volume = VolumeSubject(sid, folder, modalities, None, False)
    return PredictSubject(sid, "volume", ", ".join(f"{n}={p}" for n, p in items), volume=volume)


def _image_subjects(root: Path) -> list[PredictSubject]:
    """Every 2-D image below ``root`` (``masks/`` folders and our own outputs excluded); one subject each."""
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and _is_image(p) and not p.name.startswith(".") and "masks" not in p.relative_to(root).parts[:-1]
        and _OUTPUT_MARK not in p.name and "_desc-overlay" not in p.name
    )  # fmt: skip
    subjects = []
    for path in files:
        relative = path.relative_to(root).with_suffix("")
        subjects.append(PredictSubject(safe_subject_id("_".join(relative.parts)), "image", str(path), image=path))
    return subjects


def _chexpert_subjects(csv_files: Sequence[Path], view: str) -> list[PredictSubject]:
    """CheXpert rows (``Path`` column) of the training store's view; subject = patient_study_view."""
    from anomalydiff.data.layouts import (
        resolve_chexpert_path,  # the same path rule as prepare
    )

    subjects = []
    for csv_path in csv_files:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "Path" not in (reader.fieldnames or []):
                raise DataInputError(csv_path, f"has no 'Path' column (columns: {reader.fieldnames}); is this a CheXpert CSV?")
            for row in reader:
                if view != "all" and "Frontal/Lateral" in row and row["Frontal/Lateral"].strip().lower() != view:
                    continue
                path = resolve_chexpert_path(csv_path.parent, row["Path"])
                parts = Path(row["Path"]).with_suffix("").parts
                sid = safe_subject_id("_".join(p for p in parts if p.startswith(("patient", "study", "view"))) or "_".join(parts))
                subjects.append(PredictSubject(sid, "image", str(path), image=path))
    return subjects


def _discover_folder(root: Path, record: PreprocessRecord, fmt: str | None) -> list[PredictSubject]:
    """Subjects of a folder: one subject or a dataset of many, in any supported layout."""
    channels = record.channels
    if record.kind == "image" or fmt in IMAGE_FORMATS:
        folders = [root, *sorted(c for c in root.iterdir() if c.is_dir())]
        has_csv = any((folder / name).is_file() for folder in folders for name in record.prepare.chexpert_csv)
        if fmt == "chexpert" or (fmt is None and has_csv):
            return _chexpert_subjects(find_chexpert_csvs(root, record.prepare.chexpert_csv), record.prepare.chexpert_view)
        return _image_subjects(root)
    found: list[VolumeSubject] = []
    formats = [fmt] if fmt is not None else list(VOLUME_FORMATS)
    for name in formats:
        if name in BRATS_DIR_PATTERN:
            found = discover_brats(root, name)
        elif name == "msd" and ((root / "dataset.json").is_file() or any(root.glob("*/dataset.json")) or fmt == "msd"):
            found = discover_msd(root)
        elif name == "atlas":
            found = discover_atlas(root)
        if found:
            break
    if found:
        return [PredictSubject(safe_subject_id(s.subject_id), "volume", str(s.folder), volume=s) for s in found]
    files = sorted(p for p in root.iterdir() if p.is_file() and _is_nifti(p) and _OUTPUT_MARK not in p.name)
    if files:
        return [_volume_file_subject(p, channels) for p in files]
    images = _image_subjects(root)
    if images:
        raise DataInputError(
            root, f"holds 2-D images but the model was trained on 3-D scans (format {record.prepare.format}); use a "
            "model trained on a 2-D store"
        )
    raise DataInputError(
        root, "no scan found: expected a BraTS / ATLAS (BIDS) / MSD subject or dataset folder, or NIfTI files "
        "(check --input; --format forces a layout)"
    )


def discover_inputs(
    inputs: Sequence[str | Path],
    record: PreprocessRecord,
    fmt: str | None = None,
    subject_id: str | None = None,
) -> list[PredictSubject]:
    """Turn ``--input`` values into subjects (module docstring lists the forms).

    Args:
        inputs: paths, or ``name=path`` items (single-modality files of ONE subject; all items must be named).
        record: the model's preprocessing record (channels, 3-D or 2-D, CheXpert view).
        fmt: force a layout (``brats2020`` ... ``folder``); None = detect.
        subject_id: output name of a single subject given as files (default: from the file names).

    Returns:
        Subjects in a fixed order (inputs in order; within a folder sorted by ID), IDs unique.

    Raises:
        DataInputError: a path is missing, holds nothing usable, or does not fit the model (wrong kind or
            channel count); the message names the file and what to do.
    """
    if not inputs:
        raise DataInputError("--input", "no input given; pass a scan, a subject folder or a folder of subjects")
    named = [str(i) for i in inputs if "=" in str(i) and not Path(str(i)).exists()]
    if named:
        if len(named) != len(inputs):
            raise DataInputError(named[0], "mix of name=path items and plain paths; give either every modality by name or plain paths")
        if record.kind != "volume":
            raise DataInputError(named[0], "name=path inputs are for 3-D modalities; this model takes 2-D images")
        items = [(text.split("=", 1)[0].strip(), Path(text.split("=", 1)[1].strip())) for text in named]
        return [_named_subject(items, record.channels, subject_id)]
    subjects: list[PredictSubject] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataInputError(path, "input not found; check --input")
        if path.is_dir():
            subjects.extend(_discover_folder(path, record, fmt))
        elif _is_nifti(path):
            if record.kind != "volume":
                raise DataInputError(path, "is a NIfTI volume but the model was trained on 2-D images")
            subjects.append(_volume_file_subject(path, record.channels, subject_id if len(inputs) == 1 else None))
        elif _is_image(path):
            if record.kind != "image":
                raise DataInputError(
                    path, f"is a 2-D image but the model was trained on 3-D scans (format {record.prepare.format})"
                )
            sid = subject_id if (subject_id and len(inputs) == 1) else _stem(path)
            subjects.append(PredictSubject(safe_subject_id(sid), "image", str(path), image=path))
        elif path.suffix.lower() == ".csv":
            subjects.extend(_chexpert_subjects([path], record.prepare.chexpert_view))
        else:
            raise DataInputError(path, "not a NIfTI volume (.nii/.nii.gz), a 2-D image, a CheXpert CSV or a folder")
    seen: dict[str, str] = {}
    for subject in subjects:
        if subject.subject_id in seen:
            raise DataInputError(
                subject.source, f"subject ID {subject.subject_id!r} also comes from {seen[subject.subject_id]}; outputs "
                "are named by subject ID, so predict the two in separate runs (different --out)"
            )
        seen[subject.subject_id] = subject.source
    if not subjects:
        raise DataInputError(", ".join(str(i) for i in inputs), "no subject found in the input")
    return subjects


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def _global_brain_mask(record: PreprocessRecord) -> Any:
    if not record.prepare.brain_mask:
        return None
    from anomalydiff.data.prepare import (
        load_brain_mask,  # the same mask prepare used (path or "mni152")
    )

    return load_brain_mask(record.prepare.brain_mask)


def load_subject(subject: PredictSubject, record: PreprocessRecord, brain: Any = None) -> LoadedSubject:
    """Load and validate a subject's files (segmentations are never read: predict needs none).

    Args:
        subject: from :func:`discover_inputs`.
        record: the model's preprocessing record (channel order, 2-D image mode).
        brain: a preloaded global brain mask (``Volume``) for ``prepare_config.brain_mask``; None = load it
            when the record names one.

    Returns:
        :class:`LoadedSubject` (warnings for odd intensities already emitted as :class:`InputWarning`).

    Raises:
        DataInputError: a missing modality, wrong channel count, unreadable / blank file, grid mismatch.
    """
    if subject.kind == "image":
        assert subject.image is not None
        image = load_image(subject.image, record.prepare.image_mode)
        loaded = LoadedSubject(subject.subject_id, "image", {"image": image}, np.eye(4), None,
                               {"image": str(subject.image)}, subject.source)
        check_intensities(loaded, record)
        return loaded
    assert subject.volume is not None
    volume = dataclasses.replace(subject.volume, seg=None, seg_expected=False)  # labels are not needed to predict
    channels = record.channels
    for name in channels:
        entry = volume.modalities.get(name)
        if entry is None or not entry.path.is_file():
            expected = entry.path if entry is not None else volume.folder
            given = sorted(n for n, e in volume.modalities.items() if e.path.is_file())
            raise DataInputError(
                expected, f"modality {name} of subject {subject.subject_id} is missing (have {given}); the model takes "
                f"{list(channels)} (the channels of its training store): add the file, or give it by name "
                f"(--input {name}=FILE)",
            )
    if brain is None:
        brain = _global_brain_mask(record)
    volumes, _, brain_volume = load_volume_subject(volume, record.prepare, tuple(channels), brain)
    reference = volumes[channels[0]]
    loaded = LoadedSubject(
        subject_id=subject.subject_id,
        kind="volume",
        arrays={name: volumes[name].data for name in channels},
        affine=np.asarray(reference.affine, dtype=np.float64),
        brain_mask=None if brain_volume is None else np.asarray(brain_volume.data),
        sources={name: str(volumes[name].path) for name in channels},
        source=subject.source,
    )
    check_intensities(loaded, record)
    return loaded


def loaded_from_array(
    data: np.ndarray | Mapping[str, np.ndarray],
    record: PreprocessRecord,
    affine: np.ndarray | None = None,
    subject_id: str = "array",
) -> LoadedSubject:
    """Wrap in-memory voxels as a :class:`LoadedSubject` (the ``Predictor.predict_array`` path).

    Args:
        data: 3-D models: ``[X, Y, Z]`` (1 channel), ``[X, Y, Z, C]`` in the model's channel order, or
            ``{modality: [X, Y, Z]}``; 2-D models: ``[h, w]``, ``[h, w, C]`` or ``[C, h, w]``.
        record: the model's preprocessing record.
        affine: ``[4, 4]`` voxel-to-world affine (3-D; default identity = RAS voxel axes, axial = last axis).
        subject_id: name used in messages and seeds.

    Returns:
        The validated subject.

    Raises:
        DataInputError: wrong shape, wrong channel count, NaN / inf values or an empty volume.
    """
    channels = record.channels
    where = f"array {subject_id}"
    if record.kind == "image":
        array = np.asarray(data, dtype=np.float32)
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
            array = np.moveaxis(array, -1, 0)
        if array.ndim != 3:
            raise DataInputError(where, f"expected a 2-D image [h, w] or [h, w, C], got shape {array.shape}")
        if array.shape[0] != len(channels):
            if len(channels) == 1:
                array = array[:3].mean(axis=0, keepdims=True)  # colour to gray, as Pillow's "L" would (approx.)
            else:
                raise DataInputError(where, f"wrong number of channels: {array.shape[0]}, the model takes {list(channels)}")
        if not np.isfinite(array).all():
            raise DataInputError(where, "the image has NaN or inf values")
        if float(array.max()) == float(array.min()):
            raise DataInputError(where, "the image is constant; it carries no content")
        loaded = LoadedSubject(subject_id, "image", {"image": array}, np.eye(4), source=where)
        check_intensities(loaded, record)
        return loaded
    if isinstance(data, Mapping):
        try:
            arrays = {canonical_modality(k): np.asarray(v, dtype=np.float32) for k, v in data.items()}
        except ValueError as exc:
            raise DataInputError(where, str(exc)) from exc
        missing = [c for c in channels if c not in arrays]
        if missing:
            raise DataInputError(where, f"modality {missing} missing; the model takes {list(channels)}")
        arrays = {c: arrays[c] for c in channels}
    else:
        array = np.asarray(data, dtype=np.float32)
        if array.ndim == 3 and len(channels) == 1:
            arrays = {channels[0]: array}
        elif array.ndim == 4 and array.shape[3] == len(channels):
            arrays = {c: np.ascontiguousarray(array[..., i]) for i, c in enumerate(channels)}
        else:
            raise DataInputError(
                where, f"wrong number of channels: shape {array.shape}, the model takes {len(channels)} channel(s) "
                f"{list(channels)} as [X, Y, Z] (1 channel) or [X, Y, Z, C]"
            )
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise DataInputError(where, f"every modality must be one [X, Y, Z] volume of the same shape, got {sorted(shapes)}")
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise DataInputError(where, f"modality {name} has NaN or inf voxels")
        if not np.any(array):
            raise DataInputError(where, f"modality {name} is all zero")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise DataInputError(where, "affine must be a finite, invertible [4, 4] voxel-to-world matrix")
    loaded = LoadedSubject(subject_id, "volume", arrays, affine, source=where)
    check_intensities(loaded, record)
    return loaded


def check_intensities(loaded: LoadedSubject, record: PreprocessRecord, emit: bool = True) -> list[str]:
    """Warn when an input does not look like the brain / chest images the model was trained on.

    3-D checks (per modality): negative values (MR magnitude is non-negative: CT in HU or a phase image?),
    at most 8 distinct values (a label map?), no zero background (the model saw skull-stripped brains with
    a zero background unless the store used a brain mask), and a foreground extent outside 60-300 mm (not a
    human brain at this voxel size?). 2-D checks: negative values, and more than 30 % of the pixels at the
    maximum (saturated, or not a radiograph).

    Args:
        loaded: the subject.
        record: the model's preprocessing record.
        emit: also raise each message as an :class:`InputWarning`.

    Returns:
        The messages (also stored in ``loaded.warnings``).
    """
    messages: list[str] = []
    name_of = loaded.sources or {}
    if loaded.kind == "image":
        image = loaded.arrays["image"]
        where = name_of.get("image", loaded.source)
        if float(image.min()) < 0:
            messages.append(f"{where}: negative pixel values (min {float(image.min()):.3g}); a radiograph / photo has none")
        if float(np.mean(image >= image.max())) > 0.3:
            messages.append(
                f"{where}: {100 * float(np.mean(image >= image.max())):.0f}% of the pixels sit at the maximum value; "
                "the image is saturated or not a chest radiograph like the training images"
            )
    else:
        voxel_mm = np.sqrt((np.asarray(loaded.affine)[:3, :3] ** 2).sum(axis=0))
        for name, array in loaded.arrays.items():
            where = name_of.get(name, loaded.source) + (f" ({name})" if name not in name_of else "")
            nonzero = array[array != 0]
            negative = float(np.mean(nonzero < 0)) if nonzero.size else 0.0
            if negative > 0.01:
                messages.append(
                    f"{where}: {100 * negative:.0f}% of the non-zero voxels are negative (min {float(array.min()):.4g}); "
                    "MR magnitude images are non-negative: is this CT (Hounsfield units) or a phase image? The model "
                    "expects brain MRI like its training store"
                )
            sample = nonzero[:: max(1, nonzero.size // 200_000)]
            if nonzero.size and np.unique(sample).size <= 8:
                messages.append(f"{where}: only {np.unique(sample).size} distinct values: this looks like a label map or mask, not an image")
            foreground = float(np.mean(array != 0))
            if foreground > 0.95 and not record.prepare.brain_mask:
                messages.append(
                    f"{where}: {100 * foreground:.0f}% of the voxels are non-zero (no background); the model was trained "
                    "on skull-stripped brains with a zero background: skull-strip the scan first"
                )
            if nonzero.size:
                idx = np.nonzero(array)
                extent = np.array([(int(i.max()) - int(i.min()) + 1) for i in idx], dtype=np.float64) * voxel_mm
                if extent.max() < 60.0 or extent.max() > 300.0:
                    messages.append(
                        f"{where}: the non-zero region spans {np.round(extent).astype(int).tolist()} mm; a human brain "
                        "spans ~120-200 mm: check the voxel size in the header"
                    )
    loaded.warnings.extend(messages)
    if emit:
        for message in messages:
            warnings.warn(message, InputWarning, stacklevel=3)
    return messages


def prepare_loaded(loaded: LoadedSubject, record: PreprocessRecord) -> tuple[PreparedSlices, dict[str, Any]]:
    """Preprocess a loaded subject exactly as ``anomalydiff prepare`` prepared the training store.

    Args:
        loaded: the subject.
        record: the model's preprocessing record.

    Returns:
        ``(slices, subject_info)``: ``slices.images`` ``[S, C, R, R]`` in [-1, 1], ``slices.brain`` ``[S, R, R]``,
        canonical ``slice_indices``; ``subject_info`` is the geometry record (as in a store's ``subjects.jsonl``)
        that :func:`~anomalydiff.data.geometry.slices_to_volume` / ``slice_to_image`` map results back with.
    """
    config = record.prepare
    if loaded.kind == "image":
        image, _, body, fit = preprocess_image(
            loaded.arrays["image"], None, resolution=config.resolution, resize_mode=config.resize_2d, antialias=config.antialias
        )
        slices = PreparedSlices(images=image[None], masks=None, brain=body[None], slice_indices=[0], labels=[-1], info={})
        info = {"kind": "image", "format": config.format, "images": [{**fit, "source": loaded.sources.get("image", loaded.source)}]}
        return slices, info
    names = list(record.channels)
    reference = loaded.arrays[names[0]]
    prepared = preprocess_volume_subject(
        {name: loaded.arrays[name] for name in names},
        loaded.affine,
        None,
        loaded.brain_mask,
        **config.volume_options(),
        sources={name: loaded.sources.get(name, loaded.source) for name in names},
    )
    info = volume_geometry(loaded.affine, reference.shape, tuple(prepared.info["slice_range"]), config.resolution)
    info.update({
        "format": config.format,
        "source_files": dict(loaded.sources),
        "scales": prepared.info["scales"],
    })  # fmt: skip
    return prepared, info
