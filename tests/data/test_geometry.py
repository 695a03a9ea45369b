"""Slices go back to the source scan's own voxel grid (and 2-D maps to the source image's pixels)."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

import fake_trees as ft
from anomalydiff.data import PrepareConfig, SliceStore, prepare_dataset, save_volume_nifti, slice_to_image, slices_to_volume
from anomalydiff.data.geometry import canonical_orientation, fit_image, from_canonical, to_canonical

CASE = "BraTS2021_00007"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("P", "S", "L"), ("S", "R", "A"), ("I", "L", "P")])
def test_orientation_matches_nibabel_as_closest_canonical(axcodes):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    image = nib.Nifti1Image(data, affine).as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes)))
    assert nib.aff2axcodes(image.affine) == axcodes
    file_data = np.asarray(image.dataobj)
    orientation = canonical_orientation(image.affine)
    canonical = to_canonical(file_data, orientation)
    np.testing.assert_array_equal(canonical, np.asarray(nib.as_closest_canonical(image).dataobj))
    np.testing.assert_array_equal(canonical, data)
    np.testing.assert_array_equal(from_canonical(canonical, orientation), file_data)


def write_oblique_free_case(root: Path, axcodes: tuple[str, str, str], lesion_radius: float = 5.0) -> Path:
    """A BraTS 2021 case stored with axes permuted and flipped (``axcodes``) and 1 x 1 x 2 mm voxels."""
    volumes, _ = ft.synthetic_subject(7)
    seg = ft.lesion_labels(ft.SHAPE, (10.0, 13.0, 5.0), lesion_radius, (1, 2, 4)) * ft.brain_ellipsoid()
    for name in volumes:
        volumes[name][seg > 0] = ft.CONTRAST[name][1]
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-12.0, 20.0, -5.0]
    for name, array in [*volumes.items(), ("seg", seg)]:
        image = nib.Nifti1Image(array, affine).as_reoriented(transform)
        image.set_qform(image.affine, 1)
        ft.save(np.asarray(image.dataobj), root / CASE / f"{CASE}_{name}.nii.gz", image.affine)
    return root


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("P", "S", "L")])
def test_slices_to_volume_is_exact_without_resize(tmp_path, axcodes):
    root = write_oblique_free_case(tmp_path / "data", axcodes)
    seg_file = root / CASE / f"{CASE}_seg.nii.gz"
    seg_image = nib.load(str(seg_file))
    assert nib.aff2axcodes(seg_image.affine) == axcodes
    store = SliceStore(prepare_dataset(PrepareConfig(format="brats2021", resolution=24), root, tmp_path / "s", progress=False))
    info = store.subjects()[CASE]
    assert info["in_plane_size"] == [24, 24] and info["original_shape"] == list(seg_image.shape)
    rows = [s.row for s in store.slices if s.subject_id == CASE]
    mask_volume = slices_to_volume(np.asarray(store.masks[rows], dtype=bool), info)
    assert mask_volume.dtype == bool and mask_volume.shape == seg_image.shape
    np.testing.assert_array_equal(mask_volume, seg_image.get_fdata() > 0)
    brain_volume = slices_to_volume(np.asarray(store.brain[rows], dtype=bool), info)
    flair = nib.load(str(root / CASE / f"{CASE}_flair.nii.gz")).get_fdata()
    np.testing.assert_array_equal(brain_volume, flair != 0)  # brain lies inside the kept slice range
    # a float map: the slice index of each slice, placed back along the file's own slice axis
    ramp = np.stack([np.full((24, 24), float(s.slice_index), np.float32) for s in (store.slices[r] for r in rows)])
    ramp_volume = slices_to_volume(ramp, info)
    canonical = to_canonical(ramp_volume, info["orientation"])
    assert np.all(canonical[:, :, 2:10] == np.arange(2, 10, dtype=np.float32)) and not canonical[:, :, :2].any()

    written = save_volume_nifti(mask_volume, info, tmp_path / "mask.nii.gz")
    reloaded = nib.load(str(written))
    np.testing.assert_allclose(reloaded.affine, seg_image.affine)
    np.testing.assert_array_equal(reloaded.get_fdata() > 0, seg_image.get_fdata() > 0)
    assert int(reloaded.header["qform_code"]) == 1


def test_slices_to_volume_after_resize(tmp_path):
    root = write_oblique_free_case(tmp_path / "data", ("P", "S", "L"), lesion_radius=6.0)
    seg = nib.load(str(root / CASE / f"{CASE}_seg.nii.gz")).get_fdata() > 0
    for resolution in (16, 48):
        store = SliceStore(prepare_dataset(PrepareConfig(format="brats2021", resolution=resolution), root, tmp_path / f"s{resolution}", progress=False))
        volume = slices_to_volume(np.asarray(store.masks[:], dtype=bool), store.subjects()[CASE])
        assert dice(volume, seg) > 0.95, resolution  # measured 0.974 (16) and 1.0 (48)
    # a subset of slices: the others come back empty
    subset = slices_to_volume(np.asarray(store.masks[:2], dtype=bool), store.subjects()[CASE], slice_indices=[2, 3])
    assert subset.sum() <= volume.sum()
    with pytest.raises(ValueError, match="S=3"):
        slices_to_volume(np.zeros((2, 48, 48), bool), store.subjects()[CASE], slice_indices=[2, 3, 4])


@pytest.mark.parametrize(("size", "mode", "resized", "pad"), [((40, 32), "pad", [16, 13], [0, 1]), ((30, 60), "pad", [8, 16], [4, 0]), ((40, 32), "stretch", [16, 16], [0, 0])])
def test_fit_image(size, mode, resized, pad):
    fit = fit_image(size, 16, mode)
    assert fit["resized_size"] == resized and fit["pad"] == pad and fit["original_size"] == list(size)


@pytest.mark.parametrize(("resolution", "mode", "minimum_dice"), [(30, "pad", 1.0), (16, "pad", 0.8), (16, "stretch", 0.8)])
def test_slice_to_image_back_to_source_pixels(tmp_path, resolution, mode, minimum_dice):
    root = ft.write_folder(tmp_path / "folder")
    store = SliceStore(prepare_dataset(PrepareConfig(format="folder", resolution=resolution, resize_2d=mode), root, tmp_path / "s", progress=False))
    info = store.subjects()["u1"]
    row = next(s.row for s in store.slices if s.subject_id == "u1")
    back = slice_to_image(np.asarray(store.masks[row], dtype=bool), info)
    original = np.zeros((30, 20), bool)
    original[10:18, 6:14] = True
    assert back.shape == (30, 20) and back.dtype == bool
    assert dice(back, original) >= minimum_dice
    float_map = slice_to_image(np.asarray(store.images[row, 0], dtype=np.float32), info)
    assert float_map.shape == (30, 20) and float_map.dtype == np.float32


def test_every_axis_permutation_round_trips():
    rng = np.random.default_rng(1)
    data = rng.random((3, 4, 5))
    for permutation in itertools.permutations(range(3)):
        for flips in itertools.product((1.0, -1.0), repeat=3):
            affine = np.zeros((4, 4))
            for file_axis, world_axis in enumerate(permutation):
                affine[world_axis, file_axis] = flips[file_axis]
            affine[3, 3] = 1.0
            orientation = canonical_orientation(affine)
            canonical = to_canonical(data, orientation)
            np.testing.assert_array_equal(canonical, np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj))
            np.testing.assert_array_equal(from_canonical(canonical, orientation), data)
