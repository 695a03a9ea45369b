"""The commands: `anomalydiff detect`, `anomalydiff benchmark` (tiny phantom, --train) and `anomalydiff report`."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import anomalydiff.cli.benchmark  # noqa: F401  (registers the command)
import anomalydiff.cli.detect  # noqa: F401
import anomalydiff.cli.report  # noqa: F401
from anomalydiff.cli.app import app
from anomalydiff.evaluation.benchmark import CSV_COLUMNS

RUNNER = CliRunner()

TINY_TRAIN = ["steps=3", "schedule.num_timesteps=50", "optim.lr=0.01", "progress=false"]
TINY_BENCHMARK = {
    "name": "tiny",
    "description": "test-sized benchmark",
    "data": {
        "layout": "brats",
        "subjects": 5,
        "seed": 0,
        "phantom": {"voxel_size": 3.0, "lesion_free_fraction": 0.0, "tumour_radius_mm": [12.0, 20.0]},
        "prepare": {"resolution": 32, "split_counts": [3, 1, 1]},
    },
    "models": {
        "dir": "no/such/models",
        "cfg": {"config": "configs/train/smoke_tiny.yaml", "set": TINY_TRAIN},
        "classifier": {"config": "configs/train/phantom_classifier_cpu.yaml",
                       "set": ["model=tiny", "diagnostics.every=0", "bf16=false", *TINY_TRAIN]},
        "healthy_gaussian": {"config": "configs/train/smoke_tiny.yaml", "set": ["mode=healthy", *TINY_TRAIN]},
    },
    "evaluation": {"max_slices": 10, "val_slices": 8, "balanced_val": True, "batch_size": 10, "oracle_grid": "relative"},
    "seeds": [0, 1],
    "device": "cpu",
    "methods": [
        {"preset": "anoddpm_gauss", "label": "AnoDDPM (G)", "set": ["noise_level=3"]},
        {"preset": "wolleb_p2", "label": "DDIM clf [Wolleb]", "set": ["noise_level=6", "step_stride=2"]},
        {"preset": "ddib", "label": "DDIM clf-free [Sanchez]", "set": ["noise_level=6", "step_stride=2"]},
        {"preset": "cgcdm", "label": "CG-CDM", "set": ["noise_level=10", "num_steps=2"]},
        {"preset": "anofpdm_ddim", "label": "AnoFPDM (DDIM)", "set": ["forward_steps=12", "step_stride=3", "w_grid=[0.5,1,2]"]},
        {"preset": "anofpdm_ddim_te", "label": "AnoFPDM (DDIM t_e)",
         "set": ["forward_steps=12", "step_stride=3", "w_grid=[0.5,1,2]"]},
    ],
    "stride_curve": {"preset": "anofpdm_ddim", "strides": [3, 6], "val_slices": 6, "test_slices": 6},
    "ablations": {"preset": "anofpdm_ddim", "slices": 6, "end_step_ratios": [0.5, 1.0, 2.0], "fixed_thresholds": 5},
}


def test_detect_writes_files_and_explains_errors(model_dir: Path, tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "detect"
    args = ["detect", "--method", "anoddpm_gauss", "--models", str(model_dir), "--store", str(tiny_store), "--out",
            str(out), "--max-slices", "8", "--val-slices", "6", "--batch-size", "8", "--set", "noise_level=3",
            "--balanced", "--quiet"]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("maps.npz", "calibration.json", "metrics.json"):
        assert (out / name).exists()
    assert "oracle_dice" in result.output and "healthy_quantile" in result.output and "Dice" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluations"]["oracle_dice"]["uses_pixel_labels"] is True
    assert metrics["info"]["models"]["healthy_gaussian"]["sha256"] == hashlib.sha256(
        (model_dir / "healthy_gaussian" / "ema.safetensors").read_bytes()).hexdigest()
    # an existing run is not overwritten silently
    again = RUNNER.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    # a missing part: the error names it and the command that makes it
    partial = tmp_path / "partial"
    shutil.copytree(model_dir / "cfg", partial / "cfg")
    missing = RUNNER.invoke(app, ["detect", "--method", "wolleb_p2", "--models", str(partial), "--store",
                                  str(tiny_store), "--out", str(tmp_path / "w")])
    assert missing.exit_code == 2 and "anomalydiff train classifier" in missing.output
    # the report of a single run
    report = RUNNER.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert "<table" in page and "<img" in page and "data:image/png;base64," in page
    assert (out / "figures" / "examples_anoddpm_gauss.png").exists()


def test_benchmark_train_results_and_report(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_BENCHMARK))
    out = tmp_path / "bench"

    # without --train the (missing) committed model folder is a clear error
    missing = RUNNER.invoke(app, ["benchmark", str(config), "--out", str(out), "--quiet", "--no-report"])
    assert missing.exit_code == 2 and "--train" in missing.output

    result = RUNNER.invoke(app, ["benchmark", str(config), "--out", str(out), "--train", "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "machine", "config", "seeds", "timings", "models", "rows", "stride_curve", "ablations"):
        assert key in results
    assert results["seeds"] == [0, 1] and "--train" in results["command"]
    for part in ("cfg", "classifier", "healthy_gaussian"):
        weights = out / "models" / part / "ema.safetensors"
        assert results["models"][part]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    rows = {row["label"]: row for row in results["rows"]}
    labels_free = {"CG-CDM", "AnoFPDM (DDIM)", "AnoFPDM (DDIM t_e)"}
    for label, row in rows.items():
        assert row["pixel_labels"] == ("✓" if label in labels_free else "✗"), label
        for setup in ("mixed", "unhealthy"):
            for metric in ("dice", "iou", "auprc"):
                assert 0.0 <= row[setup][metric] <= 1.0
    assert rows["AnoDDPM (G) [healthy_quantile]"]["alternative"] and rows["AnoDDPM (G)"]["threshold_policy"].startswith("oracle")
    assert rows["DDIM clf-free [Sanchez]"]["n_runs"] == 1  # deterministic: one run
    assert rows["AnoFPDM (DDIM)"]["n_runs"] == 2 and rows["AnoFPDM (DDIM)"]["mixed"]["dice_std"] is not None
    assert rows["AnoFPDM (DDIM)"]["cost"]["nfe_per_slice"] == 8  # 2 NFE x 4 evaluated steps
    # the t_e variant reused the DDIM fit of the same seed
    te = json.loads((out / "runs" / "anofpdm_ddim_t_e" / "seed_0" / "metrics.json").read_text())
    base = json.loads((out / "runs" / "anofpdm_ddim" / "seed_0" / "metrics.json").read_text())
    assert te["cost"]["fit"] == "loaded" and te["calibration"]["tau_cos"] == base["calibration"]["tau_cos"]
    assert [p["step_stride"] for p in results["stride_curve"]["points"]] == [3, 6]
    assert results["ablations"]["end_step"]["matches_method_at_ratio_1"] is True
    # the threshold ablation's own Dice of the dynamic masks equals the table's (two code paths, one answer)
    dynamic = results["ablations"]["thresholds"]["dynamic"]
    assert dynamic["mixed_dice"] == pytest.approx(base["evaluations"]["native"]["reports"]["mixed"]["values"]["dice"])
    assert dynamic["unhealthy_dice"] == pytest.approx(
        base["evaluations"]["native"]["reports"]["unhealthy"]["values"]["dice"])
    assert {p["guidance_w"] for p in results["ablations"]["guidance"]["points"]} == {0.5, 1.0, 2.0}

    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(results["rows"]) and {r["pixel_labels"] for r in csv_rows} == {"✓", "✗"}
    markdown = (out / "results.md").read_text()
    assert "| Type | Pixel labels | Method | Threshold | Mixed DICE" in markdown and "NFE / slice" in markdown
    assert "| Gradient | ✓ | AnoFPDM (DDIM) |" in markdown and "| Recon. | ✗ | AnoDDPM (G) |" in markdown
    for name in ("stride_curve", "ablation_guidance", "ablation_end_step", "ablation_thresholds", "examples_cg_cdm"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("<table") >= 3 and page.count("<img") >= 8 and "AnoFPDM (DDIM t_e)" in page

    # a rerun skips everything that exists (runs are loaded, not recomputed)
    stamp = (out / "runs" / "cg_cdm" / "seed_1" / "metrics.json").stat().st_mtime_ns
    again = RUNNER.invoke(app, ["benchmark", str(config), "--out", str(out), "--train", "--quiet", "--no-report"])
    assert again.exit_code == 0, again.output
    assert (out / "runs" / "cg_cdm" / "seed_1" / "metrics.json").stat().st_mtime_ns == stamp
    rerun = json.loads((out / "results.json").read_text())["timings"]
    assert rerun["train_seconds"] == results["timings"]["train_seconds"] > 0  # kept from the run that trained
    assert rerun["methods_seconds"] == pytest.approx(results["timings"]["methods_seconds"])


def test_report_refuses_a_folder_without_results(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "results.json" in result.output


@pytest.mark.parametrize("bad", [{"methods": []}, {"methods": [{"preset": "no_such_method"}]}])
def test_benchmark_config_errors(tmp_path: Path, bad: dict) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_BENCHMARK, **bad}))
    result = RUNNER.invoke(app, ["benchmark", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error" in result.output
