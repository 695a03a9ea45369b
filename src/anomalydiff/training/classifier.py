"""Training of the noisy classifier p_phi(y | x_t, t) (spec A.7, B.1): noised inputs, uniform t, cross-entropy.

Naming: ``x0`` clean slices, ``t`` training timestep, ``eps`` Gaussian noise, ``xt`` noised input, ``y``
image labels (architecture.md).

Example::

    config = load_train_config(ClassifierTrainConfig, "configs/train/phantom_classifier_cpu.yaml")
    train_classifier(config, store="data/phantom_store", run_dir="runs/clf_cpu")
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalydiff.data.store import SliceDataset, SliceStore
from anomalydiff.diffusion.schedule import NoiseSchedule, make_schedule
from anomalydiff.diffusion.steps import q_sample
from anomalydiff.models.classifier import NoisyClassifier
from anomalydiff.training import diagnostics as diag
from anomalydiff.training.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    truncate_csv_after,
    write_run_config,
)
from anomalydiff.training.config import ClassifierTrainConfig
from anomalydiff.training.distributed import (
    ShardedBatchSampler,
    barrier,
    derive_seed,
    init_distributed,
    replica_max_abs_diff,
    run_on_main,
    shutdown_distributed,
    wrap_model,
)
from anomalydiff.training.ema import EMA
from anomalydiff.training.loop import StepLogger, autocast, count_parameters, load_batch, seed_step

INIT_KEY = 8_888_888  # derive_seed(seed, INIT_KEY): the weight-initialisation stream


def classifier_loss(
    model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the classifier on noised slices (spec A.7 training, ``noised=True``).

    Args:
        model: ``model(x_t, t) -> logits [B, 2]`` (possibly DDP-wrapped).
        schedule: the noise schedule.
        x0: ``[B, C, H, W]`` clean slices.
        t: ``[B]`` long training timesteps.
        eps: ``[B, C, H, W]`` Gaussian noise.
        y: ``[B]`` long image labels.

    Returns:
        Scalar float32 loss (mean over the batch).
    """
    # 1. x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (spec A.2)
    x_t = q_sample(schedule, x0, t, eps)
    # 2. cross-entropy against the image-level label (A.7)
    return F.cross_entropy(model(x_t, t).float(), y)


def train_classifier(
    config: ClassifierTrainConfig,
    store: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
) -> Path:
    """Train a noisy classifier into ``run_dir`` (layout in ``anomalydiff.training.checkpoint``).

    Works the same on one process or under ``torchrun`` (DDP; rank 0 logs and writes checkpoints).

    Args:
        config: the training config (``model.in_channels`` / ``model.image_size`` None = from the store).
        store: a prepared slice store.
        run_dir: the run folder (must be new or empty unless ``resume``).
        resume: continue from the last checkpoint in ``run_dir``.
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``.

    Returns:
        The run folder.
    """
    info = init_distributed(device)
    run_dir = Path(run_dir)
    logger = None
    try:
        store_ = SliceStore(store)
        dataset = SliceDataset(store_, split=config.train_split)
        _, channels, height, width = store_.shape
        if height != width:
            raise ValueError(f"{store_.path}: slices are {height}x{width}; the noisy classifier expects square slices")
        config = replace(config, model=config.model.resolved(channels, height))
        if (config.model.in_channels, config.model.image_size) != (channels, height):
            raise ValueError(
                f"model.in_channels={config.model.in_channels}, model.image_size={config.model.image_size} but the store "
                f"{store_.path} has {channels} channels of {height}x{width}; drop those fields (they are filled in from "
                "the store) or use a matching store"
            )
        run_on_main(info, lambda: (prepare_run_folder(run_dir, resume), write_run_config(run_dir, config)))
        # 1. network, EMA copy, optimizer (AdamW, weight decay 0: B.1)
        torch.manual_seed(derive_seed(config.seed, INIT_KEY))
        model = NoisyClassifier(config.model).to(info.device)
        ema = EMA(model, config.ema.rate, config.ema.warmup)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
        )
        start_step, wall_offset = 0, 0.0
        if resume and has_checkpoint(run_dir):
            state = load_checkpoint(run_dir, model, ema, optimizer)
            start_step, wall_offset = int(state["step"]), float(state["wall_time"])
        if resume and info.is_main:
            for name in ("loss.csv", "diagnostics.csv"):
                truncate_csv_after(run_dir / name, start_step)
        ddp_model = wrap_model(model, info)
        schedule = make_schedule(config.schedule)
        sampler = ShardedBatchSampler(len(dataset), config.batch_size, config.seed, info.rank, info.world_size)
        subset = None
        if config.diagnostics.every > 0 and info.is_main:
            d = config.diagnostics
            subset = diag.select_validation_subset(store_, d.split, d.num_slices, d.seed)
        if info.is_main:
            print(f"train classifier: {count_parameters(model):,} parameters, {len(dataset)} slices, device "
                  f"{info.device}, {info.world_size} process(es), steps {start_step}->{config.steps}", file=sys.stderr)
        logger = StepLogger(run_dir, info, start_step, config.steps, config.log_every, wall_offset, config.progress)
        model.train()
        for step in range(start_step, config.steps):
            generator = seed_step(config.seed, info.rank, step)
            x0, y = load_batch(dataset, sampler.indices(step), info.device)
            # 2. t ~ U{0..T-1} and eps ~ N(0, I) from this step's generator (A.7)
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
            eps = torch.randn(x0.shape, generator=generator).to(info.device)
            # 3. loss, backward, clip, AdamW step, EMA update
            with autocast(info.device, config.bf16):
                loss = classifier_loss(ddp_model, schedule, x0, t.to(info.device), eps, y)
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
                    d = config.diagnostics
                    rows = diag.noisy_classifier_metrics(
                        ema.shadow, schedule, subset[0], subset[1], d.timesteps, d.noise_draws, d.seed, d.batch_size
                    )
                    diag.append_diagnostics(run_dir, done, logger.wall_time(), rows)
                if done % config.checkpoint_every == 0 or last:
                    sync = replica_max_abs_diff(model, info)
                    if info.is_main:
                        position = sampler.position(done)
                        save_checkpoint(run_dir, model, ema, optimizer, {
                            "kind": "classifier", "step": done, "epoch": position[0], "position": position[1],
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
