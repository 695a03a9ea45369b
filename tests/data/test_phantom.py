"""The built-in brain phantom (spec data.md): layouts, geometry, labels, determinism, contrasts, CLI.

Everything runs on coarse grids (--voxel-size 2 or 3, the documented fast-test setting) except the 1 mm
geometry checks, which need no generation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from anomalydiff.data import phantom
from anomalydiff.data.phantom import (
    BRATS_AFFINE,
    PhantomConfig,
    generate_subject,
    load_anatomy,
    output_geometry,
    save_montage,
    subject_files,
    subject_id,
    write_phantom_dataset,
)

FAST = PhantomConfig(voxel_size=3.0)
# Tumours big enough to keep every compartment at 2 mm, and always present.
SICK = PhantomConfig(voxel_size=2.0, lesion_free_fraction=0.0, tumour_radius_mm=(12.0, 20.0),
                     non_enhancing_probability=0.0)


@pytest.fixture(scope="module")
def anatomy() -> phantom.Anatomy:
    return load_anatomy()


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------- anatomy


def test_anatomy_is_nilearns_mni152_at_1mm(anatomy: phantom.Anatomy) -> None:
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    gm_ref = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    assert anatomy.mask.shape == (197, 233, 189) == mask_img.shape
    np.testing.assert_array_equal(anatomy.affine, mask_img.affine)
    inside = anatomy.mask > 0
    np.testing.assert_array_equal(inside, mask_img.get_fdata() > 0.5)
    # GM is nilearn's map inside the brain (rescaled only where GM + WM > 1, 0.02 % of voxels)
    close = np.isclose(anatomy.gm[inside], gm_ref[inside], atol=1e-6)
    assert close.mean() > 0.999
    assert np.all(anatomy.gm + anatomy.wm <= 1.0 + 1e-6)
    assert not anatomy.gm[~inside].any() and not anatomy.wm[~inside].any()


# ---------------------------------------------------------------------------------- layout & geometry


def test_geometry_at_1mm_is_the_real_datasets(anatomy: phantom.Anatomy) -> None:
    shape, affine = output_geometry("brats", 1.0)
    assert shape == (240, 240, 155)
    np.testing.assert_array_equal(affine, BRATS_AFFINE)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    shape, affine = output_geometry("atlas", 1.0)
    assert shape == (197, 233, 189)
    np.testing.assert_array_equal(affine, anatomy.affine)
    # coarse grids cover the same field of view: world centre of the box is unchanged
    for layout in ("brats", "atlas"):
        s1, a1 = output_geometry(layout, 1.0)
        s3, a3 = output_geometry(layout, 3.0)
        c1 = a1[:3, :3] @ ((np.array(s1) - 1) / 2) + a1[:3, 3]
        c3 = a3[:3, :3] @ ((np.array(s3) - 1) / 2) + a3[:3, 3]
        assert np.abs(c1 - c3).max() <= 1.5
        assert np.allclose(np.abs(np.diag(a3)[:3]), 3.0)


def test_subject_ids_and_paths_match_the_real_datasets(tmp_path: Path) -> None:
    assert subject_id("brats", 0) == "BraTS2021_00000"
    assert subject_id("brats", 1234) == "BraTS2021_01234"
    assert subject_id("atlas", 0) == "sub-r001s001"
    assert subject_id("atlas", 24) == "sub-r001s025"
    assert subject_id("atlas", 25) == "sub-r002s001"
    files = subject_files(tmp_path, "brats", 7)
    assert {k: str(v.relative_to(tmp_path)) for k, v in files.items()} == {
        m: f"BraTS2021_00007/BraTS2021_00007_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg")
    }
    files = subject_files(tmp_path, "atlas", 25)
    stem = "Training/R002/sub-r002s001/ses-1/anat/sub-r002s001_ses-1_space-MNI152NLin2009aSym"
    assert str(files["t1w"].relative_to(tmp_path)) == f"{stem}_T1w.nii.gz"
    assert str(files["seg"].relative_to(tmp_path)) == f"{stem}_label-L_desc-T1lesion_mask.nii.gz"
    with pytest.raises(ValueError, match="unknown phantom layout"):
        subject_id("msd", 0)  # type: ignore[arg-type]


def test_brats_dataset_on_disk(tmp_path: Path) -> None:
    out = write_phantom_dataset(FAST, tmp_path / "brats", "brats", subjects=2, seed=5, progress=False)
    assert _files_under(out) == sorted(
        ["phantom.json"]
        + [f"BraTS2021_0000{k}/BraTS2021_0000{k}_{m}.nii.gz" for k in (0, 1)
           for m in ("flair", "t1", "t1ce", "t2", "seg")]
    )
    shape, affine = output_geometry("brats", 3.0)
    for k in (0, 1):
        files = subject_files(out, "brats", k)
        seg = nib.load(files["seg"])
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}
        for m in ("flair", "t1", "t1ce", "t2"):
            img = nib.load(files[m])
            assert img.shape == shape
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            assert img.get_data_dtype() == np.int16
            data = np.asarray(img.dataobj)
            assert data.min() == 0 and 100 < data.max() < 3000  # scanner-like positive units, 0 outside
            assert data[0, 0, 0] == 0 and 0.1 < (data > 0).mean() < 0.3  # brain ~16 % of the BraTS box
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["layout"] == "brats" and meta["seed"] == 5 and len(meta["subject_list"]) == 2


def test_atlas_dataset_on_disk(tmp_path: Path, anatomy: phantom.Anatomy) -> None:
    config = replace(FAST, lesion_free_fraction=0.0)
    out = write_phantom_dataset(config, tmp_path / "atlas", "atlas", subjects=2, seed=1, progress=False)
    shape, affine = output_geometry("atlas", 3.0)
    for k in (0, 1):
        files = subject_files(out, "atlas", k)
        t1w, mask = nib.load(files["t1w"]), nib.load(files["seg"])
        assert t1w.shape == mask.shape == shape
        np.testing.assert_allclose(t1w.affine, affine, atol=1e-5)
        assert t1w.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) == {0, 1}
        assert np.all(np.asarray(t1w.dataobj)[labels > 0] > 0)  # lesions lie inside the brain
    # the ATLAS grid and the template grid coincide at 1 mm: voxel (i, j, k) is the same mm point
    assert output_geometry("atlas", 1.0)[0] == anatomy.mask.shape


# ------------------------------------------------------------------------------------- determinism


def test_subject_depends_only_on_seed_and_index(tmp_path: Path, anatomy: phantom.Anatomy) -> None:
    a = generate_subject(FAST, "brats", 11, 3, anatomy)
    b = generate_subject(FAST, "brats", 11, 3, anatomy)
    for m in a.volumes:
        np.testing.assert_array_equal(a.volumes[m], b.volumes[m])
    np.testing.assert_array_equal(a.seg, b.seg)
    other = generate_subject(FAST, "brats", 12, 3, anatomy)
    assert not np.array_equal(a.volumes["t1"], other.volumes["t1"])
    # N = 2 and N = 3 share their first two subjects, file for file
    small = write_phantom_dataset(FAST, tmp_path / "n2", "atlas", 2, seed=4, progress=False)
    large = write_phantom_dataset(FAST, tmp_path / "n3", "atlas", 3, seed=4, progress=False)
    for k in (0, 1):
        for name, path in subject_files(small, "atlas", k).items():
            twin = subject_files(large, "atlas", k)[name]
            np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(twin).dataobj))


# --------------------------------------------------------------------------------------- lesions


def test_lesion_free_fraction(anatomy: phantom.Anatomy) -> None:
    healthy = replace(FAST, lesion_free_fraction=1.0)
    sick = replace(FAST, lesion_free_fraction=0.0)
    for k in range(2):
        for layout in ("brats", "atlas"):
            subject = generate_subject(healthy, layout, 2, k, anatomy)
            assert not subject.seg.any() and not subject.has_lesion and subject.lesions == []
            assert all(v.max() > 0 for v in subject.volumes.values())
            assert generate_subject(sick, layout, 2, k, anatomy).has_lesion


def _surrounding_white_matter(subject: phantom.PhantomSubject, voxel_mm: float) -> np.ndarray:
    """Normal WM (fraction > 0.9) 3-20 mm from the lesion: the local reference under the same bias field."""
    distance = ndi.distance_transform_edt(subject.seg == 0) * voxel_mm
    return (subject.tissue["wm"] > 0.9) & (subject.seg == 0) & (distance > 3) & (distance < 20)


def test_tumour_contrast_signs_per_modality(anatomy: phantom.Anatomy) -> None:
    seen: set[int] = set()
    for k in range(3):
        subject = generate_subject(SICK, "brats", 7, k, anatomy)
        seg = subject.seg
        seen |= set(np.unique(seg).tolist())
        ring = _surrounding_white_matter(subject, SICK.voxel_size)
        assert ring.sum() > 100
        mean = {m: {lab: float(v[seg == lab].mean()) / float(v[ring].mean()) for lab in (1, 2, 4)
                    if (seg == lab).any()} for m, v in subject.volumes.items()}
        assert 2 in mean["flair"] and 1 in mean["t1"], f"subject {k} lacks edema or core: {mean}"
        assert mean["flair"][2] > 1.05, mean  # edema bright on FLAIR
        assert mean["t2"][2] > 1.2, mean  # edema bright on T2
        assert mean["t1"][1] < 0.9, mean  # necrotic / non-enhancing core dark on T1
        if 4 in mean["t1ce"]:
            assert mean["t1ce"][4] > 1.05, mean  # enhancing rim bright on T1ce
            assert mean["t1ce"][4] > mean["t1ce"][1] + 0.2, mean  # ... and brighter than the core
            assert mean["t1"][4] < mean["t1ce"][4], mean  # enhancement is a T1ce effect
        # not trivial: on T2 the brightest voxels are normal CSF, not the tumour
        t2 = subject.volumes["t2"].astype(np.float64)
        csf = (subject.tissue["csf"] > 0.9) & (seg == 0)
        assert np.percentile(t2[csf], 90) > np.median(t2[seg == 2])
    assert seen == {0, 1, 2, 4}


def _dice_with_moment_ellipsoid(mask: np.ndarray) -> float:
    """Dice between a mask and the solid ellipsoid with the same centroid and second moments."""
    idx = np.argwhere(mask).astype(float)
    centred = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1) - idx.mean(0)
    inv = np.linalg.inv(5.0 * np.cov(idx.T))  # a solid ellipsoid with semi-axis a has variance a^2 / 5
    ellipsoid = np.einsum("...i,ij,...j->...", centred, inv, centred) <= 1.0
    return float(2.0 * (ellipsoid & mask).sum() / (ellipsoid.sum() + mask.sum()))


def test_moment_ellipsoid_dice_recognises_an_ellipsoid() -> None:
    grid = np.stack(np.meshgrid(*[np.arange(30)] * 3, indexing="ij"), -1) - 14.5
    assert _dice_with_moment_ellipsoid(((grid / np.array([8.0, 6.0, 5.0])) ** 2).sum(-1) <= 1.0) > 0.98


def test_tumours_are_irregular_and_mostly_in_white_matter(anatomy: phantom.Anatomy) -> None:
    in_wm = 0
    for k in range(4):
        subject = generate_subject(SICK, "brats", 3, k, anatomy)
        core = np.isin(subject.seg, (1, 4))
        # not flat ellipses: a voxelised ellipsoid scores > 0.98 (test above)
        assert _dice_with_moment_ellipsoid(core) < 0.9
        assert _dice_with_moment_ellipsoid(subject.seg > 0) < 0.9
        brain = (subject.tissue["gm"] + subject.tissue["wm"] + subject.tissue["csf"]) > 0.5
        in_wm += subject.tissue["wm"][core].mean() > subject.tissue["wm"][brain].mean()
    assert in_wm >= 3


def test_mass_effect_is_an_incompressible_radial_push() -> None:
    # hand-computed: tissue now at radius r came from r_src with r_src^3 = r^3 - k^3 (volume conservation)
    centre = np.array([1.0, 2.0, 3.0])
    points = centre[:, None] + np.array([[10.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 3.0]]).T
    src = phantom._radial_source(points, centre, 5.0)
    radii = np.linalg.norm(src - centre[:, None], axis=0)
    np.testing.assert_allclose(radii, [np.cbrt(1000 - 125), np.cbrt(8000 - 125), 0.0], atol=1e-5)
    # directions are preserved (pure radial push) and k < 0 pulls tissue outward instead
    np.testing.assert_allclose(src[:, 0] - centre, [np.cbrt(875), 0, 0], atol=1e-5)
    pulled = phantom._radial_source(points[:, :1], centre, -5.0)
    np.testing.assert_allclose(np.linalg.norm(pulled - centre[:, None]), np.cbrt(1125), atol=1e-5)


def test_strokes_are_dark_on_t1w(anatomy: phantom.Anatomy) -> None:
    config = replace(SICK, stroke_radius_mm=(10.0, 25.0), lacune_probability=0.0)
    for k in range(2):
        subject = generate_subject(config, "atlas", 9, k, anatomy)
        assert set(np.unique(subject.seg)) == {0, 1}
        t1w = subject.volumes["t1w"]
        ring = _surrounding_white_matter(subject, config.voxel_size)
        assert t1w[subject.seg == 1].mean() < 0.75 * t1w[ring].mean()
        assert all(les["kind"] == "stroke" for les in subject.lesions)


# ----------------------------------------------------------------------------------- writing / CLI


def test_refuses_non_empty_folder_and_overwrites_on_request(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty"):
        write_phantom_dataset(FAST, out, "brats", 1, seed=0, progress=False)
    write_phantom_dataset(FAST, out, "brats", 1, seed=0, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "user file"
    assert subject_files(out, "brats", 0)["seg"].exists()


def test_killed_write_leaves_no_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies_mid_write(image: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a gzip stream")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(phantom.nib, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(FAST, tmp_path / "d", "brats", 1, seed=0, progress=False)
    assert [p for p in (tmp_path / "d").rglob("*") if p.is_file()] == []


def test_cli_round_trip(tmp_path: Path) -> None:
    from anomalydiff.cli import app

    runner = CliRunner()
    out, png = tmp_path / "atlas", tmp_path / "montage.png"
    args = ["phantom", "--layout", "atlas", "--subjects", "2", "--out", str(out), "--seed", "3",
            "--voxel-size", "3", "--lesion-free-fraction", "0.5", "--montage", str(png), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for k in (0, 1):
        assert all(p.exists() for p in subject_files(out, "atlas", k).values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["config"]["voxel_size"] == 3.0 and meta["config"]["lesion_free_fraction"] == 0.5
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_montage_reads_back_brats(tmp_path: Path) -> None:
    out = write_phantom_dataset(replace(FAST, lesion_free_fraction=0.5), tmp_path / "b", "brats", 3, seed=2,
                                progress=False)
    png = save_montage(out, "brats", tmp_path / "m.png", rows=3)
    assert png.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="write the dataset first"):
        save_montage(tmp_path / "empty", "brats", tmp_path / "x.png")
