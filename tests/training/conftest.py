"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from training_helpers import write_tiny_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-channel 32x32 store: 32 train slices (16 healthy), 8 val, 8 test."""
    return write_tiny_store(tmp_path_factory.mktemp("store") / "store")
