"""Bad input: every case names the file and what is wrong; --skip-bad records it; no half-written store."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

import fake_trees as ft
from anomalydiff.data import DataInputError, PrepareConfig, SkippedInputWarning, SliceStore, StoreError, prepare_dataset
from anomalydiff.data import prepare as prepare_module

CASE = "BraTS2021_00001"


def case_file(root: Path, name: str) -> Path:
    return root / CASE / f"{CASE}_{name}.nii.gz"


def rewrite(root: Path, name: str, change: Callable[[np.ndarray], np.ndarray], affine: np.ndarray | None = None) -> None:
    path = case_file(root, name)
    image = nib.load(str(path))
    data = change(np.asarray(image.get_fdata(), dtype=np.float32))
    ft.save(data, path, image.affine if affine is None else affine)


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def shifted_affine() -> np.ndarray:
    affine = ft.BRATS_AFFINE.copy()
    affine[0, 3] += 2.0
    return affine


def with_nan(a: np.ndarray) -> np.ndarray:
    a[12, 12, 5] = np.nan
    return a


def with_inf(a: np.ndarray) -> np.ndarray:
    a[3, 3, 3] = np.inf
    return a


def with_label_3(a: np.ndarray) -> np.ndarray:
    a[a == 4] = 3
    return a


VOLUME_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (corrupt the tree, file named in the message, what the message says)
    "missing modality": (lambda r: case_file(r, "t1ce").unlink(), f"{CASE}_t1ce.nii.gz", "modality t1ce of subject"),
    "seg absent": (lambda r: case_file(r, "seg").unlink(), f"{CASE}_seg.nii.gz", "segmentation of training subject"),
    "unexpected labels": (lambda r: rewrite(r, "seg", with_label_3), f"{CASE}_seg.nii.gz", "unexpected segmentation label(s) [3]"),
    "non-integer seg": (lambda r: rewrite(r, "seg", lambda a: a * 0.5), f"{CASE}_seg.nii.gz", "non-integer values"),
    "shape mismatch": (lambda r: rewrite(r, "t2", lambda a: a[:, :, :10]), f"{CASE}_t2.nii.gz", "does not match (24, 24, 12)"),
    "seg shape mismatch": (lambda r: rewrite(r, "seg", lambda a: a[:20]), f"{CASE}_seg.nii.gz", "does not match (24, 24, 12)"),
    "affine mismatch": (lambda r: rewrite(r, "t1", lambda a: a, shifted_affine()), f"{CASE}_t1.nii.gz", "affine differs"),
    "all-zero volume": (lambda r: rewrite(r, "flair", np.zeros_like), f"{CASE}_flair.nii.gz", "all zero"),
    "NaN voxels": (lambda r: rewrite(r, "flair", with_nan), f"{CASE}_flair.nii.gz", "NaN or inf"),
    "inf voxels": (lambda r: rewrite(r, "t2", with_inf), f"{CASE}_t2.nii.gz", "NaN or inf"),
    "truncated nii.gz": (lambda r: truncate(case_file(r, "t1")), f"{CASE}_t1.nii.gz", "truncated or corrupt"),
    "not a nifti": (lambda r: case_file(r, "t2").write_bytes(os.urandom(400)), f"{CASE}_t2.nii.gz", "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(VOLUME_CASES))
def test_bad_volume_input_names_the_file(tmp_path, case):
    corrupt, filename, what = VOLUME_CASES[case]
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    corrupt(root)
    out = tmp_path / "store"
    with pytest.raises(DataInputError) as info:
        prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, out, progress=False)
    message = str(info.value)
    assert filename in message and what in message, message
    assert Path(info.value.source).name == filename
    # the failure came after subject 00000 was written: still no store and no partial folder
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("case", ["NaN voxels", "seg absent", "truncated nii.gz"])
def test_skip_bad_records_the_file_in_skipped_csv(tmp_path, case):
    corrupt, filename, what = VOLUME_CASES[case]
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    corrupt(root)
    with pytest.warns(SkippedInputWarning, match=filename):
        path = prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, tmp_path / "store", skip_bad=True, progress=False)
    store = SliceStore(path)
    assert sorted(store.subjects()) == ["BraTS2021_00000", "BraTS2021_00002"]
    with open(path / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and Path(rows[0]["source"]).name == filename
    assert CASE in rows[0]["reason"] and what in rows[0]["reason"]
    assert json.loads((path / "store.json").read_text())["num_skipped"] == 1
    assert all(CASE not in store.split_subjects(k) for k in ("train", "val", "test"))


def test_missing_seg_can_be_accepted_as_unlabelled(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=2)
    case_file(root, "seg").unlink()
    store = SliceStore(prepare_dataset(PrepareConfig(format="brats2021", resolution=8, missing_seg="unlabelled"), root, tmp_path / "s", progress=False))
    assert all(s.label == -1 and not s.has_mask for s in store.slices if s.subject_id == CASE)


def test_everything_skipped_leaves_no_store(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=1)
    (root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").write_bytes(b"not nifti")
    out = tmp_path / "store"
    with pytest.warns(SkippedInputWarning), pytest.raises(StoreError, match="no slice"):
        prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, out, skip_bad=True, progress=False)
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_interrupt_leaves_no_store_and_keeps_an_old_one(tmp_path, monkeypatch):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    out = tmp_path / "store"
    prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, out, progress=False)
    before = (out / "images.bin").read_bytes()
    original = prepare_module.load_volume_subject

    def interrupted(subject, *args, **kwargs):
        if subject.subject_id == "BraTS2021_00002":
            raise KeyboardInterrupt
        return original(subject, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "load_volume_subject", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PrepareConfig(format="brats2021", resolution=16), root, out, overwrite=True, progress=False)
    assert (out / "images.bin").read_bytes() == before  # the old store is untouched
    assert not Path(f"{out}.partial").exists()
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, fresh, progress=False)
    assert not fresh.exists() and not Path(f"{fresh}.partial").exists()


def test_sigterm_leaves_no_store(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=2)
    out = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import time
        from anomalydiff.data import prepare as pm
        original = pm.load_volume_subject
        def slow(*args, **kwargs):
            result = original(*args, **kwargs)
            print("loaded", flush=True)
            time.sleep(60)
            return result
        pm.load_volume_subject = slow
        pm.prepare_dataset(pm.PrepareConfig(format="brats2021", resolution=8), {str(root)!r}, {str(out)!r}, progress=False)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "loaded"
        assert Path(f"{out}.partial").exists()  # mid-run: only the partial folder exists
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_msd_bad_dataset_json_and_channel_count(tmp_path):
    root = ft.write_msd(tmp_path / "msd", train=1, test=0)
    meta_file = root / "Task01_BrainTumour" / "dataset.json"
    meta = json.loads(meta_file.read_text())
    meta["modality"]["4"] = "T1w_extra"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataInputError, match="dataset.json.*no canonical name"):
        prepare_dataset(PrepareConfig(format="msd", resolution=8), root, tmp_path / "s", progress=False)
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd"}  # the files have 4 channels
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataInputError, match=r"BRATS_001.nii.gz: has 4 channels, dataset.json lists 3"):
        prepare_dataset(PrepareConfig(format="msd", resolution=8, modalities=("flair",)), root, tmp_path / "s", progress=False)
    meta_file.write_text("{ not json")
    with pytest.raises(DataInputError, match="dataset.json: not a valid MSD dataset.json"):
        prepare_dataset(PrepareConfig(format="msd", resolution=8), root, tmp_path / "s", progress=False)


def jpeg_of(root: Path, patient: str) -> Path:
    return next((root / "train" / patient).rglob("*.jpg"))


def test_unreadable_jpeg_names_the_file_and_can_be_skipped(tmp_path):
    root = ft.write_chexpert(tmp_path)
    broken = jpeg_of(root, "patient00004")
    truncate(broken)
    with pytest.raises(DataInputError, match=rf"{broken.name}: cannot be read as an image .*truncated or corrupt"):
        prepare_dataset(PrepareConfig(format="chexpert", resolution=16), root, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    text = jpeg_of(root, "patient00001")
    text.write_text("this is not an image")
    with pytest.warns(SkippedInputWarning):
        store = SliceStore(prepare_dataset(PrepareConfig(format="chexpert", resolution=16), root, tmp_path / "s", skip_bad=True, progress=False))
    with open(store.path / "skipped.csv", newline="") as f:
        skipped = sorted(Path(r["source"]).name for r in csv.DictReader(f))
    assert skipped == sorted([broken.name, text.name]) and len(store.subjects()) == 3


def test_csv_without_expected_columns(tmp_path):
    root = ft.write_chexpert(tmp_path)
    train_csv = root / "train.csv"
    with open(train_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(train_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in ft.CHEXPERT_COLUMNS if c != "Pleural Effusion"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataInputError, match=r"train.csv: missing column\(s\) \['Pleural Effusion'\]"):
        prepare_dataset(PrepareConfig(format="chexpert", resolution=16), root, tmp_path / "s", progress=False)
    with pytest.raises(DataInputError, match=r"valid.csv: missing column\(s\) \['Edema '\]"):
        prepare_dataset(PrepareConfig(format="chexpert", resolution=16, chexpert_finding="Edema ", chexpert_csv=("valid.csv",)), root, tmp_path / "s", progress=False)


def test_csv_row_pointing_to_a_missing_image(tmp_path):
    root = ft.write_chexpert(tmp_path)
    missing = root / "train" / "patient00002" / "study1" / "view1_frontal.jpg"
    missing.unlink()
    with pytest.raises(DataInputError, match=rf"{missing.name}: image file not found"):
        prepare_dataset(PrepareConfig(format="chexpert", resolution=16), root, tmp_path / "s", progress=False)


def test_folder_layout_mask_problems(tmp_path):
    root = ft.write_folder(tmp_path / "folder")
    (root / "masks" / "u2.png").unlink()
    with pytest.raises(DataInputError, match=r"u2.png: unhealthy image has no mask"):
        prepare_dataset(PrepareConfig(format="folder", resolution=16), root, tmp_path / "s", progress=False)
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "u2.png")
    with pytest.raises(DataInputError, match=r"masks/u2.png: mask has shape \(10, 10\), its image has \(30, 20\)"):
        prepare_dataset(PrepareConfig(format="folder", resolution=16), root, tmp_path / "s", progress=False)
    Image.fromarray(np.full((30, 20), 255, np.uint8)).save(root / "masks" / "h1.png")
    (root / "masks" / "u2.png").unlink()
    Image.fromarray(np.full((30, 20), 77, np.uint8)).save(root / "healthy" / "h2.png")
    with pytest.warns(SkippedInputWarning):
        store = SliceStore(prepare_dataset(PrepareConfig(format="folder", resolution=16), root, tmp_path / "s", skip_bad=True, progress=False))
    with open(store.path / "skipped.csv", newline="") as f:
        reasons = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}
    assert "is not empty" in reasons["h1.png"] and "constant" in reasons["h2.png"] and "no mask" in reasons["u2.png"]
    assert sorted(store.subjects()) == ["u1", "u3"]


def test_wrong_root_or_format(tmp_path):
    ft.write_brats2021(tmp_path / "b21", count=1)
    with pytest.raises(DataInputError, match="no subject found for --format atlas"):
        prepare_dataset(PrepareConfig(format="atlas"), tmp_path / "b21", tmp_path / "s", progress=False)
    with pytest.raises(DataInputError, match="dataset folder not found"):
        prepare_dataset(PrepareConfig(format="brats2021"), tmp_path / "nope", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
