"""`anomalydiff predict` end to end on tiny models: the files, the tables, resuming, refusing, and the errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from predict_helpers import (
    anofpdm_calibration,
    record_for,
    write_model_folder,
)
from typer.testing import CliRunner

import anomalydiff.cli.predict  # noqa: F401  (registers the command)
from anomalydiff.cli.app import app
from anomalydiff.data import PrepareConfig, prepare_dataset
from anomalydiff.predict import Predictor
from anomalydiff.predict.writer import PREDICTION_COLUMNS, SLICE_COLUMNS

SUBJECTS = ("BraTS2021_00000", "BraTS2021_00002")


def run_cli(*args: str) -> object:
    result = CliRunner().invoke(app, ["predict", *[str(a) for a in args]], catch_exceptions=False)
    return result


def inputs(brats_root: Path) -> list[str]:
    return [arg for sid in SUBJECTS for arg in ("--input", str(brats_root / sid))]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def mtimes(out: Path) -> dict[str, float]:
    return {sid: (out / sid / f"{sid}_desc-summary.json").stat().st_mtime_ns for sid in SUBJECTS}


@pytest.fixture(scope="module")
def finished(model_dir: Path, brats_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that rerun it (module fixtures start before the autouse one)
    result = run_cli("--model", model_dir, "--method", "anofpdm", *inputs(brats_root), "--out", out, "--quiet")
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "2 subject(s): 2 unhealthy" in result.output
    return out


def test_every_output_of_a_run(finished: Path, brats_root: Path) -> None:
    out = finished
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == list(PREDICTION_COLUMNS)
    assert [r["subject_id"] for r in rows] == list(SUBJECTS)
    for row in rows:
        sid = row["subject_id"]
        flair = nib.load(str(brats_root / sid / f"{sid}_flair.nii.gz"))
        mask = nib.load(str(out / sid / f"{sid}_desc-anomalymask.nii.gz"))
        amap = nib.load(str(out / sid / f"{sid}_desc-anomalymap.nii.gz"))
        for image in (mask, amap):
            assert image.shape == flair.shape
            np.testing.assert_allclose(image.affine, flair.affine)
        assert amap.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        voxels = int((np.asarray(mask.dataobj) > 0).sum())
        voxel_mm3 = abs(np.linalg.det(flair.affine[:3, :3]))
        assert int(row["lesion_voxels"]) == voxels
        assert float(row["lesion_volume_mm3"]) == pytest.approx(voxels * voxel_mm3)
        # tau_cos = 2 in the calibration: the gate flags every slice, so the subject is unhealthy (share 1)
        assert row["decision"] == "1" and row["decision_label"] == "unhealthy"
        assert float(row["subject_score"]) == 1.0 and row["threshold_policy"] == "native"
        slices = read_csv(out / sid / f"{sid}_desc-slices.csv")
        assert list(slices[0])[: len(SLICE_COLUMNS)] == list(SLICE_COLUMNS)
        assert {"cos", "threshold"} <= set(slices[0])  # AnoFPDM's per-slice extras
        assert len(slices) == int(row["num_slices"]) == int(row["flagged_slices"])
        assert sum(int(s["lesion_voxels"]) for s in slices) == voxels
        assert sum(float(s["lesion_volume_mm3"]) for s in slices) == pytest.approx(voxels * voxel_mm3)
        assert max(float(s["image_score"]) for s in slices) == pytest.approx(float(row["max_image_score"]))
        summary = json.loads((out / sid / f"{sid}_desc-summary.json").read_text())
        assert summary["decision"] == 1 and set(summary["files"]) == {"anomalymap", "anomalymask", "slices", "overlay"}
        assert Image.open(out / sid / f"{sid}_desc-overlay.png").size[0] >= 300
    record = json.loads((out / "predict.json").read_text())
    assert record["finished"] and record["fingerprint"]["preset"] == "anofpdm" and record["subjects"] == 2
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["method"]["tau_cos"] == 2.0 and calibration["models"]["cfg"] == record["fingerprint"]["models"]["cfg"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())


def test_rerun_refuses_resume_skips_and_overwrite_redoes(finished: Path, model_dir: Path, brats_root: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = mtimes(out)
    common = ["--model", model_dir, "--method", "anofpdm", *inputs(brats_root), "--out", out, "--quiet"]
    refused = run_cli(*common)
    assert refused.exit_code == 2 and "already holds the finished predictions" in refused.output
    other = run_cli(*common, "--set", "median_size=3")
    assert other.exit_code == 2 and "other settings" in other.output and "method_config" in other.output
    resumed = run_cli(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert mtimes(out) == before  # finished subjects were skipped
    assert read_csv(out / "predictions.csv") == read_csv(finished / "predictions.csv")
    redone = run_cli(*common, "--overwrite")
    assert redone.exit_code == 0, redone.output
    after = mtimes(out)
    assert all(after[s] != before[s] for s in SUBJECTS)
    np.testing.assert_array_equal(  # same model, same calibration: the same map again
        nib.load(str(out / SUBJECTS[1] / f"{SUBJECTS[1]}_desc-anomalymap.nii.gz")).get_fdata(),
        nib.load(str(finished / SUBJECTS[1] / f"{SUBJECTS[1]}_desc-anomalymap.nii.gz")).get_fdata(),
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = run_cli("--model", model_dir, *inputs(brats_root), "--out", foreign, "--quiet")
    assert refused.exit_code == 2 and "not empty" in refused.output


def test_a_killed_run_leaves_no_half_written_files_and_the_rerun_continues(
    model_dir: Path, brats_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalydiff.predict import writer

    real = writer.write_overlay
    calls = []

    def dies_on_the_second_subject(prediction, path, *args, **kwargs):
        calls.append(prediction.subject_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the second subject")
        return real(prediction, path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_overlay", dies_on_the_second_subject)
    predictor = Predictor.from_model_dir(model_dir, "anofpdm", device="cpu")
    out = tmp_path / "out"
    items = [brats_root / s for s in SUBJECTS]
    with pytest.raises(KeyboardInterrupt):
        predictor.predict_path(items, out, progress=False)
    # the first subject is complete; nothing of the second is visible; no predictions.csv (run not finished)
    assert sorted(p.name for p in (out / SUBJECTS[0]).iterdir()) == sorted(
        f"{SUBJECTS[0]}_desc-{d}" for d in ("anomalymap.nii.gz", "anomalymask.nii.gz", "slices.csv", "overlay.png",
                                            "summary.json"))
    assert not (out / SUBJECTS[1]).exists() and not (out / "predictions.csv").exists()
    first = (out / SUBJECTS[0] / f"{SUBJECTS[0]}_desc-summary.json").stat().st_mtime_ns
    monkeypatch.setattr(writer, "write_overlay", real)
    rows = predictor.predict_path(items, out, progress=False)  # same settings: continues without flags
    assert [r["subject_id"] for r in rows] == list(SUBJECTS)
    assert (out / SUBJECTS[0] / f"{SUBJECTS[0]}_desc-summary.json").stat().st_mtime_ns == first
    assert (out / SUBJECTS[1] / f"{SUBJECTS[1]}_desc-summary.json").is_file()
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())


def test_calibration_of_another_model_method_or_w_is_refused(model_dir: Path, brats_root: Path, tmp_path: Path) -> None:
    other = write_model_folder(tmp_path / "other", record_for(), seed=1)
    (tmp_path / "other_cal.json").write_text(json.dumps({"method": anofpdm_calibration(other)}))
    common = ["--input", brats_root / SUBJECTS[0], "--quiet"]
    result = run_cli("--model", model_dir, "--calibration", tmp_path / "other_cal.json", "--out", tmp_path / "a", *common)
    assert result.exit_code == 2 and "fitted for model" in result.output
    # predict's own format records the networks' sha256
    predict_cal = {"format": "anomalydiff-predict-calibration", "method": anofpdm_calibration(model_dir) | {"model": None},
                   "models": {"cfg": "0" * 64}, "threshold_policies": {}}
    (tmp_path / "sha_cal.json").write_text(json.dumps(predict_cal))
    result = run_cli("--model", model_dir, "--calibration", tmp_path / "sha_cal.json", "--out", tmp_path / "b", *common)
    assert result.exit_code == 2 and "made for another model" in result.output
    result = run_cli("--model", model_dir, "--set", "guidance_w=3", "--set", "select_w=false", "--out", tmp_path / "c", *common)
    assert result.exit_code == 2 and "fitted for guidance w=1" in result.output
    result = run_cli("--model", model_dir, "--method", "ddib", "--calibration", model_dir / "calibration.json",
                     "--out", tmp_path / "d", *common)
    assert result.exit_code == 2 and "is for method 'anofpdm', not 'ddib'" in result.output
    result = run_cli("--model", model_dir, "--set", "forward_steps=9", "--out", tmp_path / "e", *common)
    assert result.exit_code == 2 and "forward_steps" in result.output


def test_mismatched_checkpoint_and_channels_and_pickles_are_refused(model_dir: Path, brats_root: Path,
                                                                     tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    info = json.loads((broken / "cfg" / "ema.json").read_text())
    info["config"]["channels"] = [8, 16, 16]
    (broken / "cfg" / "ema.json").write_text(json.dumps(info))
    common = ["--input", brats_root / SUBJECTS[0], "--quiet"]
    result = run_cli("--model", broken, "--out", tmp_path / "a", *common)
    assert result.exit_code == 2 and "mismatched checkpoint" in result.output and "ema.safetensors" in result.output
    one_channel = tmp_path / "one_channel"
    shutil.copytree(model_dir, one_channel)
    (one_channel / "preprocess.json").write_text(json.dumps(record_for("atlas").to_json()))
    result = run_cli("--model", one_channel, "--out", tmp_path / "b", *common)
    assert result.exit_code == 2 and "takes 4 channel(s)" in result.output
    (tmp_path / "model.pt").write_bytes(b"not really a pickle")
    result = run_cli("--model", tmp_path / "model.pt", "--out", tmp_path / "c", *common)
    assert result.exit_code == 2 and "pickle" in result.output and "safetensors" in result.output


def test_models_never_load_through_pickle(model_dir: Path, brats_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    predictor = Predictor.from_model_dir(model_dir, "anofpdm", device="cpu")
    rows = predictor.predict_path(brats_root / SUBJECTS[0], tmp_path / "out", progress=False, overlay=False)
    assert rows[0]["subject_id"] == SUBJECTS[0]


def test_without_calibration_predict_refuses_or_fits_on_a_store(brats_root: Path, tmp_path: Path) -> None:
    bare = write_model_folder(tmp_path / "bare", record_for())
    common = ["--model", bare, "--input", brats_root / SUBJECTS[1], "--quiet"]
    tiny = ["--set", "forward_steps=6", "--set", "step_stride=3", "--set", "w_grid=[0.5,2.0]"]
    result = run_cli(*common, *tiny, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "not calibrated" in result.output and "--calibration-store" in result.output
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, sid in (("train", "BraTS2021_00001"), ("val", "BraTS2021_00002"), ("test", "BraTS2021_00000")):
        (splits / f"{split}.csv").write_text(f"subject_id\n{sid}\n")
    store = prepare_dataset(PrepareConfig(format="brats2021", resolution=32), brats_root, tmp_path / "store",
                            progress=False, split_files=splits)
    result = run_cli(*common, "--method", "anofpdm", *tiny, "--calibration-store", store, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    calibration = json.loads((tmp_path / "b" / "calibration.json").read_text())
    assert calibration["fit"]["store"] == str(store) and calibration["fit"]["split"] == "val"
    assert calibration["method"]["guidance_w"] in (0.5, 2.0) and len(calibration["method"]["d_max_star"]) == 4
    # a method without a native threshold gets the label-free policy and an image threshold
    ddib = ["--set", "noise_level=4", "--set", "step_stride=2", "--set", "modalities=null"]
    result = run_cli(*common, "--method", "ddib", *ddib, "--calibration-store", store, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    calibration = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert set(calibration["threshold_policies"]) == {"healthy_quantile"} and calibration["image_threshold"] > 0
    row = read_csv(tmp_path / "c" / "predictions.csv")[0]
    assert row["threshold_policy"] == "healthy_quantile"
    assert float(row["subject_score"]) == pytest.approx(float(row["max_image_score"]))
    assert row["decision"] == str(int(float(row["max_image_score"]) >= calibration["image_threshold"]))
    # the calibration written beside the results is loadable as --calibration
    again = Predictor.from_model_dir(bare, "ddib", device="cpu", calibration=tmp_path / "c" / "calibration.json")
    assert again.image_threshold_ == calibration["image_threshold"] and again.policy_name_ == "healthy_quantile"


def test_preprocessing_record_is_required_and_can_be_given(model_dir: Path, brats_root: Path, tmp_path: Path) -> None:
    bare = tmp_path / "models"
    shutil.copytree(model_dir, bare)
    (bare / "preprocess.json").unlink()
    common = ["--model", bare, "--input", brats_root / SUBJECTS[0], "--quiet", "--no-overlay"]
    result = run_cli(*common, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "no preprocessing record" in result.output and "--preprocess" in result.output
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"modalities": list(record_for().channels),
                                                  "prepare_config": record_for().to_json()["prepare_config"]}))
    result = run_cli(*common, "--preprocess", store, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "predict.json").read_text())["preprocess_source"] == str(store / "store.json")


def test_missing_modality_is_a_clear_cli_error_or_skipped(model_dir: Path, brats_root: Path, tmp_path: Path) -> None:
    case = SUBJECTS[0]
    shutil.copytree(brats_root / case, tmp_path / case)
    (tmp_path / case / f"{case}_t1ce.nii.gz").unlink()
    result = run_cli("--model", model_dir, "--input", tmp_path / case, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and f"{case}_t1ce.nii.gz" in result.output and "modality t1ce" in result.output
    result = run_cli("--model", model_dir, "--input", tmp_path / case, "--input", brats_root / "BraTS2021_00001",
                     "--out", tmp_path / "skip", "--quiet", "--skip-bad", "--no-overlay")
    assert result.exit_code == 0 and "1 failed" in result.output
    rows = read_csv(tmp_path / "skip" / "predictions.csv")
    assert "modality t1ce" in rows[0]["error"] and rows[1]["error"] == "" and rows[1]["decision"] == "1"
    assert not (tmp_path / "skip" / case).exists()  # not done: a rerun tries it again


def test_model_from_a_train_run_folder_or_a_benchmark_folder(model_dir: Path, tmp_path: Path) -> None:
    from anomalydiff.config import to_dict
    from anomalydiff.evaluation.models import file_sha256

    run = Predictor.from_model_dir(model_dir / "cfg", "anofpdm", device="cpu")  # a `train` run folder
    assert run.is_calibrated and run.record.source == str(model_dir / "preprocess.json")
    # a benchmark folder with committed weights elsewhere: its runs name the weights and the store
    weights, bench = tmp_path / "weights", tmp_path / "bench"
    shutil.copytree(model_dir / "cfg", weights / "cfg")
    store = bench / "data" / "store"
    store.mkdir(parents=True)
    (store / "store.json").write_text(json.dumps({"modalities": ["flair", "t1", "t1ce", "t2"],
                                                  "prepare_config": to_dict(record_for().prepare)}))
    sha = file_sha256(weights / "cfg" / "ema.safetensors")
    for row, seed, w in (("anofpdm_ddpm", 0, 1.0), ("anofpdm_ddim", 1, 2.0), ("anofpdm_ddim", 0, 0.5)):
        folder = bench / "runs" / row / f"seed_{seed}"
        folder.mkdir(parents=True)
        (folder / "calibration.json").write_text(json.dumps({"method": anofpdm_calibration(weights, guidance_w=w),
                                                             "threshold_policies": {}, "fit": "fitted"}))
        (folder / "metrics.json").write_text(json.dumps({"primary": "native", "info": {
            "preset": row, "store": str(store), "models": {"cfg": {"run_dir": str(weights / "cfg"), "sha256": sha}}}}))
    chosen = Predictor.from_model_dir(bench, "anofpdm_ddim", device="cpu")
    assert chosen.calibration_["source"] == str(bench / "runs" / "anofpdm_ddim" / "seed_0" / "calibration.json")
    assert chosen.method.guidance_w_ == 0.5 and chosen.record.source == str(store / "store.json")
    assert chosen.calibration_["models"] == {"cfg": sha}
    family = Predictor.from_model_dir(bench, "anofpdm", device="cpu")  # shortest preset name, then by name, then seed
    assert family.preset == "anofpdm_ddim" and family.method.guidance_w_ == 0.5
    # another preset of the method runs its own YAML on a compatible calibration (the t_e variant of DDIM)
    tiny = ["forward_steps=6", "step_stride=3", "modalities=null"]
    variant = Predictor.from_model_dir(bench, "anofpdm_ddim_te", device="cpu", overrides=tiny)
    assert variant.method.config.single_sam and variant.method.guidance_w_ == 0.5 and variant.preset == "anofpdm_ddim_te"


def test_2d_images_with_a_2d_model(tmp_path: Path) -> None:
    record = record_for("folder")
    models = write_model_folder(tmp_path / "models", record)
    calibration = anofpdm_calibration(models, channels=1)
    (models / "calibration.json").write_text(json.dumps({"method": calibration}))
    rng = np.random.default_rng(0)
    sizes = {"a": (48, 40), "b": (30, 64)}
    for name, size in sizes.items():
        pixels = (40 + 150 * rng.random(size)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    result = run_cli("--model", models, "--input", tmp_path / "a.png", "--input", tmp_path / "b.png",
                     "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    for name, size in sizes.items():
        folder = tmp_path / "out" / name
        assert np.asarray(Image.open(folder / f"{name}_desc-anomalymask.png")).shape == size
        amap = np.asarray(Image.open(folder / f"{name}_desc-anomalymap.png"))
        assert amap.shape == size and amap.dtype == np.uint16 and amap.max() == 65535
        summary = json.loads((folder / f"{name}_desc-summary.json").read_text())
        assert summary["kind"] == "image" and summary["num_slices"] == 1 and summary["map_png_max"] > 0
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [r["kind"] for r in rows] == ["image", "image"] and rows[0]["lesion_volume_mm3"] == ""
    # in memory: an [h, w] array gives maps of its own size
    predictor = Predictor.from_model_dir(models, "anofpdm", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = predictor.predict_array(rng.random((33, 21)) * 100)
    assert result.anomaly_map.shape == result.mask.shape == (33, 21)
    assert os.path.isfile(tmp_path / "out" / "a" / "a_desc-overlay.png")
