"""Turn a dataset in its published layout into a slice store (``anomalydiff prepare``).

Streams subject by subject (memory ~ one subject): discover -> load + validate -> preprocess (spec C.1)
-> append to :class:`~anomalydiff.data.store.SliceStoreWriter`. On any error (or Ctrl-C / SIGTERM) the
writer aborts, so a failed run leaves neither the store nor its ``.partial`` folder behind. With
``skip_bad`` a bad subject (or a bad image of a 2-D subject) is left out with a warning and a row in the
store's ``skipped.csv`` naming the file and the reason.

Example::

    cfg = PrepareConfig(format="brats2021", resolution=64)
    prepare_dataset(cfg, "/data/BraTS2021_Training_Data", "stores/brats21_64")
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from tqdm.auto import tqdm

from anomalydiff.config import to_dict
from anomalydiff.data.geometry import volume_geometry
from anomalydiff.data.layouts import (
    DEFAULT_MODALITIES,
    FORMATS,
    IMAGE_FORMATS,
    ImageSubject,
    VolumeSubject,
    canonical_modality,
    discover,
)
from anomalydiff.data.preprocess import UNKNOWN_LABEL, PreparedSlices, preprocess_image, preprocess_volume_subject
from anomalydiff.data.splits import read_split_files, split_subjects
from anomalydiff.data.store import SliceStoreWriter
from anomalydiff.data.volumes import DataInputError, Volume, check_labels, check_same_grid, load_image, load_mask_image, load_nifti
from anomalydiff.labels import HEALTHY

MNI152_BRAIN_MASK = "mni152"  # brain_mask keyword: nilearn's MNI152 2009 brain mask at 1 mm (the ATLAS v2.0 grid)


class SkippedInputWarning(UserWarning):
    """An input was left out because of ``--skip-bad``."""


@dataclass(frozen=True)
class PrepareConfig:
    """How a dataset becomes a slice store (flat, so every field is one ``--set key=value``)."""

    format: Literal["brats2020", "brats2021", "brats2023", "msd", "atlas", "chexpert", "folder"] | None = None  # data.md layouts; required
    modalities: tuple[str, ...] | None = None  # channel order; None = format default (spec C.1: flair,t1,t1ce,t2; ATLAS t1; 2-D gray)
    resolution: int = 128  # side of the stored slices (spec C.1: 128; CPU recipe 64; Wolleb 256)
    normalisation: Literal["anofpdm", "volume"] = "anofpdm"  # spec C.1 per-slice min-max, or per-volume scale (preprocess.py)
    percentile: float = 99.0  # per-volume scale = this percentile of positive voxels (spec C.1)
    slice_range: tuple[int, int] | None = None  # explicit canonical axial slices [first, last); None = brain rule (spec C.1)
    slice_threshold: float = 0.5  # brain rule: sum of mean-over-modalities intensity of a slice > this (spec C.1)
    antialias: bool = False  # bilinear resize without antialias, as the AnoFPDM code (spec C.1)
    lesion_labels: tuple[int, ...] | None = None  # seg labels counted as anomaly; None = all positive (spec C.1 merges all)
    missing_seg: Literal["error", "unlabelled"] = "error"  # a training case without seg: error, or use it without pixel labels
    brain_mask: str | None = None  # NIfTI brain mask for every subject, or "mni152" (ATLAS grid, data.md); per-subject *_desc-brain_mask wins
    skull_strip: bool = True  # zero voxels outside a supplied brain mask (ATLAS T1w may not be skull-stripped, data.md)
    affine_tolerance: float = 1e-3  # max |affine difference| (mm) between files of one subject
    max_subjects: int | None = None  # keep only the first N subjects (sorted IDs); for quick CPU runs
    split_fractions: tuple[float, float, float] = (0.75, 0.05, 0.20)  # int(0.75N)/int(0.05N)/rest (spec C.1)
    split_counts: tuple[int, int, int] | None = None  # fixed counts instead (e.g. paper 939/63/252, spec E.8)
    split_seed: int = 10  # random.seed(10) then shuffle (spec C.1)
    chexpert_csv: tuple[str, ...] = ("train.csv", "valid.csv")  # CheXpert CSVs whose rows are pooled
    chexpert_finding: str = "Pleural Effusion"  # "unhealthy" column (Wolleb, data.md)
    chexpert_uncertain: Literal["ignore", "healthy", "unhealthy"] = "ignore"  # -1.0 in the finding column: drop the row (documented default)
    chexpert_view: Literal["frontal", "lateral", "all"] = "frontal"  # Frontal/Lateral column filter; one view type per model
    resize_2d: Literal["pad", "stretch"] = "pad"  # 2-D images: keep proportions and pad, or stretch to the square
    image_mode: Literal["L", "RGB"] = "L"  # 2-D images as grayscale (1 channel) or RGB (3)
    folder_subject_regex: str | None = None  # folder layout: regex on the file stem, group 1 = subject ID; None = one image per subject

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}: choose one of {FORMATS}")
        if self.resolution < 4:
            raise ValueError(f"resolution {self.resolution} is too small; use e.g. 64 or 128")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile {self.percentile} must be in (0, 100]")
        if self.slice_range is not None and not 0 <= self.slice_range[0] < self.slice_range[1]:
            raise ValueError(f"slice_range {self.slice_range} must be [first, last) with 0 <= first < last")

    def volume_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~anomalydiff.data.preprocess.preprocess_volume_subject` for this config
        (so a scan given at prediction time is preprocessed exactly like the store it is compared with)."""
        return {
            "resolution": self.resolution,
            "normalisation": self.normalisation,
            "percentile": self.percentile,
            "slice_range": self.slice_range,
            "slice_threshold": self.slice_threshold,
            "antialias": self.antialias,
            "lesion_labels": self.lesion_labels,
            "skull_strip": self.skull_strip,
        }

    def channel_names(self) -> tuple[str, ...]:
        """The channel names of the store, in order (canonical modality names for 3-D formats)."""
        if self.format is None:
            raise ValueError("no dataset format chosen; pass --format (one of " + ", ".join(FORMATS) + ")")
        if self.format in IMAGE_FORMATS:
            expected = ("gray",) if self.image_mode == "L" else ("red", "green", "blue")
            if self.modalities is not None and tuple(self.modalities) != expected:
                raise ValueError(f"--format {self.format} with image_mode={self.image_mode} has channels {expected}, not {self.modalities}")
            return expected
        if self.modalities is None:
            return DEFAULT_MODALITIES[self.format]
        names = []
        for name in self.modalities:
            try:
                names.append(canonical_modality(name))
            except ValueError as exc:
                raise ValueError(f"--modalities: {exc}") from exc
        available = DEFAULT_MODALITIES[self.format]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"--format {self.format} has modalities {list(available)}; {unknown} is not one of them")
        if len(set(names)) != len(names):
            raise ValueError(f"--modalities lists a modality twice: {names}")
        return tuple(names)


def load_brain_mask(spec: str) -> Volume:
    """The global brain mask of ``PrepareConfig.brain_mask``: a NIfTI path or ``mni152``."""
    if spec.lower() == MNI152_BRAIN_MASK:
        from nilearn.datasets import load_mni152_brain_mask

        image = load_mni152_brain_mask(resolution=1)
        return Volume(Path("nilearn MNI152 brain mask (1 mm)"), np.asarray(image.get_fdata(), dtype=np.float32), np.asarray(image.affine), image.header)
    return load_nifti(spec)


def load_volume_subject(
    subject: VolumeSubject, config: PrepareConfig, modalities: tuple[str, ...], global_brain: Volume | None = None
) -> tuple[dict[str, Volume], Volume | None, Volume | None]:
    """Load and validate the files of one 3-D subject.

    Returns:
        ``(modality -> Volume with 3-D data, seg Volume or None, brain-mask Volume or None)``.

    Raises:
        DataInputError: a missing modality / seg, unreadable file, bad values, grid mismatch, unexpected labels.
    """
    volumes: dict[str, Volume] = {}
    four_d: dict[Path, Volume] = {}
    for name in modalities:
        entry = subject.modalities.get(name)
        if entry is None or not entry.path.is_file():
            expected = entry.path if entry is not None else subject.folder
            raise DataInputError(
                expected, f"modality {name} of subject {subject.subject_id} is missing (expected this file, .nii or .nii.gz); "
                "restore it, choose other --modalities, or pass --skip-bad",
            )  # fmt: skip
        if entry.channel is None:
            volumes[name] = load_nifti(entry.path)
            continue
        # MSD: one 4-D file holds all channels; load it once
        if entry.path not in four_d:
            four_d[entry.path] = load_nifti(entry.path, ndim=4)
            if subject.num_channels is not None and four_d[entry.path].shape[3] != subject.num_channels:
                raise DataInputError(entry.path, f"has {four_d[entry.path].shape[3]} channels, dataset.json lists {subject.num_channels}")
        whole = four_d[entry.path]
        data = np.ascontiguousarray(whole.data[..., entry.channel])
        if not np.any(data):
            raise DataInputError(entry.path, f"channel {entry.channel} ({name}) is all zero; re-export the file (or pass --skip-bad)")
        volumes[name] = Volume(entry.path, data, whole.affine, whole.header)
    reference = volumes[modalities[0]]
    for name in modalities[1:]:
        check_same_grid(reference, volumes[name], config.affine_tolerance)
    seg = None
    if subject.seg is not None:
        seg = load_nifti(subject.seg, allow_zero=True)
        check_same_grid(reference, seg, config.affine_tolerance)
        check_labels(seg, subject.allowed_labels)
    elif subject.seg_expected and config.missing_seg == "error":
        raise DataInputError(
            subject.expected_seg or subject.folder,
            f"segmentation of training subject {subject.subject_id} is missing; restore it, pass --skip-bad, or "
            "--set missing_seg=unlabelled to use it without pixel labels",
        )
    brain = None
    if subject.brain_mask is not None:
        brain = load_nifti(subject.brain_mask)
    elif global_brain is not None:
        brain = global_brain
    if brain is not None:
        check_same_grid(reference, brain, config.affine_tolerance)
    return volumes, seg, brain


def _prepare_volume(
    subject: VolumeSubject, config: PrepareConfig, modalities: tuple[str, ...], global_brain: Volume | None
) -> tuple[PreparedSlices, dict[str, Any]]:
    volumes, seg, brain = load_volume_subject(subject, config, modalities, global_brain)
    reference = volumes[modalities[0]]
    prepared = preprocess_volume_subject(
        {name: v.data for name, v in volumes.items()},
        reference.affine,
        None if seg is None else seg.data,
        None if brain is None else brain.data,
        **config.volume_options(),
        sources={name: str(v.path) for name, v in volumes.items()},
    )
    info = volume_geometry(reference.affine, reference.shape, tuple(prepared.info["slice_range"]), config.resolution)
    info.update(
        {
            "format": config.format,
            "source_files": {name: str(v.path) for name, v in volumes.items()},
            "source_channels": {name: subject.modalities[name].channel for name in modalities},
            "seg_file": None if seg is None else str(seg.path),
            "brain_mask_file": None if brain is None else str(brain.path),
            "scales": prepared.info["scales"],
        }
    )
    return prepared, info


def _prepare_images(
    subject: ImageSubject, config: PrepareConfig, skip: Any
) -> tuple[PreparedSlices, dict[str, Any]] | None:
    """Load and preprocess the images of one 2-D subject; bad images go to ``skip(source, reason)`` or raise."""
    images, masks, bodies, labels, records = [], [], [], [], []
    for item in subject.items:
        try:
            raw = load_image(item.path, config.image_mode)
            mask = None
            if subject.has_masks:
                if item.mask is not None:
                    mask = load_mask_image(item.mask, raw.shape[-2:])
                    if item.label == HEALTHY and mask.any():
                        raise DataInputError(item.mask, f"mask of healthy image {item.path.name} is not empty; move the image to unhealthy/ or fix the mask")
                elif item.label == HEALTHY:
                    mask = np.zeros(raw.shape[-2:], dtype=bool)  # a healthy image has no lesion
                else:
                    raise DataInputError(item.path, "unhealthy image has no mask in masks/ (same file stem); add it or pass --skip-bad")
        except DataInputError as exc:
            skip(exc, f"subject {subject.subject_id} image {item.origin}")
            continue
        image, placed_mask, body, fit = preprocess_image(raw, mask, resolution=config.resolution, resize_mode=config.resize_2d, antialias=config.antialias)
        images.append(image)
        masks.append(placed_mask)
        bodies.append(body)
        labels.append(item.label)
        records.append({**fit, "source": str(item.path), "mask": None if item.mask is None else str(item.mask), "origin": item.origin})
    if not images:
        return None
    prepared = PreparedSlices(
        images=np.stack(images),
        masks=np.stack(masks) if subject.has_masks else None,
        brain=np.stack(bodies),
        slice_indices=list(range(len(images))),
        labels=labels,
        info={},
    )
    return prepared, {"kind": "image", "format": config.format, "images": records}


class _TerminateRequested(KeyboardInterrupt):
    """SIGTERM during prepare: unwind like Ctrl-C so the partial store is removed."""


def _raise_terminate(signum: int, frame: Any) -> None:
    raise _TerminateRequested(f"signal {signum}")


def prepare_dataset(
    config: PrepareConfig,
    root: str | Path,
    out: str | Path,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split_files: str | Path | None = None,
) -> Path:
    """Prepare a dataset into a slice store at ``out``.

    Args:
        config: what to prepare and how (:class:`PrepareConfig`).
        root: the dataset folder in its published layout.
        out: the store folder to create.
        skip_bad: leave bad inputs out (warning + ``skipped.csv``) instead of stopping at the first.
        overwrite: replace an existing store at ``out`` (only once the new one is complete).
        progress: show a tqdm progress bar.
        split_files: folder with ``train.csv``/``val.csv``/``test.csv`` to reuse instead of a fresh split.

    Returns:
        The store path.

    Raises:
        DataInputError: a bad input (without ``skip_bad``); the message names the file.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    started = time.time()
    modalities = config.channel_names()
    root, out = Path(root), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    found = discover(
        config.format,  # type: ignore[arg-type]
        root,
        chexpert_csv=config.chexpert_csv,
        chexpert_finding=config.chexpert_finding,
        chexpert_uncertain=config.chexpert_uncertain,
        chexpert_view=config.chexpert_view,
        folder_subject_regex=config.folder_subject_regex,
    )
    subjects = found.subjects[: config.max_subjects] if config.max_subjects is not None else found.subjects
    global_brain = load_brain_mask(config.brain_mask) if config.brain_mask else None
    info = {
        "format": config.format,
        "root": str(root.resolve()),
        "prepare_config": to_dict(config),
        "discovery": found.notes,
        "unknown_label": UNKNOWN_LABEL,
    }
    writer = SliceStoreWriter(out, len(modalities), config.resolution, config.resolution, modalities, info=info, overwrite=overwrite)
    restore_handler = None
    if threading.current_thread() is threading.main_thread():
        restore_handler = signal.signal(signal.SIGTERM, _raise_terminate)
    try:
        unlabelled: list[str] = []

        def skip(exc: DataInputError, what: str) -> None:
            if not skip_bad:
                raise exc
            reason = f"{what}: {exc.reason}"
            warnings.warn(f"skipped {exc.source}: {reason}", SkippedInputWarning, stacklevel=3)
            writer.skip(exc.source, reason)

        for subject in _progress(subjects, progress, str(config.format)):
            if isinstance(subject, VolumeSubject):
                try:
                    result: tuple[PreparedSlices, dict[str, Any]] | None = _prepare_volume(subject, config, modalities, global_brain)
                except DataInputError as exc:
                    skip(exc, f"subject {subject.subject_id}")
                    continue
            else:
                result = _prepare_images(subject, config, skip)
                if result is None:
                    continue
            prepared, subject_info = result
            writer.add_subject(
                subject.subject_id,
                prepared.images,
                prepared.masks,
                prepared.brain,
                prepared.slice_indices,
                prepared.labels,
                subject_info,
            )
            if all(label == UNKNOWN_LABEL for label in prepared.labels):
                unlabelled.append(subject.subject_id)
        if split_files is not None:
            splits = read_split_files(split_files, writer.subject_ids)
        else:
            splits = split_subjects(
                writer.subject_ids, config.split_fractions, config.split_seed, config.split_counts, unlabelled=unlabelled
            )
        writer.info["split_source"] = str(split_files) if split_files is not None else f"seed {config.split_seed}"
        writer.info["prepare_seconds"] = round(time.time() - started, 2)
        return writer.close(splits)
    except BaseException:
        writer.abort()
        raise
    finally:
        if restore_handler is not None:
            signal.signal(signal.SIGTERM, restore_handler)


def _progress(subjects: list[Any], enabled: bool, name: str) -> Iterator[Any]:
    return iter(tqdm(subjects, desc=f"prepare {name}", unit="subject", disable=not enabled))
