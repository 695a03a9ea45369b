"""Fixtures of the evaluation tests (session-scoped: built once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation_helpers import write_model_folder, write_tiny_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-channel 32x32 store: 16 slices per split, half unhealthy."""
    return write_tiny_store(tmp_path_factory.mktemp("evalstore") / "store")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with all four parts (tiny random networks, T = 50)."""
    return write_model_folder(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(autouse=True)
def _two_threads():  # noqa: ANN202 - deterministic and light on the shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
