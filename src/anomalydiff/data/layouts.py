"""Discovery of subjects in the published layouts of each dataset (data.md), quirks included.

Formats (``--format``):

============ =====================================================================================
brats2020    ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii`` (``.nii`` or
             ``.nii.gz``); case 355's seg is ``W39_1998.09.19_Segm.nii``; ``BraTS20_Validation_*``
             have no seg. Labels 0, 1, 2, 4.
brats2021    ``BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``. Labels 0, 1, 2, 4.
brats2023    ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``. Labels 0-3.
msd          ``Task01_BrainTumour/{dataset.json,imagesTr/BRATS_001.nii.gz (4-D),labelsTr/...,imagesTs/...}``;
             channels and labels are read from ``dataset.json``.
atlas        ATLAS v2.0 BIDS: ``Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-
             MNI152NLin2009aSym_T1w.nii.gz`` + ``..._label-L_desc-T1lesion_mask.nii.gz``; ``Testing/``
             without masks. Labels 0, 1.
chexpert     ``CheXpert-v1.0-small/{train.csv,valid.csv,train/patientXXXXX/studyN/viewN_frontal.jpg}``; the
             CSV ``Path`` column carries the ``CheXpert-v1.0-small/`` prefix. Subject = patient.
folder       ``healthy/*.png|jpg|...``, ``unhealthy/*``, optional ``masks/<same stem>.*``.
============ =====================================================================================

Modalities are named canonically across BraTS years and MSD (``flair``, ``t1``, ``t1ce``, ``t2``), so
``--modalities flair,t1,t1ce,t2`` (the spec C.1 order) means the same for every format; ATLAS has ``t1``;
2-D formats have ``gray`` (or ``red, green, blue`` with ``image_mode=RGB``).

Subjects whose seg is not part of the release (BraTS ``Validation`` folders / case names, ATLAS
``Testing/``) are discovered with ``seg_expected=False``: usable, but without pixel labels (image label -1).
A training case without its seg is an error (or, with ``missing_seg="unlabelled"``, treated the same way).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from anomalydiff.data.volumes import IMAGE_SUFFIXES, DataInputError
from anomalydiff.labels import HEALTHY, UNHEALTHY

FORMATS = ("brats2020", "brats2021", "brats2023", "msd", "atlas", "chexpert", "folder")
VOLUME_FORMATS = ("brats2020", "brats2021", "brats2023", "msd", "atlas")
IMAGE_FORMATS = ("chexpert", "folder")

# Canonical modality names: every spelling used by BraTS 2020/2021, BraTS 2023 and MSD maps to one name.
CANONICAL_MODALITY = {
    "flair": "flair", "t2f": "flair", "t2-flair": "flair", "t2flair": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1-gd": "t1ce",
    "t2": "t2", "t2w": "t2",
}  # fmt: skip

# Per format: file suffix in the release -> canonical modality.
BRATS_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2020": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "brats2021": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "brats2023": {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"},
}
BRATS_DIR_PATTERN = {
    "brats2020": re.compile(r"^BraTS20_(Training|Validation)_\d+$"),
    "brats2021": re.compile(r"^BraTS2021_\d+$"),
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"),
}
BRATS_SEPARATOR = {"brats2020": "_", "brats2021": "_", "brats2023": "-"}
SEG_LABELS = {"brats2020": (0, 1, 2, 4), "brats2021": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3), "msd": (0, 1, 2, 3), "atlas": (0, 1)}
DEFAULT_MODALITIES = {
    "brats2020": ("flair", "t1", "t1ce", "t2"),  # spec C.1 order
    "brats2021": ("flair", "t1", "t1ce", "t2"),
    "brats2023": ("flair", "t1", "t1ce", "t2"),
    "msd": ("flair", "t1", "t1ce", "t2"),
    "atlas": ("t1",),  # spec C.1: ATLAS is T1w only
    "chexpert": ("gray",),
    "folder": ("gray",),
}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ATLAS_T1_SUFFIX = "_T1w"
ATLAS_LESION_SUFFIX = "_label-L_desc-T1lesion_mask"
ATLAS_BRAIN_SUFFIX = "_desc-brain_mask"
UNLABELLED_SPLIT = re.compile(r"validation|testing", re.IGNORECASE)
CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


@dataclass(frozen=True)
class ModalityFile:
    """Where one modality of a subject lives.

    Attributes:
        path: the NIfTI file (may not exist: a missing modality is reported when the subject is loaded).
        channel: index along the 4th axis for 4-D files (MSD); ``None`` for a 3-D file.
    """

    path: Path
    channel: int | None = None


@dataclass(frozen=True)
class VolumeSubject:
    """One 3-D subject as found on disk.

    Attributes:
        subject_id: identifier used in the store and the split files.
        folder: the subject's folder (or the dataset folder for MSD).
        modalities: canonical modality name -> file; requested modalities absent here are missing.
        seg: the segmentation / lesion-mask file, or ``None``.
        seg_expected: ``True`` for training cases (a missing seg is then an error).
        expected_seg: the file name the seg should have had (for the error message), or ``None``.
        brain_mask: a per-subject brain-mask file, or ``None``.
        allowed_labels: segmentation labels this format uses.
        num_channels: length of the 4th axis of 4-D image files (MSD, from ``dataset.json``); ``None`` for 3-D.
    """

    subject_id: str
    folder: Path
    modalities: Mapping[str, ModalityFile]
    seg: Path | None
    seg_expected: bool
    expected_seg: Path | None = None
    brain_mask: Path | None = None
    allowed_labels: tuple[int, ...] = (0, 1)
    num_channels: int | None = None


@dataclass(frozen=True)
class ImageItem:
    """One 2-D image of a subject.

    Attributes:
        path: the image file.
        label: image-level label (``HEALTHY`` / ``UNHEALTHY``).
        mask: pixel-mask file, or ``None``.
        origin: where the item came from (e.g. ``train.csv row 12``) for messages.
    """

    path: Path
    label: int
    mask: Path | None = None
    origin: str = ""


@dataclass(frozen=True)
class ImageSubject:
    """One subject of a 2-D dataset: its images (slice_index = position in ``items``).

    Attributes:
        subject_id: identifier (CheXpert patient, folder file stem or regex group).
        items: the images, in a fixed order.
        has_masks: whether pixel masks exist for this subject (healthy images without a file get empty ones).
    """

    subject_id: str
    items: tuple[ImageItem, ...]
    has_masks: bool = False


@dataclass
class Discovery:
    """Result of scanning a dataset folder.

    Attributes:
        subjects: the subjects found, sorted by ID.
        notes: counts worth recording in ``store.json`` (e.g. CheXpert rows dropped per reason).
    """

    subjects: list[VolumeSubject] | list[ImageSubject]
    notes: dict[str, Any] = field(default_factory=dict)


def canonical_modality(name: str) -> str:
    """Map a modality name as spelled by any supported release to its canonical name."""
    key = name.strip().lower()
    if key not in CANONICAL_MODALITY:
        raise ValueError(f"unknown modality {name!r}; known names: {sorted(set(CANONICAL_MODALITY.values()))}")
    return CANONICAL_MODALITY[key]


def _find_dirs(root: Path, pattern: re.Pattern[str], max_depth: int = 4) -> list[Path]:
    """Folders below ``root`` (``root`` included) whose name matches ``pattern``, not descending into them."""
    found: list[Path] = []
    if pattern.match(root.name):
        return [root]
    base_depth = len(root.parts)
    for current, dirs, _files in os.walk(root):
        here = Path(current)
        keep = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            if pattern.match(name):
                found.append(here / name)
            elif len(here.parts) - base_depth < max_depth:
                keep.append(name)
        dirs[:] = keep
    return sorted(found)


def _nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii`` (whichever exists), else ``None``."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _in_unlabelled_split(path: Path, root: Path) -> bool:
    """True if ``path`` lies in a Validation / Testing part of a release (relative to ``root``, root included)."""
    try:
        parts = (root.name, *path.relative_to(root).parts)
    except ValueError:
        parts = path.parts
    return any(UNLABELLED_SPLIT.search(part) for part in parts)


def _check_unique(subject_ids: Iterable[str], where: Path) -> None:
    counts = Counter(subject_ids)
    duplicates = sorted(s for s, n in counts.items() if n > 1)
    if duplicates:
        raise DataInputError(
            where, f"subject ID(s) {duplicates[:5]} found more than once; point --root at one copy of the dataset"
        )


def discover_brats(root: Path, fmt: str) -> list[VolumeSubject]:
    """BraTS 2020 / 2021 / 2023 subject folders below ``root``.

    Args:
        root: the release folder (e.g. ``MICCAI_BraTS2020_TrainingData``), a parent of it, or one subject folder.
        fmt: ``brats2020``, ``brats2021`` or ``brats2023``.
    """
    separator = BRATS_SEPARATOR[fmt]
    subjects = []
    for folder in _find_dirs(root, BRATS_DIR_PATTERN[fmt]):
        case = folder.name
        modalities = {}
        for suffix, canonical in BRATS_SUFFIXES[fmt].items():
            found = _nifti(folder, f"{case}{separator}{suffix}")
            # a missing modality keeps its expected name, reported when the subject is loaded
            modalities[canonical] = ModalityFile(found or folder / f"{case}{separator}{suffix}.nii.gz")
        seg = _nifti(folder, f"{case}{separator}seg")
        if seg is None:
            # BraTS 2020 defect: case 355's seg is named W39_1998.09.19_Segm.nii; accept any *Segm.nii[.gz]
            odd = sorted(p for p in folder.iterdir() if re.search(r"segm?\.nii(\.gz)?$", p.name, re.IGNORECASE))
            seg = odd[0] if len(odd) == 1 else None
        unlabelled = _in_unlabelled_split(folder, root)
        subjects.append(
            VolumeSubject(
                subject_id=case,
                folder=folder,
                modalities=modalities,
                seg=seg,
                seg_expected=not unlabelled,
                expected_seg=folder / f"{case}{separator}seg.nii.gz",
                allowed_labels=SEG_LABELS[fmt],
            )
        )
    return subjects


def find_msd_task(root: Path) -> Path:
    """The MSD task folder (the one holding ``dataset.json``): ``root`` itself or a child of it."""
    if (root / "dataset.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.glob("*/dataset.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataInputError(root / "dataset.json", "not found; point --root at the MSD task folder (e.g. Task01_BrainTumour)")
    raise DataInputError(root, f"several MSD tasks found ({[c.name for c in candidates]}); point --root at one of them")


def discover_msd(root: Path) -> list[VolumeSubject]:
    """MSD Task01_BrainTumour subjects, from its ``dataset.json`` (4-D images; channel names from the file)."""
    task = find_msd_task(root)
    meta_file = task / "dataset.json"
    try:
        meta = json.loads(meta_file.read_text())
        modality_names = {int(k): v for k, v in meta["modality"].items()}
        labels = tuple(sorted(int(k) for k in meta.get("labels", {"0": "", "1": "", "2": "", "3": ""})))
        training = list(meta.get("training", []))
        testing = list(meta.get("test", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataInputError(
            meta_file, f"not a valid MSD dataset.json ({type(exc).__name__}: {exc}); it needs 'modality', 'labels' and 'training'"
        ) from exc
    channels: dict[str, int] = {}
    for index, name in modality_names.items():
        try:
            channels[canonical_modality(name)] = index
        except ValueError as exc:
            raise DataInputError(meta_file, f"modality {index} {name!r} has no canonical name ({exc})") from exc
    num_channels = len(modality_names)

    def resolve(relative: str) -> Path:
        return (task / relative).resolve() if not Path(relative).is_absolute() else Path(relative)

    subjects = []
    entries = [(e.get("image"), e.get("label"), True) if isinstance(e, dict) else (None, None, True) for e in training]
    entries += [(e if isinstance(e, str) else e.get("image"), None, False) for e in testing]
    for image_rel, label_rel, expected in entries:
        if not image_rel:
            raise DataInputError(meta_file, "an entry of 'training'/'test' has no image path")
        image = resolve(image_rel)
        subject_id = image.name.split(".nii")[0]
        modalities = {name: ModalityFile(image, channel) for name, channel in channels.items()}
        seg = resolve(label_rel) if label_rel else None
        subjects.append(
            VolumeSubject(
                subject_id=subject_id,
                folder=image.parent,
                modalities=modalities,
                seg=seg if seg is not None and seg.is_file() else None,
                seg_expected=expected,
                expected_seg=seg,
                allowed_labels=labels,
                num_channels=num_channels,
            )
        )
    if not subjects:
        raise DataInputError(meta_file, "lists no 'training' or 'test' images")
    return subjects


def discover_atlas(root: Path) -> list[VolumeSubject]:
    """ATLAS v2.0 BIDS subjects (``Training/`` with lesion masks, ``Testing/`` without)."""
    subjects = []
    t1_files = sorted(
        p for p in root.rglob(f"sub-*{ATLAS_T1_SUFFIX}.nii*")
        if p.parent.name == "anat" and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES)
    )  # fmt: skip
    ids: Counter[str] = Counter(p.name.split("_")[0] for p in t1_files)
    for t1 in t1_files:
        prefix = t1.name.split(ATLAS_T1_SUFFIX)[0]
        entities = prefix.split("_")
        subject_id = entities[0] if ids[entities[0]] == 1 else "_".join(e for e in entities if not e.startswith("space-"))
        lesion = _nifti(t1.parent, prefix + ATLAS_LESION_SUFFIX)
        brain = _nifti(t1.parent, prefix + ATLAS_BRAIN_SUFFIX)
        subjects.append(
            VolumeSubject(
                subject_id=subject_id,
                folder=t1.parent,
                modalities={"t1": ModalityFile(t1)},
                seg=lesion,
                seg_expected=not _in_unlabelled_split(t1, root),
                expected_seg=t1.parent / f"{prefix}{ATLAS_LESION_SUFFIX}.nii.gz",
                brain_mask=brain,
                allowed_labels=SEG_LABELS["atlas"],
            )
        )
    return subjects


def _float_or_none(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    return float(text)


def find_chexpert_csvs(root: Path, names: Sequence[str]) -> list[Path]:
    """The CheXpert CSV files named ``names`` in ``root`` or in its one child holding them."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else [root]:
        found = [folder / n for n in names if (folder / n).is_file()]
        if found:
            return found
    raise DataInputError(root, f"no CheXpert CSV ({', '.join(names)}) found here or one level down; point --root at CheXpert-v1.0-small")


def resolve_chexpert_path(csv_dir: Path, relative: str) -> Path:
    """CSV ``Path`` values include the release folder (``CheXpert-v1.0-small/train/...``): resolve against the CSV's folder."""
    parts = Path(relative).parts
    if parts and parts[0] == csv_dir.name:
        return csv_dir.joinpath(*parts[1:])
    if (csv_dir / relative).exists():
        return csv_dir / relative
    return csv_dir.parent / relative


def discover_chexpert(
    root: Path,
    csv_names: Sequence[str] = ("train.csv", "valid.csv"),
    finding: str = "Pleural Effusion",
    uncertain: str = "ignore",
    view: str = "frontal",
) -> Discovery:
    """CheXpert images grouped by patient, labelled healthy / unhealthy by an explicit policy.

    Rules (per CSV row): ``finding == 1`` -> UNHEALTHY; ``finding == -1`` (uncertain) -> ``uncertain`` policy
    (``ignore`` drops the row, ``healthy`` -> HEALTHY, ``unhealthy`` -> UNHEALTHY); otherwise ``No Finding == 1``
    -> HEALTHY; every other row (other findings only, or contradictory ``No Finding`` and ``finding`` both 1)
    is dropped and counted in ``notes``.

    Args:
        root: ``CheXpert-v1.0-small`` (or its parent).
        csv_names: CSV files to read (their rows are pooled).
        finding: the observation column that defines "unhealthy" (Wolleb: Pleural Effusion).
        uncertain: policy for -1.0 in the ``finding`` column: ``ignore`` | ``healthy`` | ``unhealthy``.
        view: ``frontal`` | ``lateral`` | ``all`` (the ``Frontal/Lateral`` column).
    """
    if uncertain not in ("ignore", "healthy", "unhealthy"):
        raise ValueError(f"uncertain-label policy {uncertain!r}: choose ignore, healthy or unhealthy")
    notes: Counter[str] = Counter()
    by_patient: dict[str, list[ImageItem]] = defaultdict(list)
    for csv_path in find_chexpert_csvs(root, csv_names):
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            required = ["Path", "No Finding", finding] + (["Frontal/Lateral"] if view != "all" else [])
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataInputError(
                    csv_path,
                    f"missing column(s) {missing}; expected the CheXpert columns (have {reader.fieldnames}). "
                    "Is this the right CSV, and is --set chexpert_finding spelled as a column name?",
                )
            for row_number, row in enumerate(reader, start=2):
                where = f"{csv_path.name} line {row_number}"
                try:
                    no_finding = _float_or_none(row["No Finding"])
                    value = _float_or_none(row[finding])
                except ValueError as exc:
                    raise DataInputError(csv_path, f"{where}: unreadable label value ({exc}); expected 1.0, 0.0, -1.0 or blank") from exc
                if view != "all" and row["Frontal/Lateral"].strip().lower() != view:
                    notes["rows_other_view"] += 1
                    continue
                if value == 1.0 and no_finding == 1.0:
                    notes["rows_contradictory"] += 1
                    continue
                if value == 1.0:
                    label = UNHEALTHY
                elif value == -1.0:
                    if uncertain == "ignore":
                        notes["rows_uncertain_dropped"] += 1
                        continue
                    label = HEALTHY if uncertain == "healthy" else UNHEALTHY
                    notes[f"rows_uncertain_as_{uncertain}"] += 1
                elif no_finding == 1.0:
                    label = HEALTHY
                else:
                    notes["rows_neither"] += 1
                    continue
                path = resolve_chexpert_path(csv_path.parent, row["Path"])
                match = CHEXPERT_PATIENT.search(row["Path"])
                patient = match.group(1) if match else Path(row["Path"]).parts[-3]
                by_patient[patient].append(ImageItem(path=path, label=label, origin=where))
                notes["rows_used"] += 1
    subjects = [ImageSubject(subject_id=p, items=tuple(items)) for p, items in sorted(by_patient.items())]
    return Discovery(subjects=subjects, notes=dict(notes))


def discover_folder(root: Path, subject_regex: str | None = None) -> Discovery:
    """Plain folder layout: ``healthy/`` and ``unhealthy/`` images, optional ``masks/<stem>.*``.

    Args:
        root: folder holding ``healthy/`` and/or ``unhealthy/``.
        subject_regex: regex applied to the file stem whose first group is the subject ID (so several images
            of one subject stay in one split); default: each image is its own subject.
    """
    class_dirs = [(root / "healthy", HEALTHY), (root / "unhealthy", UNHEALTHY)]
    if not any(d.is_dir() for d, _ in class_dirs):
        raise DataInputError(root, "no healthy/ or unhealthy/ folder; the folder layout needs at least one of them")
    mask_dir = root / "masks"
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                if p.stem in masks:
                    raise DataInputError(p, f"two mask files share the stem {p.stem!r} ({masks[p.stem].name}); keep one")
                masks[p.stem] = p
    pattern = re.compile(subject_regex) if subject_regex else None
    seen: dict[str, Path] = {}
    by_subject: dict[str, list[ImageItem]] = defaultdict(list)
    for folder, label in class_dirs:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                continue
            if p.stem in seen:
                raise DataInputError(p, f"file stem {p.stem!r} also used by {seen[p.stem]}; stems must be unique (they pair images with masks)")
            seen[p.stem] = p
            if pattern is not None:
                match = pattern.search(p.stem)
                if match is None or not match.groups():
                    raise DataInputError(p, f"subject regex {subject_regex!r} does not match this file stem (it needs one group)")
                subject = match.group(1)
            else:
                subject = p.stem
            by_subject[subject].append(ImageItem(path=p, label=label, mask=masks.get(p.stem), origin=folder.name))
    has_masks = mask_dir.is_dir()
    subjects = [ImageSubject(subject_id=s, items=tuple(items), has_masks=has_masks) for s, items in sorted(by_subject.items())]
    return Discovery(subjects=subjects, notes={"images": sum(len(s.items) for s in subjects), "masks_folder": has_masks})


def discover(
    fmt: str,
    root: str | Path,
    *,
    chexpert_csv: Sequence[str] = ("train.csv", "valid.csv"),
    chexpert_finding: str = "Pleural Effusion",
    chexpert_uncertain: str = "ignore",
    chexpert_view: str = "frontal",
    folder_subject_regex: str | None = None,
) -> Discovery:
    """Find the subjects of a dataset in its published layout.

    Args:
        fmt: one of :data:`FORMATS`.
        root: the dataset folder as published (or a parent of it).

    Returns:
        :class:`Discovery` with subjects sorted by ID (IDs unique).

    Raises:
        DataInputError: the root holds no subject of this format, or the layout is ambiguous.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataInputError(root, "dataset folder not found; check --root")
    if fmt in BRATS_DIR_PATTERN:
        found = Discovery(discover_brats(root, fmt))
    elif fmt == "msd":
        found = Discovery(discover_msd(root))
    elif fmt == "atlas":
        found = Discovery(discover_atlas(root))
    elif fmt == "chexpert":
        found = discover_chexpert(root, chexpert_csv, chexpert_finding, chexpert_uncertain, chexpert_view)
    elif fmt == "folder":
        found = discover_folder(root, folder_subject_regex)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if not found.subjects:
        hints = {
            "brats2020": "BraTS20_Training_001/ folders", "brats2021": "BraTS2021_00000/ folders",
            "brats2023": "BraTS-GLI-00000-000/ folders", "atlas": "sub-*/ses-*/anat/*_T1w.nii.gz files",
            "chexpert": "CSV rows that pass the label policy", "folder": "images in healthy/ or unhealthy/",
        }  # fmt: skip
        raise DataInputError(root, f"no subject found for --format {fmt} (looked for {hints.get(fmt, 'subjects')}); check --root and --format")
    found.subjects.sort(key=lambda s: s.subject_id)
    _check_unique((s.subject_id for s in found.subjects), root)
    return found
