"""Subject-level train / val / test splits, reproducible from a seed (spec C.1, E.8).

Rule of the AnoFPDM code: sort the subject IDs, ``random.seed(10)``, ``random.shuffle``, then the first
``int(0.75 N)`` are train, the next ``int(0.05 N)`` val, the rest test (938 / 62 / 251 for N = 1,251).
Fixed counts (e.g. the paper's 939 / 63 / 252) can be given instead. Subjects without pixel labels
(BraTS validation cases, ATLAS ``Testing/``) carry image label -1, so they never enter train or val:
they all go to test. Split files are CSVs of subject IDs (``subject_id`` column), one per split.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from anomalydiff.data.store import SPLITS, read_subject_csv


def split_subjects(
    subject_ids: Iterable[str],
    fractions: Sequence[float] = (0.75, 0.05, 0.20),
    seed: int = 10,
    counts: Sequence[int] | None = None,
    unlabelled: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Split subjects into train / val / test.

    Args:
        subject_ids: all subject IDs (order does not matter: they are sorted first).
        fractions: train and val fractions (``int(f * N)`` each; spec C.1); test gets the rest. The third
            value is only checked to make the three sum to 1.
        seed: seed of Python's ``random`` shuffle (spec C.1: 10).
        counts: fixed ``(train, val, test)`` counts instead of fractions; must sum to the number of labelled subjects.
        unlabelled: IDs without pixel labels; they are left out of the shuffle and appended to test.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    unlabelled_set = set(unlabelled)
    ids = sorted(set(subject_ids) - unlabelled_set)
    n = len(ids)
    random.Random(seed).shuffle(ids)  # same stream as random.seed(seed); random.shuffle(ids)
    if counts is not None:
        if len(counts) != 3 or any(c < 0 for c in counts) or sum(counts) != n:
            raise ValueError(f"split counts {tuple(counts)} must be 3 non-negative numbers summing to the {n} labelled subjects")
        n_train, n_val = int(counts[0]), int(counts[1])
    else:
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions {tuple(fractions)} must be 3 non-negative numbers summing to 1")
        n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return {
        "train": ids[:n_train],
        "val": ids[n_train : n_train + n_val],
        "test": ids[n_train + n_val :] + sorted(unlabelled_set),
    }


def read_split_files(folder: str | Path, available: Iterable[str]) -> dict[str, list[str]]:
    """Reuse existing split CSVs (``train.csv``, ``val.csv``, ``test.csv`` in ``folder``, e.g. a store's ``splits/``).

    IDs that are not in ``available`` (left out with ``--skip-bad``, or absent) are dropped with a warning;
    available subjects in no file are left out of every split, also with a warning.

    Args:
        folder: folder holding the three CSV files.
        available: subject IDs present in the store being written.
    """
    folder = Path(folder)
    present = set(available)
    splits: dict[str, list[str]] = {}
    for name in SPLITS:
        path = folder / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: split file not found; --split-files needs train.csv, val.csv and test.csv")
        ids = read_subject_csv(path)
        gone = [s for s in ids if s not in present]
        if gone:
            warnings.warn(f"{path}: {len(gone)} subject(s) are not in this store and are dropped (e.g. {gone[:3]})", stacklevel=2)
        splits[name] = [s for s in ids if s in present]
    seen = [s for name in SPLITS for s in splits[name]]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{folder}: a subject appears in more than one split file; splits must be disjoint")
    unassigned = sorted(present - set(seen))
    if unassigned:
        warnings.warn(f"{folder}: {len(unassigned)} subject(s) are in no split file and in no split (e.g. {unassigned[:3]})", stacklevel=2)
    return splits
