"""Pieces shared by the two training loops (``diffusion.py``, ``classifier.py``): the run set-up and the
per-step bookkeeping. The loops themselves are written out in full in those modules.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from anomalydiff.data.store import SliceDataset
from anomalydiff.training.checkpoint import LOSS_COLUMNS, CsvLog
from anomalydiff.training.distributed import DistInfo, derive_seed, mean_over_ranks


def load_batch(dataset: SliceDataset, positions: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of dataset positions, read straight from the store's memory map.

    Args:
        dataset: a split of a slice store.
        positions: ``[B]`` positions in ``dataset`` (not store rows).
        device: where to put the tensors.

    Returns:
        x0 ``[B, C, H, W]`` float32 in [-1, 1], y ``[B]`` long image labels.
    """
    rows = dataset.row_index[np.asarray(positions, dtype=np.int64)]
    x0 = torch.from_numpy(np.asarray(dataset.store.images[rows], dtype=np.float32))
    y = torch.tensor([dataset.store.slices[int(r)].label for r in rows], dtype=torch.long)
    return x0.to(device), y.to(device)


def seed_step(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one training step, and torch's global RNG (dropout layers) seeded alike.

    Everything random in a step (t, noise, label dropout, dropout) is a function of (seed, rank, step), so a
    resumed run continues exactly. Random numbers are drawn on the CPU and moved, so a run draws the same
    numbers on any device.
    """
    step_seed = derive_seed(seed, rank, step)
    torch.manual_seed(step_seed)  # global RNG: dropout inside the networks (MONAI encoder head)
    return torch.Generator().manual_seed(step_seed + 1)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16`` (else a no-op context)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class StepLogger:
    """Averages the loss between log steps, writes ``loss.csv`` (rank 0) and drives the progress bar.

    Args:
        run_dir: the run folder.
        info: this process's rank and device.
        start_step: step the run (re)starts from.
        total_steps: the step budget.
        log_every: steps between rows.
        wall_time_offset: training wall time already spent before a resume (s).
        progress: show a tqdm bar on rank 0.
    """

    run_dir: Path
    info: DistInfo
    start_step: int
    total_steps: int
    log_every: int
    wall_time_offset: float = 0.0
    progress: bool = True
    _loss_sum: float = 0.0
    _count: int = 0
    _t_window: float = field(default_factory=time.perf_counter)
    _t_start: float = field(default_factory=time.perf_counter)
    _log: CsvLog | None = None
    _bar: Any = None

    def __post_init__(self) -> None:
        if self.info.is_main:
            self._log = CsvLog(self.run_dir / "loss.csv", LOSS_COLUMNS)
            self._bar = tqdm(
                total=self.total_steps, initial=self.start_step, disable=not self.progress, dynamic_ncols=True,
                unit="step",
            )

    def wall_time(self) -> float:
        """Training wall time so far, including the time before a resume (s)."""
        return self.wall_time_offset + time.perf_counter() - self._t_start

    def pause(self) -> Iterator[None]:
        """Context manager excluding the enclosed time (checkpoints, diagnostics) from steps/s."""
        return _Paused(self)

    def step(self, step: int, loss: float, lr: float) -> None:
        """Record the loss of finished step ``step`` (1-based) and log every ``log_every`` steps."""
        self._loss_sum += loss
        self._count += 1
        if self._bar is not None:
            self._bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self._t_window
        steps_per_s = self._count / elapsed if elapsed > 0 else float("nan")
        mean_loss = mean_over_ranks(self._loss_sum / self._count, self.info)
        if self._log is not None:
            self._log.write(
                {"step": step, "loss": f"{mean_loss:.6g}", "lr": f"{lr:.6g}", "steps_per_s": f"{steps_per_s:.4g}",
                 "wall_time": f"{self.wall_time():.2f}"}
            )
            self._bar.set_postfix(loss=f"{mean_loss:.4f}", steps_per_s=f"{steps_per_s:.2f}")
        self._loss_sum, self._count = 0.0, 0
        self._t_window = time.perf_counter()

    def close(self) -> None:
        """Close the log and the bar."""
        if self._log is not None:
            self._log.close()
        if self._bar is not None:
            self._bar.close()


class _Paused:
    def __init__(self, logger: StepLogger) -> None:
        self.logger = logger

    def __enter__(self) -> None:
        self._t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.logger._t_window += time.perf_counter() - self._t
