"""The training run shared by the diffusion UNet (``diffusion.py``) and the noisy classifier (``classifier.py``).

:func:`run_training` is the whole run: distributed set-up, run folder (new or ``--resume``), seeded network
init, EMA, AdamW, the seeded sharded data order, the step loop (t ~ U{0..T-1}, loss under optional bf16
autocast, grad clipping, optimizer step, EMA update, loss log), diagnostics on the EMA weights, atomic
checkpoints and shutdown. A trainer passes only what differs: its data and resolved config, its network, the
noise and labels its loss sees, the loss itself, and its diagnostics.

Everything random in a run is a function of (seed, rank, step) (:func:`seed_step`,
``ShardedBatchSampler``), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from anomalydiff.data.store import SliceDataset, SliceStore
from anomalydiff.diffusion.schedule import NoiseSchedule, make_schedule
from anomalydiff.training import diagnostics as diag
from anomalydiff.training.checkpoint import (
    LOSS_COLUMNS,
    CsvLog,
    has_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    truncate_csv_after,
    write_run_config,
)
from anomalydiff.training.config import TrainConfig
from anomalydiff.training.distributed import (
    DistInfo,
    ShardedBatchSampler,
    barrier,
    derive_seed,
    init_distributed,
    mean_over_ranks,
    replica_max_abs_diff,
    run_on_main,
    shutdown_distributed,
    wrap_model,
)
from anomalydiff.training.ema import EMA

#: ``(x0 [B, C, H, W], y [B], t [B] long on the CPU, generator) -> (noise [B, C, H, W], y [B])``: the step's
#: forward-process noise and the labels the loss sees, drawn from the step's CPU generator.
DrawInputs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
#: ``(model, schedule, x0, t, noise, y) -> scalar loss`` (``diffusion_loss`` / ``classifier_loss``).
StepLoss = Callable[[nn.Module, NoiseSchedule, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(ema_model, schedule, x0 [N, C, H, W], labels [N]) -> rows {"t", "metric", "value"}`` of ``diagnostics.csv``.
Diagnose = Callable[[nn.Module, NoiseSchedule, torch.Tensor, torch.Tensor], list[diag.Row]]


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


def run_training(
    config: TrainConfig,
    store: str | Path,
    run_dir: str | Path,
    resume: bool,
    device: str,
    *,
    kind: str,
    title: str,
    init_key: int,
    prepare: Callable[[SliceStore], tuple[SliceDataset, TrainConfig]],
    build_model: Callable[[TrainConfig], nn.Module],
    draw_inputs: DrawInputs,
    loss_fn: StepLoss,
    diagnose: Diagnose,
) -> Path:
    """Run (or resume) one training run into ``run_dir``; the same on one process or under ``torchrun``.

    Args:
        config: the training config as given (its model fields may still be None).
        store: a prepared slice store.
        run_dir: the run folder (must be new or empty unless ``resume``).
        resume: continue from the last checkpoint in ``run_dir`` (optimizer, EMA, data order restored).
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``.
        kind: ``diffusion`` / ``classifier``, written to ``state/trainer.json``.
        title: what the start line calls the run (``diffusion (cfg)``, ``classifier``).
        init_key: the weights are initialised from ``derive_seed(config.seed, init_key)``.
        prepare: ``store -> (training dataset, config with the model fields resolved from the store)``;
            raises when the config does not fit the store.
        build_model: ``resolved config -> network`` (on the CPU; moved to the device here).
        draw_inputs: the step's noise and labels (see :data:`DrawInputs`).
        loss_fn: the training loss (see :data:`StepLoss`).
        diagnose: the diagnostic rows of the EMA network (see :data:`Diagnose`), run on rank 0 every
            ``config.diagnostics.every`` steps and at the end (never when that is 0).

    Returns:
        The run folder.
    """
    info = init_distributed(device)
    run_dir = Path(run_dir)
    logger = None
    try:
        store_ = SliceStore(store)
        dataset, config = prepare(store_)
        run_on_main(info, lambda: (prepare_run_folder(run_dir, resume), write_run_config(run_dir, config)))
        # 1. network from its own init stream, EMA copy, optimizer (AdamW, weight decay 0: A.5, B.1)
        torch.manual_seed(derive_seed(config.seed, init_key))
        model = build_model(config).to(info.device)
        ema = EMA(model, config.ema.rate, config.ema.warmup)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
        )
        start_step, wall_offset = _restore(run_dir, resume, info, model, ema, optimizer)
        ddp_model = wrap_model(model, info)
        schedule = make_schedule(config.schedule)
        sampler = ShardedBatchSampler(len(dataset), config.batch_size, config.seed, info.rank, info.world_size)
        subset = None
        if config.diagnostics.every > 0 and info.is_main:
            d = config.diagnostics
            subset = diag.select_validation_subset(store_, d.split, d.num_slices, d.seed)
        if info.is_main:
            _log(f"train {title}: {count_parameters(model):,} parameters, {len(dataset)} slices, "
                 f"device {info.device}, {info.world_size} process(es), steps {start_step}->{config.steps}")
        logger = StepLogger(run_dir, info, start_step, config.steps, config.log_every, wall_offset, config.progress)
        model.train()
        for step in range(start_step, config.steps):
            generator = seed_step(config.seed, info.rank, step)
            x0, y = load_batch(dataset, sampler.indices(step), info.device)
            # 2. t ~ U{0..T-1} (A.5, A.7), then the trainer's noise and labels, all from this step's generator
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
            noise, y = draw_inputs(x0, y, t, generator)
            # 3. loss, backward, clip, AdamW step, EMA update
            with autocast(info.device, config.bf16):
                loss = loss_fn(ddp_model, schedule, x0, t.to(info.device), noise, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            ema.update(model)
            done = step + 1
            logger.step(done, float(loss.detach()), optimizer.param_groups[0]["lr"])
            # 4. diagnostics on the EMA weights (rank 0), then the checkpoint
            last = done == config.steps
            with logger.pause():
                if subset is not None and (done % config.diagnostics.every == 0 or last):
                    rows = diagnose(ema.shadow, schedule, subset[0], subset[1])
                    diag.append_diagnostics(run_dir, done, logger.wall_time(), rows)
                if done % config.checkpoint_every == 0 or last:
                    sync = replica_max_abs_diff(model, info)
                    if info.is_main:
                        position = sampler.position(done)
                        save_checkpoint(run_dir, model, ema, optimizer, {
                            "kind": kind, "step": done, "epoch": position[0], "position": position[1],
                            "world_size": info.world_size, "wall_time": logger.wall_time(), "seed": config.seed,
                            "rng": "derived from (seed, rank, step); nothing to restore",
                            "replica_max_abs_diff": sync,
                        })
                    barrier(info)
        if subset is not None:
            diag.plot_diagnostics(run_dir)
        return run_dir
    finally:
        if logger is not None:
            logger.close()
        shutdown_distributed(info)


def _restore(
    run_dir: Path, resume: bool, info: DistInfo, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer
) -> tuple[int, float]:
    """On ``resume``: load the last checkpoint (if any) and drop log rows written after it.

    Returns:
        (the step to continue from, the training wall time already spent in s); (0, 0.0) for a new run.
    """
    start_step, wall_offset = 0, 0.0
    if resume and has_checkpoint(run_dir):
        state = load_checkpoint(run_dir, model, ema, optimizer)
        start_step, wall_offset = int(state["step"]), float(state["wall_time"])
        if int(state["world_size"]) != info.world_size and info.is_main:
            _log(f"warning: run was trained on {state['world_size']} processes, resumed on {info.world_size}: "
                 "the data shards differ from an uninterrupted run")
    if resume and info.is_main:
        for name in ("loss.csv", "diagnostics.csv"):
            truncate_csv_after(run_dir / name, start_step)
    return start_step, wall_offset


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
