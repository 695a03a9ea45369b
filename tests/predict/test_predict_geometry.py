"""Maps and masks land on the input's own grid voxel for voxel, whatever its affine and orientation.

An "oracle" noise model makes DDIB's map exactly the lesion the model saw: the scan's only channel is 200 in
tissue and 100 in the lesion, so after preprocessing a slice pixel is darker than 0.5 exactly where the
bilinearly resized lesion mask (> 0.5) is, and the oracle heals exactly those pixels (map ~0.05-4 there,
< 1e-5 elsewhere). The predicted mask is then compared with the lesion in the input file, and with the lesion
that `anomalydiff prepare` stored for the same file mapped back by ``slices_to_volume``.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image
from predict_helpers import NUM_TIMESTEPS, OracleEps, save_nifti

from anomalydiff.data import (
    PrepareConfig,
    SliceStore,
    prepare_dataset,
    slice_to_image,
    slices_to_volume,
)
from anomalydiff.data.geometry import fit_image, place_mask
from anomalydiff.data.phantom import PhantomConfig, generate_subject
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.methods.ddib import DDIB, DDIBConfig
from anomalydiff.predict import Predictor, PreprocessRecord
from anomalydiff.predict.predictor import CALIBRATION_FORMAT, PredictConfig

CASE = "BraTS2021_00002"
THRESHOLD = 1e-3


def oracle_predictor(record: PreprocessRecord, level: float) -> Predictor:
    """DDIB on the oracle eps model, a fixed threshold, no median filter and no component removal."""
    schedule = make_schedule(ScheduleConfig(num_timesteps=NUM_TIMESTEPS))
    method = DDIB(OracleEps(schedule, level=level), schedule,
                  DDIBConfig(noise_level=6, step_stride=2, guidance_w=1.0, modalities=None, median_size=0))
    calibration = {"format": CALIBRATION_FORMAT, "method": method.calibration(), "preset": "ddib",
                   "threshold_policies": {"fixed": {"policy": "fixed", "threshold": THRESHOLD}},
                   "primary_policy": "fixed", "image_threshold": None, "models": {}}
    return Predictor(method, record, preset="ddib", config=PredictConfig(median_size=0, min_component=0),
                     calibration=calibration)


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A phantom tumour subject stored as axes (S, L, P), anisotropic voxels, rotated 12 degrees and shifted."""
    root = tmp_path_factory.mktemp("oblique")
    subject = generate_subject(PhantomConfig(voxel_size=4.0), "brats", 0, 2)  # 60 x 60 x 39, 1722 lesion voxels
    lesion = subject.seg > 0
    oracle_channel = np.where(lesion, 100.0, 200.0).astype(np.float32)
    theta = np.deg2rad(12.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    affine = subject.affine.copy()
    affine[:3, :3] = rotation @ affine[:3, :3] @ np.diag([1.0, 1.25, 0.8])
    affine[:3, 3] += [7.5, -3.0, 11.0]
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(subject.affine)), axcodes2ornt(("S", "L", "P")))
    for name, array in (("flair", oracle_channel), ("seg", lesion.astype(np.uint8))):
        image = nib.Nifti1Image(array, affine).as_reoriented(transform)
        save_nifti(np.asarray(image.dataobj), image.affine, root / "data" / CASE / f"{CASE}_{name}.nii.gz")
    seg = nib.load(str(root / "data" / CASE / f"{CASE}_seg.nii.gz"))
    assert nib.aff2axcodes(seg.affine) == ("S", "L", "P") and seg.shape == (39, 60, 60)
    return root, np.asarray(seg.dataobj) > 0


@pytest.mark.parametrize("resolution", [32, 60])
def test_mask_overlays_the_lesion_in_the_input_space(oblique_case: tuple[Path, np.ndarray], tmp_path: Path,
                                                     resolution: int) -> None:
    root, lesion = oblique_case
    prepare = PrepareConfig(format="brats2021", modalities=("flair",), resolution=resolution, normalisation="volume")
    record = PreprocessRecord(prepare, ("flair",), "test")
    predictor = oracle_predictor(record, level=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oracle scan has no zero background
        rows = predictor.predict_path(root / "data" / CASE, tmp_path / "out", progress=False, overlay=False)
    flair = nib.load(str(root / "data" / CASE / f"{CASE}_flair.nii.gz"))
    mask_image = nib.load(str(tmp_path / "out" / CASE / f"{CASE}_desc-anomalymask.nii.gz"))
    map_image = nib.load(str(tmp_path / "out" / CASE / f"{CASE}_desc-anomalymap.nii.gz"))
    for image in (mask_image, map_image):  # the input's own grid: shape, affine, orientation, voxel size
        assert image.shape == flair.shape
        np.testing.assert_allclose(image.affine, flair.affine, atol=1e-5)
        assert nib.aff2axcodes(image.affine) == ("S", "L", "P")
        np.testing.assert_allclose(image.header.get_zooms(), flair.header.get_zooms(), rtol=1e-6)
    predicted = np.asarray(mask_image.dataobj) > 0
    # what the model saw as lesion (prepare's resized masks), mapped back independently
    store = SliceStore(prepare_dataset(prepare, root / "data", tmp_path / "store", progress=False))
    store_rows = [s.row for s in store.slices if s.subject_id == CASE]
    expected = slices_to_volume(np.asarray(store.masks[store_rows], dtype=bool), store.subjects()[CASE])
    np.testing.assert_array_equal(predicted, expected)
    if resolution == 60:  # no resize: the lesion itself, voxel for voxel
        np.testing.assert_array_equal(predicted, lesion)
    else:
        dice = 2 * (predicted & lesion).sum() / (predicted.sum() + lesion.sum())
        assert dice > 0.8
    # the map lies on the same grid: thresholded it is the mask (resized back bilinearly it only blurs)
    anomaly_map = np.asarray(map_image.dataobj)
    if resolution == 60:
        np.testing.assert_array_equal(anomaly_map >= THRESHOLD, predicted)
    assert anomaly_map[predicted].mean() > 100 * anomaly_map[~predicted].mean()
    # per-slice CSV: each row's lesion voxels are the mask voxels of its slice in the FILE's own axis
    voxel_mm3 = abs(np.linalg.det(flair.affine[:3, :3]))
    with open(tmp_path / "out" / CASE / f"{CASE}_desc-slices.csv", newline="") as handle:
        slices = list(csv.DictReader(handle))
    assert {int(r["file_axis"]) for r in slices} == {0}  # S is the file's first axis
    for row in slices:
        in_file = predicted.take(int(row["file_index"]), axis=int(row["file_axis"])).sum()
        assert int(row["lesion_voxels"]) == in_file
        assert float(row["lesion_volume_mm3"]) == pytest.approx(in_file * voxel_mm3)
    assert rows[0]["lesion_voxels"] == predicted.sum()
    assert float(rows[0]["lesion_volume_mm3"]) == pytest.approx(predicted.sum() * voxel_mm3)
    # the same voxels and affine given in memory give the same mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory = predictor.predict_array(np.asarray(flair.dataobj, dtype=np.float32), affine=flair.affine)
    np.testing.assert_array_equal(in_memory.mask, predicted)


def test_2d_mask_png_overlays_the_lesion_at_the_input_size(tmp_path: Path) -> None:
    height, width = 50, 37  # not square: a transposed result cannot pass
    yy, xx = np.mgrid[:height, :width]
    lesion = ((yy - 30) / 7.0) ** 2 + ((xx - 12) / 5.0) ** 2 <= 1.0
    Image.fromarray(np.where(lesion, 90, 200).astype(np.uint8)).save(tmp_path / "xray.png")
    record = PreprocessRecord(PrepareConfig(format="folder", resolution=32), ("gray",), "test")
    predictor = oracle_predictor(record, level=0.0)  # min-max to [-1, 1]: lesion -1, tissue +1, edges between
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two grey levels only: "saturated"
        predictor.predict_path(tmp_path / "xray.png", tmp_path / "out", progress=False)
    mask = np.asarray(Image.open(tmp_path / "out" / "xray" / "xray_desc-anomalymask.png")) > 0
    amap = np.asarray(Image.open(tmp_path / "out" / "xray" / "xray_desc-anomalymap.png"))
    assert mask.shape == amap.shape == (height, width)
    fit = fit_image((height, width), 32, "pad")
    expected = slice_to_image(place_mask(torch.from_numpy(lesion), fit).numpy(), {"kind": "image", "images": [fit]}, 0)
    np.testing.assert_array_equal(mask, expected)
    dice = 2 * (mask & lesion).sum() / (mask.sum() + lesion.sum())
    assert dice > 0.8
    assert Image.open(tmp_path / "out" / "xray" / "xray_desc-overlay.png").size[0] > 100
