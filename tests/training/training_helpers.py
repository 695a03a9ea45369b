"""Helpers of the training tests: a tiny slice store in the real on-disk format, and subprocess settings."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
from anomalydiff.data.store import SliceStoreWriter

SIZE = 32


def write_tiny_store(out: Path, channels: int = 1, subjects: int = 6, slices: int = 8, seed: int = 0) -> Path:
    """Subjects of 32x32 slices: healthy = smooth background, unhealthy = plus a bright disc (labelled 1).

    Splits: 4 train subjects, 1 val, 1 test; half the slices of every subject are unhealthy.
    """
    rng = np.random.default_rng(seed)
    writer = SliceStoreWriter(out, channels, SIZE, SIZE, [f"m{c}" for c in range(channels)], info={"format": "test"})
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ids = []
    for s in range(subjects):
        images = np.empty((slices, channels, SIZE, SIZE), np.float32)
        masks = np.zeros((slices, SIZE, SIZE), bool)
        labels = []
        for k in range(slices):
            base = -0.5 + 0.1 * np.sin(xx / (3 + k)) + 0.05 * rng.standard_normal((SIZE, SIZE))
            img = np.repeat(base[None], channels, 0)
            label = k % 2
            if label:
                cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 7)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
                img[:, disc] = 0.8
                masks[k] = disc
            images[k] = np.clip(img, -1, 1)
            labels.append(label)
        sid = f"sub{s:02d}"
        ids.append(sid)
        writer.add_subject(sid, images, masks, np.ones((slices, SIZE, SIZE), bool), list(range(slices)), labels)
    return writer.close({"train": ids[:4], "val": ids[4:5], "test": ids[5:]})


def anomalydiff_cli() -> list[str]:
    """The console script (for subprocess runs), falling back to ``python -c`` of the typer app."""
    script = Path(sys.executable).parent / "anomalydiff"
    if script.exists():
        return [str(script)]
    found = shutil.which("anomalydiff")
    if found:
        return [found]
    return [sys.executable, "-c", "from anomalydiff.cli import main; main()"]


def subprocess_env() -> dict[str, str]:
    """Environment for child training processes: 1 thread each (deterministic and polite on 2 cores)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env
