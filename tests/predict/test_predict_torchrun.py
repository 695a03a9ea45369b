"""Prediction sharded over 2 CPU processes with torchrun gives exactly the results of one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def command(model_dir: Path, brats_root: Path, out: Path) -> list[str]:
    return ["-m", "anomalydiff.cli.predict", "predict", "--model", str(model_dir), "--method", "anofpdm",
            "--input", str(brats_root), "--out", str(out), "--quiet", "--no-overlay", "--device", "cpu"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(model_dir: Path, brats_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one = subprocess.run([sys.executable, *command(model_dir, brats_root, single)], env=env, capture_output=True, check=False,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                          *command(model_dir, brats_root, sharded)], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((sharded / "predict.json").read_text())["world_size"] == 2
    expected = rows(single / "predictions.csv")
    assert [r["subject_id"] for r in expected] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert rows(sharded / "predictions.csv") == expected  # gathered by rank 0 in input order
    ranks = {json.loads((sharded / s / f"{s}_desc-summary.json").read_text())["rank"] for s in (r["subject_id"] for r in expected)}
    assert ranks == {0, 1}  # both processes took a share
    for row in expected:
        sid = row["subject_id"]
        assert rows(sharded / sid / f"{sid}_desc-slices.csv") == rows(single / sid / f"{sid}_desc-slices.csv")
        for desc in ("anomalymap", "anomalymask"):
            a = nib.load(str(single / sid / f"{sid}_desc-{desc}.nii.gz"))
            b = nib.load(str(sharded / sid / f"{sid}_desc-{desc}.nii.gz"))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
