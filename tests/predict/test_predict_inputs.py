"""Every input form predict accepts is found and loaded as the right channels; bad inputs fail or warn clearly;
predict prepares a scan exactly like `anomalydiff prepare` prepared the training store."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from predict_helpers import record_for, save_nifti

from anomalydiff.data import PrepareConfig, SliceStore, prepare_dataset
from anomalydiff.data.volumes import DataInputError
from anomalydiff.predict.inputs import (
    InputWarning,
    discover_inputs,
    load_subject,
    loaded_from_array,
    prepare_loaded,
    read_preprocess,
    write_preprocess,
)

CASE = "BraTS2021_00002"
BRATS = record_for()  # channels flair, t1, t1ce, t2
ATLAS = record_for("atlas")  # t1
GRAY = record_for("folder")  # 2-D gray


def load(path: Path, modality: str) -> np.ndarray:
    return nib.load(str(path / CASE / f"{CASE}_{modality}.nii.gz")).get_fdata(dtype=np.float32)


def only(subjects: list) -> object:
    assert len(subjects) == 1
    return subjects[0]


def test_brats_subject_folder_and_release_folder(brats_root: Path) -> None:
    everyone = discover_inputs([brats_root], BRATS)
    assert [s.subject_id for s in everyone] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    subject = only(discover_inputs([brats_root / CASE], BRATS))
    loaded = load_subject(subject, BRATS)
    assert list(loaded.arrays) == ["flair", "t1", "t1ce", "t2"]
    for name in loaded.arrays:
        np.testing.assert_array_equal(loaded.arrays[name], load(brats_root, name))
    np.testing.assert_allclose(loaded.affine, nib.load(str(brats_root / CASE / f"{CASE}_flair.nii.gz")).affine)


def test_brats2023_and_brats2020_names_give_the_same_channels(brats_root: Path, tmp_path: Path) -> None:
    names_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    case23, case20 = "BraTS-GLI-00002-000", "BraTS20_Training_002"
    for modality, suffix in names_2023.items():
        image = nib.load(str(brats_root / CASE / f"{CASE}_{modality}.nii.gz"))
        save_nifti(np.asarray(image.dataobj), image.affine, tmp_path / "b23" / case23 / f"{case23}-{suffix}.nii.gz")
        save_nifti(np.asarray(image.dataobj), image.affine, tmp_path / "b20" / case20 / f"{case20}_{modality}.nii")
    for root, case in ((tmp_path / "b23", case23), (tmp_path / "b20", case20)):
        loaded = load_subject(only(discover_inputs([root / case], BRATS)), BRATS)
        assert loaded.subject_id == case
        for name in BRATS.channels:
            np.testing.assert_array_equal(loaded.arrays[name], load(brats_root, name))


def test_atlas_bids_subject_and_tree(atlas_root: Path) -> None:
    anat = min(atlas_root.rglob("anat"))
    subject_folder = anat.parents[1]
    assert subject_folder.name.startswith("sub-")
    for given in (subject_folder, anat, atlas_root):
        subjects = discover_inputs([given], ATLAS)
        assert subjects[0].subject_id == subject_folder.name
    assert len(discover_inputs([atlas_root], ATLAS)) == 2
    t1 = min(anat.glob("*_T1w.nii.gz"))
    loaded = load_subject(only(discover_inputs([t1], ATLAS)), ATLAS)  # the T1w file alone
    np.testing.assert_array_equal(loaded.arrays["t1"], nib.load(str(t1)).get_fdata(dtype=np.float32))


@pytest.mark.parametrize("with_json", [True, False])
def test_msd_4d_volume_channels_follow_dataset_json(brats_root: Path, tmp_path: Path, with_json: bool) -> None:
    order = ["T1w", "FLAIR", "T2w", "t1gd"] if with_json else ["FLAIR", "T1w", "t1gd", "T2w"]
    canonical = {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}
    stacked = np.stack([load(brats_root, canonical[name]) for name in order], axis=-1)
    affine = nib.load(str(brats_root / CASE / f"{CASE}_flair.nii.gz")).affine
    task = tmp_path / "Task01_BrainTumour"
    image = save_nifti(stacked, affine, task / "imagesTs" / "BRATS_777.nii.gz")
    if with_json:
        (task / "dataset.json").write_text(json.dumps({"modality": {str(i): n for i, n in enumerate(order)},
                                                       "labels": {"0": "bg"}, "training": [],
                                                       "test": ["./imagesTs/BRATS_777.nii.gz"]}))
    loaded = load_subject(only(discover_inputs([image], BRATS)), BRATS)
    assert loaded.subject_id == "BRATS_777"
    for name in BRATS.channels:
        np.testing.assert_array_equal(loaded.arrays[name], load(brats_root, name))
    if with_json:  # the task folder works too
        assert [s.subject_id for s in discover_inputs([task], BRATS)] == ["BRATS_777"]


def test_named_single_modality_files(brats_root: Path) -> None:
    items = [f"{m}={brats_root / CASE / f'{CASE}_{m}.nii.gz'}" for m in ("t2", "flair", "t1ce", "t1")]
    subject = only(discover_inputs(items, BRATS))
    assert subject.subject_id == CASE  # common prefix of the file names
    loaded = load_subject(subject, BRATS)
    for name in BRATS.channels:
        np.testing.assert_array_equal(loaded.arrays[name], load(brats_root, name))
    assert only(discover_inputs(items, BRATS, subject_id="patient 7")).subject_id == "patient_7"


def test_single_files_and_a_folder_of_files_for_one_channel_models(atlas_root: Path, tmp_path: Path) -> None:
    for k, t1 in enumerate(sorted(atlas_root.rglob("*_T1w.nii.gz"))):
        shutil.copy(t1, tmp_path / f"scan{k}.nii.gz")
    subjects = discover_inputs([tmp_path], ATLAS)
    assert [s.subject_id for s in subjects] == ["scan0", "scan1"]
    assert only(discover_inputs([tmp_path / "scan1.nii.gz"], ATLAS)).subject_id == "scan1"


def test_2d_images_folders_and_chexpert(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = (rng.random((40, 30)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "one.png")
    Image.fromarray(np.stack([pixels] * 3, -1)).save(tmp_path / "two.jpg", quality=95)
    (tmp_path / "masks").mkdir()
    Image.fromarray(pixels).save(tmp_path / "masks" / "one.png")  # masks/ is not an input
    subjects = discover_inputs([tmp_path], GRAY)
    assert [s.subject_id for s in subjects] == ["one", "two"]
    loaded = load_subject(subjects[0], GRAY)
    np.testing.assert_array_equal(loaded.arrays["image"][0], pixels.astype(np.float32))
    assert load_subject(subjects[1], GRAY).arrays["image"].shape == (1, 40, 30)
    # CheXpert: the CSV's Path column (with the release prefix), frontal views only as the training store
    root = tmp_path / "CheXpert-v1.0-small"
    for patient, view in (("patient00001", "view1_frontal"), ("patient00001", "view2_lateral"), ("patient00002", "view1_frontal")):
        (root / "valid" / patient / "study1").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "valid" / patient / "study1" / f"{view}.jpg")
    with open(root / "valid.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Frontal/Lateral", "No Finding", "Pleural Effusion"])
        for patient, view in (("patient00001", "view1_frontal"), ("patient00001", "view2_lateral"), ("patient00002", "view1_frontal")):
            writer.writerow([f"CheXpert-v1.0-small/valid/{patient}/study1/{view}.jpg", view.split("_")[1].title(), "1.0", ""])
    chexpert = record_for("chexpert")
    ids = [s.subject_id for s in discover_inputs([root], chexpert)]
    assert ids == ["patient00001_study1_view1_frontal", "patient00002_study1_view1_frontal"]
    assert len(load_subject(discover_inputs([root / "valid.csv"], chexpert)[0], chexpert).arrays["image"]) == 1


def test_missing_modality_names_the_file(brats_root: Path, tmp_path: Path) -> None:
    shutil.copytree(brats_root / CASE, tmp_path / CASE)
    (tmp_path / CASE / f"{CASE}_t2.nii.gz").unlink()
    subject = only(discover_inputs([tmp_path / CASE], BRATS))
    with pytest.raises(DataInputError, match=r"modality t2 .* missing") as info:
        load_subject(subject, BRATS)
    assert info.value.source.endswith(f"{CASE}_t2.nii.gz")
    with pytest.raises(DataInputError, match="modality t1ce"):
        load_subject(discover_inputs([f"flair={tmp_path / CASE / f'{CASE}_flair.nii.gz'}",
                                      f"t1={tmp_path / CASE / f'{CASE}_t1.nii.gz'}"], BRATS)[0], BRATS)


def test_wrong_number_of_channels(brats_root: Path, tmp_path: Path) -> None:
    flair = brats_root / CASE / f"{CASE}_flair.nii.gz"
    with pytest.raises(DataInputError, match=r"wrong number of channels.*takes 4 channels.*--input flair=FILE"):
        discover_inputs([flair], BRATS)
    three = np.stack([load(brats_root, m) for m in ("flair", "t1", "t2")], axis=-1)
    path = save_nifti(three, nib.load(str(flair)).affine, tmp_path / "three.nii.gz")
    with pytest.raises(DataInputError, match="wrong number of channels: the 4-D volume has 3 channels"):
        discover_inputs([path], BRATS)
    with pytest.raises(DataInputError, match="wrong number of channels"):
        loaded_from_array(three, BRATS)
    Image.fromarray(np.zeros((8, 8), np.uint8) + 9).save(tmp_path / "x.png")
    with pytest.raises(DataInputError, match="2-D image but the model was trained on 3-D scans"):
        discover_inputs([tmp_path / "x.png"], BRATS)


def test_odd_intensities_warn_but_load(brats_root: Path, tmp_path: Path) -> None:
    image = nib.load(str(brats_root / CASE / f"{CASE}_t1.nii.gz"))
    data = image.get_fdata(dtype=np.float32)
    ct = np.where(data > 0, data - 1000.0, -1000.0)  # CT-like Hounsfield units
    path = save_nifti(ct, image.affine, tmp_path / "ct.nii.gz")
    with pytest.warns(InputWarning) as caught:
        loaded = load_subject(only(discover_inputs([path], ATLAS)), ATLAS)
    assert any("negative" in str(w.message) and "CT" in str(w.message) for w in caught)
    assert loaded.warnings == [str(w.message) for w in caught]
    labels = save_nifti((data > np.percentile(data, 90)).astype(np.float32) * 2, image.affine, tmp_path / "labels.nii.gz")
    with pytest.warns(InputWarning, match="label map"):
        load_subject(only(discover_inputs([labels], ATLAS)), ATLAS)
    with pytest.warns(InputWarning, match="non-zero.*no background"):
        loaded_from_array(data + 50.0, ATLAS, image.affine)
    Image.fromarray(np.where(np.arange(64)[None, :] < 40, 255, 10).astype(np.uint8).repeat(64, 0)).save(tmp_path / "sat.png")
    with pytest.warns(InputWarning, match="saturated"):
        load_subject(only(discover_inputs([tmp_path / "sat.png"], GRAY)), GRAY)


def test_preprocessing_matches_the_training_store_and_records_round_trip(brats_root: Path, tmp_path: Path) -> None:
    config = PrepareConfig(format="brats2021", resolution=32, split_counts=(1, 1, 1))
    store = SliceStore(prepare_dataset(config, brats_root, tmp_path / "store", progress=False))
    record = read_preprocess(store.path)
    assert record.channels == ("flair", "t1", "t1ce", "t2") and record.prepare == config
    written = write_preprocess(store.path / "store.json", tmp_path / "model")
    again = read_preprocess(written)
    assert again.prepare == config and again.store == str(store.path.resolve())
    assert read_preprocess(tmp_path / "model").same_preprocessing(record)
    for subject in discover_inputs([brats_root], record):
        slices, info = prepare_loaded(load_subject(subject, record), record)
        rows = [s.row for s in store.slices if s.subject_id == subject.subject_id]
        expected = store.subjects()[subject.subject_id]
        assert slices.slice_indices == [store.slices[r].slice_index for r in rows]
        np.testing.assert_allclose(slices.images, np.asarray(store.images[rows], np.float32), atol=1e-3)  # store is float16
        np.testing.assert_array_equal(slices.brain, np.asarray(store.brain[rows], bool))
        for key in ("original_shape", "affine", "orientation", "canonical_shape", "slice_range", "in_plane_size"):
            assert info[key] == expected[key]
