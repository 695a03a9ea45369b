"""Tiny fake datasets written in the real published layouts and file naming (data.md), for the loader tests.

Every writer returns the folder to pass as ``--root``. Volumes are 24 x 24 x 12 (file order) with a
"brain" ellipsoid that spans axial slices 2..9 only (so the brain-slice rule has something to trim) and,
optionally, a spherical lesion with the format's labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE = (24, 24, 12)
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS files are LPS-like
BRATS_AFFINE[:3, 3] = [0.0, 239.0, 0.0]
RAS_AFFINE = np.eye(4)
RAS_AFFINE[:3, 3] = [-98.0, -134.0, -72.0]
BRAIN_SLICES = (2, 10)  # axial slices holding brain, [first, last)
CONTRAST = {"flair": (100.0, 260.0), "t1": (120.0, 60.0), "t1ce": (110.0, 240.0), "t2": (90.0, 250.0)}  # (brain, lesion)


def brain_ellipsoid(shape: Sequence[int] = SHAPE) -> np.ndarray:
    """Bool ``shape`` ellipsoid centred in-plane, covering axial slices ``BRAIN_SLICES``."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    cz, rz = (BRAIN_SLICES[0] + BRAIN_SLICES[1] - 1) / 2, (BRAIN_SLICES[1] - BRAIN_SLICES[0]) / 2
    return ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.38 * shape[1])) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def lesion_labels(shape: Sequence[int], centre: Sequence[float], radius: float, labels: Sequence[int]) -> np.ndarray:
    """Integer seg: a sphere with an inner core ``labels[0]``, a middle shell ``labels[-1]`` and an outer shell ``labels[1]``."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    seg = np.zeros(shape, dtype=np.int16)
    seg[distance <= radius] = labels[1]
    seg[distance <= 0.7 * radius] = labels[-1]
    seg[distance <= 0.35 * radius] = labels[0]
    return seg


def synthetic_subject(
    seed: int, lesion: bool = True, labels: Sequence[int] = (1, 2, 4), shape: Sequence[int] = SHAPE
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four modalities (file order) and a seg for one fake subject.

    Returns:
        ``({"flair", "t1", "t1ce", "t2"} -> float32 [X,Y,Z], seg int16 [X,Y,Z])``.
    """
    rng = np.random.default_rng(seed)
    brain = brain_ellipsoid(shape)
    seg = np.zeros(shape, dtype=np.int16)
    if lesion:
        centre = (shape[0] / 2 + rng.integers(-3, 4), shape[1] / 2 + rng.integers(-3, 4), 5 + rng.integers(0, 2))
        seg = lesion_labels(shape, centre, 3.5, labels) * brain
    volumes = {}
    for name, (tissue, lesion_value) in CONTRAST.items():
        volume = np.where(brain, tissue, 0.0) + brain * rng.normal(0, 5.0, shape)
        volume[seg > 0] = lesion_value
        volumes[name] = np.clip(volume, 0, None).astype(np.float32)
    return volumes, seg


def save(array: np.ndarray, path: Path, affine: np.ndarray = BRATS_AFFINE) -> Path:
    """Write ``array`` as NIfTI (``.nii`` or ``.nii.gz`` by suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_brats2020(root: Path) -> Path:
    """MICCAI_BraTS2020_TrainingData with cases 001 (.nii), 002 (.nii.gz, no lesion), 355 (seg misnamed
    ``W39_1998.09.19_Segm.nii``), plus MICCAI_BraTS2020_ValidationData/BraTS20_Validation_001 without seg."""
    train = root / "MICCAI_BraTS2020_TrainingData"
    for number, suffix, lesion in (("001", ".nii", True), ("002", ".nii.gz", False), ("355", ".nii", True)):
        case = f"BraTS20_Training_{number}"
        volumes, seg = synthetic_subject(int(number), lesion=lesion)
        for name, volume in volumes.items():
            save(volume, train / case / f"{case}_{name}{suffix}")
        seg_name = "W39_1998.09.19_Segm.nii" if number == "355" else f"{case}_seg{suffix}"
        save(seg, train / case / seg_name)
    # the official release also ships CSVs next to the cases
    (train / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\nHGG,BraTS20_Training_001\n")
    validation = root / "MICCAI_BraTS2020_ValidationData" / "BraTS20_Validation_001"
    volumes, _ = synthetic_subject(901)
    for name, volume in volumes.items():
        save(volume, validation / f"BraTS20_Validation_001_{name}.nii")
    return root


def write_brats2021(root: Path, count: int = 3, first_lesion_free: bool = True) -> Path:
    """BraTS2021_00000 ... folders with ``{id}_{flair,t1,t1ce,t2,seg}.nii.gz`` (labels 1, 2, 4)."""
    for k in range(count):
        case = f"BraTS2021_{k:05d}"
        volumes, seg = synthetic_subject(100 + k, lesion=not (first_lesion_free and k == 0))
        for name in ("flair", "t1", "t1ce", "t2"):
            save(volumes[name], root / case / f"{case}_{name}.nii.gz")
        save(seg, root / case / f"{case}_seg.nii.gz")
    return root


def write_brats2023(root: Path, count: int = 2) -> Path:
    """ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/BraTS-GLI-0000k-000 with t1n/t1c/t2w/t2f/seg (labels 1, 2, 3)."""
    base = root / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    names = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
    for k in range(count):
        case = f"BraTS-GLI-{k:05d}-000"
        volumes, seg = synthetic_subject(200 + k, labels=(1, 2, 3))
        for suffix, canonical in names.items():
            save(volumes[canonical], base / case / f"{case}-{suffix}.nii.gz")
        save(seg, base / case / f"{case}-seg.nii.gz")
    return root


def write_msd(root: Path, train: int = 2, test: int = 1) -> Path:
    """Task01_BrainTumour: dataset.json, 4-D imagesTr (channels FLAIR, T1w, t1gd, T2w), labelsTr (0-3), imagesTs,
    and the macOS ``._`` junk files the real archive contains."""
    task = root / "Task01_BrainTumour"
    meta = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": train,
        "numTest": test,
        "training": [],
        "test": [],
    }
    for k in range(1, train + test + 1):
        volumes, seg = synthetic_subject(300 + k, labels=(2, 1, 3))
        stacked = np.stack([volumes[n] for n in ("flair", "t1", "t1ce", "t2")], axis=-1)
        name = f"BRATS_{k:03d}.nii.gz"
        if k <= train:
            save(stacked, task / "imagesTr" / name)
            save(seg.astype(np.uint8), task / "labelsTr" / name)
            meta["training"].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            save(stacked, task / "imagesTs" / name)
            meta["test"].append(f"./imagesTs/{name}")
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    (task / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def atlas_prefix(subject: str) -> str:
    return f"{subject}_ses-1_space-MNI152NLin2009aSym"


def write_atlas(root: Path, train: int = 2, test: int = 1, brain_masks: bool = False) -> Path:
    """ATLAS_2/Training/R001/sub-r001s00k/ses-1/anat/..._T1w.nii.gz + ..._label-L_desc-T1lesion_mask.nii.gz, and
    ATLAS_2/Testing/R001/... without masks. T1w has a bright "skull" shell outside the brain."""
    base = root / "ATLAS_2"
    for k in range(1, train + test + 1):
        split = "Training" if k <= train else "Testing"
        subject = f"sub-r001s{k:03d}"
        anat = base / split / "R001" / subject / "ses-1" / "anat"
        volumes, seg = synthetic_subject(400 + k, labels=(1, 1, 1))
        brain = brain_ellipsoid()
        t1 = volumes["t1"].copy()
        skull = np.zeros(SHAPE, dtype=bool)
        skull[1:-1, 1:-1, BRAIN_SLICES[0] : BRAIN_SLICES[1]] = True
        t1[skull & ~brain] = 400.0
        save(t1, anat / f"{atlas_prefix(subject)}_T1w.nii.gz", RAS_AFFINE)
        if split == "Training":
            save(seg.astype(np.float32), anat / f"{atlas_prefix(subject)}_label-L_desc-T1lesion_mask.nii.gz", RAS_AFFINE)
        if brain_masks:
            save(brain.astype(np.uint8), anat / f"{atlas_prefix(subject)}_desc-brain_mask.nii.gz", RAS_AFFINE)
    (base / "Training" / "20220425_ATLAS_2.0_MetaData.csv").write_text("Subject ID,Site\nr001s001,R001\n")
    return root


CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip

# (split, patient, study, view, frontal/lateral, No Finding, Pleural Effusion, Cardiomegaly)
CHEXPERT_ROWS = [
    ("train", 1, 1, 1, "Frontal", "1.0", "", ""),  # healthy
    ("train", 1, 1, 2, "Lateral", "1.0", "", ""),  # lateral view (filtered by default)
    ("train", 2, 1, 1, "Frontal", "", "1.0", ""),  # effusion
    ("train", 2, 2, 1, "Frontal", "", "-1.0", ""),  # uncertain effusion
    ("train", 3, 1, 1, "Frontal", "", "0.0", "1.0"),  # other finding only: dropped
    ("train", 4, 1, 1, "Frontal", "1.0", "0.0", ""),  # healthy
    ("valid", 64541, 1, 1, "Frontal", "", "1.0", "-1.0"),  # effusion
    ("valid", 64542, 1, 1, "Frontal", "1.0", "", ""),  # healthy
]


def write_chexpert(root: Path, size: tuple[int, int] = (40, 32)) -> Path:
    """CheXpert-v1.0-small/{train,valid}.csv (Path with the root prefix) and grayscale JPEGs of ``size`` (h, w)."""
    base = root / "CheXpert-v1.0-small"
    rows: dict[str, list[dict[str, str]]] = {"train": [], "valid": []}
    rng = np.random.default_rng(5)
    for split, patient, study, view, frontal, no_finding, effusion, cardio in CHEXPERT_ROWS:
        relative = f"{split}/patient{patient:05d}/study{study}/view{view}_{frontal.lower()}.jpg"
        image = (rng.random(size) * 180 + 40).astype(np.uint8)
        (base / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(base / relative, quality=95)
        row = {c: "" for c in CHEXPERT_COLUMNS}
        row.update({"Path": f"CheXpert-v1.0-small/{relative}", "Sex": "Female", "Age": "63", "Frontal/Lateral": frontal,
                    "AP/PA": "AP" if frontal == "Frontal" else "", "No Finding": no_finding,
                    "Pleural Effusion": effusion, "Cardiomegaly": cardio})  # fmt: skip
        rows[split].append(row)
    for split, items in rows.items():
        with open(base / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
            writer.writeheader()
            writer.writerows(items)
    return base


def write_folder(root: Path, with_masks: bool = True) -> Path:
    """healthy/h{1,2}.png, unhealthy/u{1,2}.png (+ u3.jpg), masks/u{1,2,3}.png (lesion squares), 30 x 20 pixels."""
    rng = np.random.default_rng(6)
    for name in ("healthy/h1.png", "healthy/h2.png", "unhealthy/u1.png", "unhealthy/u2.png", "unhealthy/u3.jpg"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = (rng.random((30, 20)) * 100 + 50).astype(np.uint8)
        if name.startswith("unhealthy"):
            image[10:18, 6:14] = 250
        Image.fromarray(image, mode="L").save(path)
        if with_masks and name.startswith("unhealthy"):
            mask = np.zeros((30, 20), dtype=np.uint8)
            mask[10:18, 6:14] = 255
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{Path(name).stem}.png")
    return root
