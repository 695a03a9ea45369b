"""Fixtures of the predict tests (session-scoped: built once per run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from predict_helpers import anofpdm_calibration, record_for, write_model_folder

from anomalydiff.data.phantom import PhantomConfig, write_phantom_dataset

PHANTOM = PhantomConfig(voxel_size=6.0)  # 40 x 40 x 26 BraTS grid: ~23 brain slices per subject


@pytest.fixture(scope="session")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three BraTS 2021 phantom subjects (00000 tiny lesion, 00001 none, 00002 a tumour)."""
    return write_phantom_dataset(PHANTOM, tmp_path_factory.mktemp("phantom") / "brats", "brats", 3, 0, progress=False)


@pytest.fixture(scope="session")
def atlas_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ATLAS v2.0 phantom subjects (BIDS layout)."""
    return write_phantom_dataset(PHANTOM, tmp_path_factory.mktemp("phantom") / "atlas", "atlas", 2, 0, progress=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-channel tiny CFG model folder with preprocess.json and a detect-style calibration.json."""
    folder = write_model_folder(tmp_path_factory.mktemp("models") / "models", record_for())
    (folder / "calibration.json").write_text(json.dumps({"method": anofpdm_calibration(folder), "threshold_policies": {}}))
    return folder


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
