"""Every published layout (data.md), written as a tiny fake tree in its real naming, is discovered and prepared."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import fake_trees as ft
from anomalydiff.data import PrepareConfig, SliceStore, discover, prepare_dataset
from anomalydiff.data.layouts import canonical_modality
from anomalydiff.labels import HEALTHY, UNHEALTHY


def prepare(fmt: str, root: Path, out: Path, **fields) -> SliceStore:
    return SliceStore(prepare_dataset(PrepareConfig(format=fmt, **fields), root, out, progress=False))


def label_counts(store: SliceStore, subject: str) -> collections.Counter:
    return collections.Counter(s.label for s in store.slices if s.subject_id == subject)


def test_canonical_modality_names_agree_across_releases():
    assert [canonical_modality(n) for n in ("T2F", "FLAIR", "t1n", "T1w", "t1c", "t1gd", "T2w", "t2")] == [
        "flair", "flair", "t1", "t1", "t1ce", "t1ce", "t2", "t2"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown modality"):
        canonical_modality("dwi")


def test_brats2020_nii_and_gz_case_355_and_validation(tmp_path):
    root = ft.write_brats2020(tmp_path / "brats20")
    subjects = {s.subject_id: s for s in discover("brats2020", root).subjects}
    assert sorted(subjects) == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_355", "BraTS20_Validation_001"]
    assert subjects["BraTS20_Training_001"].modalities["flair"].path.name == "BraTS20_Training_001_flair.nii"
    assert subjects["BraTS20_Training_002"].modalities["t1ce"].path.name == "BraTS20_Training_002_t1ce.nii.gz"
    assert subjects["BraTS20_Training_355"].seg.name == "W39_1998.09.19_Segm.nii"  # the known defect
    assert subjects["BraTS20_Validation_001"].seg is None and not subjects["BraTS20_Validation_001"].seg_expected
    assert subjects["BraTS20_Training_001"].seg_expected

    store = prepare("brats2020", root, tmp_path / "store", resolution=16)
    assert store.modalities == ["flair", "t1", "t1ce", "t2"] and store.shape[1:] == (4, 16, 16)
    assert UNHEALTHY in label_counts(store, "BraTS20_Training_355")  # the misnamed seg was used
    assert set(label_counts(store, "BraTS20_Training_002")) == {HEALTHY}
    validation = [s for s in store.slices if s.subject_id == "BraTS20_Validation_001"]
    assert validation and all(s.label == -1 and not s.has_mask for s in validation)
    # unlabelled subjects never enter train/val
    assert "BraTS20_Validation_001" in store.split_subjects("test")
    assert store.subjects()["BraTS20_Training_355"]["seg_file"].endswith("W39_1998.09.19_Segm.nii")


def test_brats2021(tmp_path):
    root = ft.write_brats2021(tmp_path / "BraTS2021_Training_Data", count=3)
    found = discover("brats2021", root)
    assert [s.subject_id for s in found.subjects] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert found.subjects[0].seg.name == "BraTS2021_00000_seg.nii.gz"
    store = prepare("brats2021", root, tmp_path / "store", resolution=16)
    assert store.shape == (24, 4, 16, 16)  # 3 subjects x slices 2..9
    assert set(label_counts(store, "BraTS2021_00000")) == {HEALTHY}
    assert label_counts(store, "BraTS2021_00001")[UNHEALTHY] > 0
    assert all(s.has_mask for s in store.slices)
    for row in store.rows(label=UNHEALTHY):
        assert store.masks[row].any()
    for row in store.rows(label=HEALTHY):
        assert not store.masks[row].any()
    assert float(store.images.min()) == -1.0 and float(store.images.max()) == 1.0


def test_brats2023_gli_names_and_label_3(tmp_path):
    root = ft.write_brats2023(tmp_path / "gli", count=2)
    subject = discover("brats2023", root).subjects[0]
    assert subject.subject_id == "BraTS-GLI-00000-000"
    assert {k: v.path.name for k, v in subject.modalities.items()} == {
        "flair": "BraTS-GLI-00000-000-t2f.nii.gz", "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
        "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz", "t2": "BraTS-GLI-00000-000-t2w.nii.gz",
    }  # fmt: skip
    assert 3 in subject.allowed_labels
    store = prepare("brats2023", root, tmp_path / "store", resolution=16)
    assert label_counts(store, "BraTS-GLI-00000-000")[UNHEALTHY] > 0
    # t2f is stored as "flair": it must hold the FLAIR contrast (lesion 260 vs brain 100 -> bright lesion)
    flair_file = nib.load(str(subject.modalities["flair"].path)).get_fdata()
    assert flair_file.max() == pytest.approx(260.0)


def test_msd_4d_channels_follow_dataset_json(tmp_path):
    root = ft.write_msd(tmp_path / "msd", train=2, test=1)
    subjects = {s.subject_id: s for s in discover("msd", root).subjects}
    assert sorted(subjects) == ["BRATS_001", "BRATS_002", "BRATS_003"]  # the "._" junk file is not a subject
    assert {k: v.channel for k, v in subjects["BRATS_001"].modalities.items()} == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    assert subjects["BRATS_003"].seg is None and not subjects["BRATS_003"].seg_expected
    store = prepare("msd", root / "Task01_BrainTumour", tmp_path / "store", resolution=16, modalities=("t2", "flair"))
    assert store.modalities == ["t2", "flair"]
    assert all(s.label == -1 for s in store.slices if s.subject_id == "BRATS_003")

    # the same volumes written as BraTS 2021 files give identical slices: MSD channel mapping is right
    volumes, seg = ft.synthetic_subject(301, labels=(2, 1, 3))
    case = tmp_path / "b21" / "BraTS2021_00001"
    for name, volume in volumes.items():
        ft.save(volume, case / f"BraTS2021_00001_{name}.nii.gz")
    ft.save(np.where(seg > 0, 1, 0).astype(np.int16), case / "BraTS2021_00001_seg.nii.gz")
    reference = prepare("brats2021", tmp_path / "b21", tmp_path / "store_b21", resolution=16, modalities=("t2", "flair"))
    msd_rows = [s.row for s in store.slices if s.subject_id == "BRATS_001"]
    np.testing.assert_array_equal(np.asarray(store.images[msd_rows]), np.asarray(reference.images[:]))
    np.testing.assert_array_equal(np.asarray(store.masks[msd_rows]), np.asarray(reference.masks[:]))


def test_atlas_bids_training_testing_and_brain_mask(tmp_path):
    root = ft.write_atlas(tmp_path / "atlas", train=2, test=1, brain_masks=True)
    subjects = {s.subject_id: s for s in discover("atlas", root).subjects}
    assert sorted(subjects) == ["sub-r001s001", "sub-r001s002", "sub-r001s003"]
    assert subjects["sub-r001s001"].seg.name == "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"
    assert subjects["sub-r001s003"].seg is None and not subjects["sub-r001s003"].seg_expected  # Testing/
    assert subjects["sub-r001s001"].brain_mask.name.endswith("_desc-brain_mask.nii.gz")

    store = prepare("atlas", root, tmp_path / "store", resolution=24)
    assert store.modalities == ["t1"]
    brain = ft.brain_ellipsoid()
    rows = [s.row for s in store.slices if s.subject_id == "sub-r001s001"]
    # RAS affine: canonical = file order, so the stored brain mask is the ellipsoid itself (no resize at 24)
    np.testing.assert_array_equal(np.asarray(store.brain[rows]), np.moveaxis(brain[..., 2:10], -1, 0))
    # skull stripped: outside the brain mask the image is at its minimum (-1)
    images = np.asarray(store.images[rows, 0], dtype=np.float32)
    assert np.all(images[~np.asarray(store.brain[rows], dtype=bool)] == -1.0)
    assert all(s.label == -1 for s in store.slices if s.subject_id == "sub-r001s003")

    # without brain masks the skull shell stays in the image and in the foreground
    root2 = ft.write_atlas(tmp_path / "atlas2", train=1, test=0)
    store2 = prepare("atlas", root2, tmp_path / "store2", resolution=24)
    assert np.asarray(store2.brain[:]).sum() > np.asarray(store.brain[rows]).sum()


def test_atlas_global_brain_mask_must_fit_the_grid(tmp_path):
    root = ft.write_atlas(tmp_path / "atlas", train=1, test=0)
    with pytest.raises(Exception, match="MNI152.*shape|shape.*MNI152"):
        prepare("atlas", root, tmp_path / "store", brain_mask="mni152")
    mask = ft.save(ft.brain_ellipsoid().astype(np.uint8), tmp_path / "brainmask.nii.gz", ft.RAS_AFFINE)
    store = prepare("atlas", root, tmp_path / "store", resolution=24, brain_mask=str(mask))
    assert store.subjects()["sub-r001s001"]["brain_mask_file"] == str(mask)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("ignore", {"patient00001": [0], "patient00002": [1], "patient00004": [0], "patient64541": [1], "patient64542": [0]}),
        ("healthy", {"patient00001": [0], "patient00002": [1, 0], "patient00004": [0], "patient64541": [1], "patient64542": [0]}),
        ("unhealthy", {"patient00001": [0], "patient00002": [1, 1], "patient00004": [0], "patient64541": [1], "patient64542": [0]}),
    ],
)
def test_chexpert_uncertain_policy(tmp_path, policy, expected):
    root = ft.write_chexpert(tmp_path)
    found = discover("chexpert", root, chexpert_uncertain=policy)
    assert {s.subject_id: [i.label for i in s.items] for s in found.subjects} == expected
    assert found.notes["rows_neither"] == 1 and found.notes["rows_other_view"] == 1
    # the CSV Path's "CheXpert-v1.0-small/" prefix resolves against the release folder
    assert all(i.path.is_file() for s in found.subjects for i in s.items)


def test_chexpert_prepare_from_parent_folder_and_views(tmp_path):
    ft.write_chexpert(tmp_path / "data")
    store = prepare("chexpert", tmp_path / "data", tmp_path / "store", resolution=16, chexpert_view="all")
    assert store.modalities == ["gray"] and store.shape[1:] == (1, 16, 16)
    info = store.subjects()["patient00001"]
    assert len(info["images"]) == 2 and info["images"][0]["original_size"] == [40, 32]
    assert [s.slice_index for s in store.slices if s.subject_id == "patient00001"] == [0, 1]
    assert not any(s.has_mask for s in store.slices)
    # pad mode: 40x32 -> 16x13 (rounded), centred with one column of padding on the left
    assert info["images"][0]["resized_size"] == [16, 13] and info["images"][0]["pad"] == [0, 1]
    brain = np.asarray(store.brain[0], dtype=bool)
    assert brain[:, 1:14].all() and not brain[:, 0].any() and not brain[:, 14:].any()
    image = np.asarray(store.images[0, 0], dtype=np.float32)
    assert image[brain].min() == -1.0 and image[brain].max() == 1.0 and np.all(image[~brain] == -1.0)
    assert json.loads((store.path / "store.json").read_text())["discovery"]["rows_used"] == 6


def test_folder_layout_with_masks_and_subject_regex(tmp_path):
    root = ft.write_folder(tmp_path / "folder")
    store = prepare("folder", root, tmp_path / "store", resolution=16, resize_2d="stretch")
    by_subject = {s.subject_id: s for s in store.slices}
    assert sorted(by_subject) == ["h1", "h2", "u1", "u2", "u3"]
    assert by_subject["u3"].label == UNHEALTHY and by_subject["h1"].label == HEALTHY
    assert all(s.has_mask for s in store.slices)
    assert np.asarray(store.masks[by_subject["u1"].row]).any() and not np.asarray(store.masks[by_subject["h1"].row]).any()
    assert np.asarray(store.brain[:]).all()  # stretch: the body mask is the whole image

    grouped = discover("folder", root, folder_subject_regex=r"^([hu])\d")
    assert [(s.subject_id, len(s.items)) for s in grouped.subjects] == [("h", 2), ("u", 3)]


def test_folder_without_masks_has_no_pixel_labels(tmp_path):
    root = ft.write_folder(tmp_path / "folder", with_masks=False)
    store = prepare("folder", root, tmp_path / "store", resolution=16)
    assert not any(s.has_mask for s in store.slices)
    assert sorted(collections.Counter(s.label for s in store.slices).items()) == [(HEALTHY, 2), (UNHEALTHY, 3)]
