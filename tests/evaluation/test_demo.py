"""`anomalydiff demo` end to end on a tiny model folder and a coarse phantom: files, values, refusals, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from evaluation_helpers import SIZE, TINY_OVERRIDES, write_model_folder
from typer.testing import CliRunner

import anomalydiff.cli.demo  # noqa: F401  (registers the command)
from anomalydiff.cli.app import app
from anomalydiff.data.prepare import PrepareConfig
from anomalydiff.evaluation.demo import DemoConfig, DemoMethod, run_demo
from anomalydiff.models.io import CheckpointError
from anomalydiff.predict.inputs import PreprocessRecord

RUNNER = CliRunner()
#: 3 subjects on a 4 mm grid (60 x 60 x 39, ~30 brain slices each), every one with a tumour; tiny samples.
TINY_DEMO = DemoConfig(
    subjects=3,
    seed=5,
    phantom={"voxel_size": 4.0, "lesion_free_fraction": 0.0, "tumour_radius_mm": [12.0, 20.0]},
    val_slices=6,
    test_slices=8,
    batch_size=8,
    methods=(
        DemoMethod("anofpdm", "AnoFPDM (DDIM)", "anofpdm_ddim", tuple(TINY_OVERRIDES["anofpdm_ddim"])),
        DemoMethod("wolleb", "Wolleb", "wolleb_p2", (*TINY_OVERRIDES["wolleb_p2"], "tuned_with_pixel_labels=false")),
    ),
    predict_subjects=1,
    predict_methods=None,  # both methods predict, so both predictor paths are exercised
)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random cfg + classifier (T = 50, 32 px, 4 channels) with a preprocess.json at 32 px."""
    folder = write_model_folder(tmp_path_factory.mktemp("demo_models") / "models", parts=("cfg", "classifier"))
    prepare = PrepareConfig(format="brats2021", resolution=SIZE)
    record = PreprocessRecord(prepare=prepare, channels=tuple(prepare.channel_names()))
    (folder / "preprocess.json").write_text(json.dumps(record.to_json()))
    return folder


@pytest.fixture(scope="module")
def demo_run(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    report = run_demo(out, models=demo_models, device="cpu", progress=False, config=TINY_DEMO)
    return out, report


def _finite_fraction(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_demo_writes_report_record_and_predictions(demo_run: tuple[Path, Path]) -> None:
    out, report = demo_run
    assert report == out / "report.html" and report.is_file()
    demo = json.loads((out / "demo.json").read_text())
    assert demo["status"] == "finished" and Path(demo["report"]) == report.resolve()
    assert [s["stage"] for s in demo["stages"]] == ["phantom", "prepare", "models", "method:anofpdm", "method:wolleb",
                                                   "predict", "report"]
    assert all(s["seconds"] >= 0 for s in demo["stages"])
    # data: validation and test subjects only, disjoint
    splits = demo["data"]["splits"]
    assert len(splits["val"]["subjects"]) == 1 and len(splits["test"]["subjects"]) == 2
    assert not set(splits["val"]["subjects"]) & set(splits["test"]["subjects"])
    # models: sha256 of the very files used
    from anomalydiff.evaluation.models import file_sha256

    for facts in demo["models"].values():
        assert facts["sha256"] == file_sha256(facts["weights"])
    # methods: real files, finite metrics in [0, 1], which rows used pixel labels
    for method in demo["methods"]:
        for path in method["files"].values():
            assert Path(path).is_file(), path
        assert method["samples"]["val_slices"] == 6 and method["samples"]["slices"] == 8
        primary = method["evaluations"][method["primary"]]
        for setup in ("mixed", "unhealthy"):
            for metric in ("dice", "iou", "auprc", "pixel_auroc"):
                assert _finite_fraction(primary[setup][metric]), (method["key"], setup, metric, primary[setup])
        assert method["cost"]["nfe_per_slice"] > 0
    by_key = {m["key"]: m for m in demo["methods"]}
    assert by_key["anofpdm"]["primary"] == "native" and by_key["wolleb"]["primary"] == "healthy_quantile"
    labels = {name: e["uses_pixel_labels"] for name, e in by_key["wolleb"]["evaluations"].items()}
    assert labels == {"healthy_quantile": False, "otsu": False, "oracle_dice": True}
    assert by_key["anofpdm"]["evaluations"]["native"]["uses_pixel_labels"] is False
    # predictions: NIfTI map and mask with the input's shape and affine, every named file present
    assert {p["method"] for p in demo["predictions"]} == {"anofpdm", "wolleb"}
    for prediction in demo["predictions"]:
        for path in prediction["files"].values():
            assert Path(path).is_file(), path
        sid = prediction["subject_id"]
        assert sid in splits["test"]["subjects"]
        source = nib.load(str(Path(prediction["input"]) / f"{sid}_flair.nii.gz"))
        for desc in ("anomalymap", "anomalymask"):
            image = nib.load(prediction["files"][desc])
            assert image.shape == source.shape
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
        assert prediction["dice_3d"] is None or 0.0 <= prediction["dice_3d"] <= 1.0
        assert prediction["num_slices"] > 0 and prediction["decision"] in ("healthy", "unhealthy")
    # the page: self-contained, names the outputs, embeds the figures that are also on disk
    page = report.read_text(encoding="utf-8")
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "examples_anofpdm.png" in figures and any(f.startswith("predict_") for f in figures)
    for name in figures:
        assert name in page
    assert page.count("data:image/png;base64,") == len(figures)
    assert "AnoFPDM (DDIM)" in page and "desc-anomalymap.nii.gz" in page and demo["models"]["cfg"]["sha256"] in page


def test_demo_refuses_existing_output(demo_run: tuple[Path, Path], demo_models: Path, tmp_path: Path) -> None:
    out, _ = demo_run
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(out, models=demo_models, device="cpu", progress=False, config=TINY_DEMO)
    assert sorted(p.name for p in out.iterdir()) == before
    # a folder that is not a demo's is never emptied, even with --overwrite
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no earlier demo"):
        run_demo(foreign, models=demo_models, device="cpu", progress=False, config=TINY_DEMO, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # the command: exit code 2 and the message
    result = RUNNER.invoke(app, ["demo", "--out", str(out), "--models", str(demo_models), "--device", "cpu"])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_demo_explains_missing_models(demo_models: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="anomalydiff benchmark benchmarks/phantom_quick.yaml --train"):
        run_demo(tmp_path / "a", models=tmp_path / "no_models", progress=False, config=TINY_DEMO)
    partial = tmp_path / "partial"
    shutil.copytree(demo_models / "cfg", partial / "cfg")
    shutil.copy(demo_models / "preprocess.json", partial / "preprocess.json")
    with pytest.raises(CheckpointError, match="classifier/ema.safetensors"):
        run_demo(tmp_path / "b", models=partial, progress=False, config=TINY_DEMO)
    shutil.copytree(demo_models / "classifier", partial / "classifier")
    (partial / "preprocess.json").unlink()
    with pytest.raises(CheckpointError, match="preprocess.json"):
        run_demo(tmp_path / "c", models=partial, progress=False, config=TINY_DEMO)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written before the checks
    result = RUNNER.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--models", str(tmp_path / "no_models")])
    assert result.exit_code == 2 and "models/phantom" in result.output
    help_text = RUNNER.invoke(app, ["demo", "--help"]).output
    assert "Example: anomalydiff demo --out demo_run" in help_text


def test_demo_config_splits_and_checks() -> None:
    assert DemoConfig(subjects=8).split_counts() == (0, 3, 5)
    assert DemoConfig(subjects=2).split_counts() == (0, 1, 1)
    from anomalydiff.config import ConfigError

    with pytest.raises(ConfigError, match="at least 2"):
        DemoConfig(subjects=1)
    with pytest.raises(ConfigError, match="predict_methods"):
        DemoConfig(predict_methods=("nope",))
