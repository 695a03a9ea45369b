"""The slice store: the on-disk format every dataset is prepared into, and training streams from.

Layout of a store folder::

    store.json       shape, dtype, modalities, preprocessing, source format, version
    images.bin       float16 [N, C, H, W], intensities in [-1, 1]    (read as np.memmap)
    masks.bin        uint8   [N, H, W], pixel ground truth (0/1; all 0 where none exists)
    brain.bin        uint8   [N, H, W], foreground (brain / body) mask
    slices.csv       one row per slice: row, subject_id, slice_index, label, has_mask
    subjects.jsonl   one JSON object per subject: its id, source files and the geometry needed to put a
                     slice back into the volume's own space (written by the preparer, opaque here)
    splits/{train,val,test}.csv   subject IDs (column ``subject_id``), by subject, from a seed
    skipped.csv      inputs left out with ``--skip-bad`` and why

The writer appends subject by subject (memory stays at one subject), writes into ``<out>.partial/`` and
renames it to ``<out>`` only in :meth:`SliceStoreWriter.close`: a killed run never leaves a store that
looks complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

STORE_VERSION = 1
IMAGE_DTYPE = np.float16
SPLITS = ("train", "val", "test")


class StoreError(RuntimeError):
    """A slice store is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class SliceMeta:
    """Per-slice metadata (one row of ``slices.csv``)."""

    row: int
    subject_id: str
    slice_index: int
    label: int
    has_mask: bool


class SliceStoreWriter:
    """Append-only writer of a slice store.

    Args:
        out: final store folder; must not exist unless ``overwrite``.
        channels, height, width: slice geometry, fixed for the whole store.
        modalities: channel names in order (e.g. ``["flair", "t1", "t1ce", "t2"]``).
        info: free-form provenance written into ``store.json`` (format, preprocessing config, ...).
        overwrite: replace an existing store at ``out``.
    """

    def __init__(
        self,
        out: str | Path,
        channels: int,
        height: int,
        width: int,
        modalities: Sequence[str],
        info: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; choose another --out or pass --overwrite")
        if len(modalities) != channels:
            raise ValueError(f"{len(modalities)} modality names given for {channels} channels")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # leftovers of a killed run
        (self.tmp / "splits").mkdir(parents=True)
        self.shape = (channels, height, width)
        self.modalities = list(modalities)
        self.info = dict(info or {})
        self._images = open(self.tmp / "images.bin", "wb")
        self._masks = open(self.tmp / "masks.bin", "wb")
        self._brain = open(self.tmp / "brain.bin", "wb")
        self._slices = open(self.tmp / "slices.csv", "w", newline="")
        self._slice_writer = csv.writer(self._slices)
        self._slice_writer.writerow(["row", "subject_id", "slice_index", "label", "has_mask"])
        self._subjects = open(self.tmp / "subjects.jsonl", "w")
        self._skipped: list[tuple[str, str]] = []
        self.num_slices = 0
        self.subject_ids: list[str] = []
        self._closed = False

    def add_subject(
        self,
        subject_id: str,
        images: np.ndarray,
        masks: np.ndarray | None,
        brain: np.ndarray,
        slice_indices: Sequence[int],
        labels: Sequence[int],
        subject_info: dict[str, Any] | None = None,
    ) -> None:
        """Append all slices of one subject.

        Args:
            images: ``[S, C, H, W]`` float in [-1, 1] (finite).
            masks: ``[S, H, W]`` bool/0-1 pixel labels, or ``None`` if the subject has none.
            brain: ``[S, H, W]`` bool/0-1 foreground.
            slice_indices: ``S`` slice positions in the subject's canonical volume.
            labels: ``S`` image labels.
            subject_info: geometry and provenance for ``subjects.jsonl`` (JSON-serialisable).
        """
        if subject_id in self.subject_ids:
            raise ValueError(f"subject {subject_id!r} added twice")
        images = np.asarray(images)
        s = images.shape[0]
        if images.shape[1:] != self.shape:
            raise ValueError(f"subject {subject_id}: slices have shape {images.shape[1:]}, store expects {self.shape}")
        if not np.isfinite(images).all():
            raise ValueError(f"subject {subject_id}: non-finite values in prepared slices")
        if images.min(initial=0) < -1.0001 or images.max(initial=0) > 1.0001:
            raise ValueError(f"subject {subject_id}: prepared slices leave [-1, 1]")
        hw = self.shape[1:]
        if brain.shape != (s, *hw) or (masks is not None and masks.shape != (s, *hw)):
            raise ValueError(f"subject {subject_id}: mask/brain shape does not match {(s, *hw)}")
        if len(slice_indices) != s or len(labels) != s:
            raise ValueError(f"subject {subject_id}: {s} slices but {len(slice_indices)} indices / {len(labels)} labels")
        self._images.write(np.ascontiguousarray(images, dtype=IMAGE_DTYPE).tobytes())
        mask_bytes = np.zeros((s, *hw), np.uint8) if masks is None else np.asarray(masks).astype(np.uint8)
        self._masks.write(mask_bytes.tobytes())
        self._brain.write(np.asarray(brain).astype(np.uint8).tobytes())
        for k in range(s):
            self._slice_writer.writerow(
                [self.num_slices + k, subject_id, int(slice_indices[k]), int(labels[k]), int(masks is not None)]
            )
        info = {"subject_id": subject_id, "num_slices": s, **(subject_info or {})}
        self._subjects.write(json.dumps(info) + "\n")
        self.num_slices += s
        self.subject_ids.append(subject_id)

    def skip(self, source: str, reason: str) -> None:
        """Record an input left out (``--skip-bad``)."""
        self._skipped.append((source, reason))

    def close(self, splits: dict[str, Sequence[str]]) -> Path:
        """Write splits and metadata, then atomically move the store into place.

        Args:
            splits: ``{"train": [...], "val": [...], "test": [...]}`` subject IDs.
        """
        if self._closed:
            return self.out
        if self.num_slices == 0:
            self.abort()
            raise StoreError(f"no slice was written to {self.out}: every input was empty or skipped")
        for handle in (self._images, self._masks, self._brain, self._slices, self._subjects):
            handle.close()
        for name in SPLITS:
            ids = list(splits.get(name, []))
            unknown = set(ids) - set(self.subject_ids)
            if unknown:
                self.abort()
                raise StoreError(f"split {name} names subjects not in the store: {sorted(unknown)[:5]}")
            write_subject_csv(self.tmp / "splits" / f"{name}.csv", ids)
        with open(self.tmp / "skipped.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "reason"])
            writer.writerows(self._skipped)
        meta = {
            "version": STORE_VERSION,
            "num_slices": self.num_slices,
            "channels": self.shape[0],
            "height": self.shape[1],
            "width": self.shape[2],
            "modalities": self.modalities,
            "image_dtype": np.dtype(IMAGE_DTYPE).name,
            "num_subjects": len(self.subject_ids),
            "num_skipped": len(self._skipped),
            **self.info,
        }
        (self.tmp / "store.json").write_text(json.dumps(meta, indent=2))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Remove the partial store (used on errors)."""
        for handle in (self._images, self._masks, self._brain, self._slices, self._subjects):
            if not handle.closed:
                handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True


def write_subject_csv(path: Path, subject_ids: Iterable[str]) -> None:
    """Write a one-column CSV of subject IDs (the split file format)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id"])
        writer.writerows([[s] for s in subject_ids])


def read_subject_csv(path: Path) -> list[str]:
    """Read a split file written by :func:`write_subject_csv`."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "subject_id" not in reader.fieldnames:
            raise StoreError(f"{path}: expected a CSV with a 'subject_id' column, got {reader.fieldnames}")
        return [row["subject_id"] for row in reader]


class SliceStore:
    """Read-only access to a prepared store (memory-mapped; nothing is loaded up front but metadata)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "store.json"
        if not meta_file.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" ({partial} exists: a prepare run was interrupted; run it again)" if partial.exists() else ""
            raise StoreError(f"{self.path} is not a slice store: store.json missing{hint}. Run `anomalydiff prepare`.")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("version") != STORE_VERSION:
            raise StoreError(f"{meta_file}: store version {self.meta.get('version')}, this toolkit reads {STORE_VERSION}")
        n, c, h, w = (self.meta[k] for k in ("num_slices", "channels", "height", "width"))
        self.shape = (n, c, h, w)
        self.modalities: list[str] = list(self.meta["modalities"])
        for name, size in (("images.bin", n * c * h * w * 2), ("masks.bin", n * h * w), ("brain.bin", n * h * w)):
            actual = (self.path / name).stat().st_size if (self.path / name).exists() else -1
            if actual != size:
                raise StoreError(f"{self.path / name}: {actual} bytes, expected {size}; the store is corrupt, prepare it again")
        self.images = np.memmap(self.path / "images.bin", dtype=IMAGE_DTYPE, mode="r", shape=(n, c, h, w))
        self.masks = np.memmap(self.path / "masks.bin", dtype=np.uint8, mode="r", shape=(n, h, w))
        self.brain = np.memmap(self.path / "brain.bin", dtype=np.uint8, mode="r", shape=(n, h, w))
        self.slices: list[SliceMeta] = []
        with open(self.path / "slices.csv", newline="") as f:
            for row in csv.DictReader(f):
                self.slices.append(
                    SliceMeta(int(row["row"]), row["subject_id"], int(row["slice_index"]), int(row["label"]), row["has_mask"] == "1")
                )
        if len(self.slices) != n:
            raise StoreError(f"{self.path / 'slices.csv'}: {len(self.slices)} rows, store.json says {n}")

    def __len__(self) -> int:
        return self.shape[0]

    def split_subjects(self, split: str) -> list[str]:
        """Subject IDs of ``split`` (train / val / test)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return read_subject_csv(self.path / "splits" / f"{split}.csv")

    def rows(self, split: str | None = None, label: int | None = None) -> np.ndarray:
        """Row indices of the slices in ``split`` (all if None), optionally only with image ``label``."""
        subjects = None if split is None else set(self.split_subjects(split))
        return np.array(
            [
                s.row
                for s in self.slices
                if (subjects is None or s.subject_id in subjects) and (label is None or s.label == label)
            ],
            dtype=np.int64,
        )

    def subjects(self) -> dict[str, dict[str, Any]]:
        """Per-subject records from ``subjects.jsonl`` keyed by subject ID."""
        out = {}
        with open(self.path / "subjects.jsonl") as f:
            for line in f:
                record = json.loads(line)
                out[record["subject_id"]] = record
        return out

    def item(self, row: int) -> dict[str, Any]:
        """One slice as a dict of tensors (the format :func:`anomalydiff.records.collate_batch` takes)."""
        meta = self.slices[row]
        return {
            "image": torch.from_numpy(np.array(self.images[row], dtype=np.float32)),
            "label": meta.label,
            "mask": torch.from_numpy(np.array(self.masks[row], dtype=bool))[None] if meta.has_mask else None,
            "brain": torch.from_numpy(np.array(self.brain[row], dtype=bool))[None],
            "subject_id": meta.subject_id,
            "slice_index": meta.slice_index,
        }


class SliceDataset(Dataset):
    """A torch ``Dataset`` over the slices of one split of a store (streams from the memmaps).

    Args:
        store: an open :class:`SliceStore` or its path.
        split: ``train`` / ``val`` / ``test`` or ``None`` for all slices.
        label: keep only slices with this image label (e.g. ``HEALTHY`` for healthy-only training).
    """

    def __init__(self, store: SliceStore | str | Path, split: str | None = None, label: int | None = None) -> None:
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.row_index = self.store.rows(split, label)
        if len(self.row_index) == 0:
            raise StoreError(f"{self.store.path}: no slice in split={split!r} with label={label!r}")

    def __len__(self) -> int:
        return len(self.row_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.store.item(int(self.row_index[i]))
