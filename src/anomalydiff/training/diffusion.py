"""Training of the noise-prediction UNet: epsilon loss (spec A.5) in three modes.

- ``cfg``: class-conditional on every labelled slice, labels dropped to NULL_LABEL with probability p per
  sample (spec A.6; AnoFPDM, DDIB/Sanchez, CG-CDM).
- ``healthy``: unconditional, healthy slices only, Gaussian noise (AnoDDPM "(G)", spec D.1).
- ``simplex``: unconditional, healthy slices only, the network regresses fractal simplex noise that also
  replaces eps in q_sample (AnoDDPM "(S)", spec D.1).

Naming: ``x0`` clean slices, ``t`` training timestep, ``eps`` / ``noise`` the regression target, ``xt`` the
noised input, ``y`` labels (architecture.md).

Example::

    config = load_train_config(DiffusionTrainConfig, "configs/train/phantom_cfg_cpu.yaml")
    train_diffusion(config, store="data/phantom_store", run_dir="runs/cfg_cpu")
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from anomalydiff.data.store import SliceDataset, SliceStore
from anomalydiff.diffusion.noise import simplex_noise
from anomalydiff.diffusion.schedule import NoiseSchedule, make_schedule
from anomalydiff.diffusion.steps import q_sample
from anomalydiff.labels import HEALTHY, NULL_LABEL
from anomalydiff.models.unet import ClassConditionalUNet, UnconditionalUNet, UNetConfig
from anomalydiff.training import diagnostics as diag
from anomalydiff.training.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    truncate_csv_after,
    write_run_config,
)
from anomalydiff.training.config import DiffusionTrainConfig
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

INIT_KEY = 7_777_777  # derive_seed(seed, INIT_KEY): the weight-initialisation stream


def build_diffusion_model(mode: str, config: UNetConfig) -> nn.Module:
    """The network a mode trains: class-conditional for ``cfg``, unconditional for ``healthy`` / ``simplex``."""
    return ClassConditionalUNet(config) if mode == "cfg" else UnconditionalUNet(config)


def diffusion_dataset(store: SliceStore, config: DiffusionTrainConfig) -> SliceDataset:
    """The slices a mode trains on: every labelled slice (cfg) or healthy slices only (AnoDDPM, spec D.1)."""
    label = None if config.mode == "cfg" else HEALTHY
    return SliceDataset(store, split=config.train_split, label=label)


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by NULL_LABEL independently with probability ``p`` (spec A.6: p = 0.1).

    Args:
        y: ``[B]`` long labels.
        p: drop probability.
        generator: CPU generator the ``U(0, 1)`` draws come from.

    Returns:
        ``[B]`` long labels with dropped entries set to NULL_LABEL.
    """
    drop = torch.rand(y.shape[0], generator=generator).to(y.device) < p
    return torch.where(drop, torch.full_like(y, NULL_LABEL), y)


def draw_noise(
    mode: str, x0: torch.Tensor, t: torch.Tensor, config: DiffusionTrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """The forward-process noise and regression target: eps ~ N(0, I) (A.5) or simplex noise (D.1, mode simplex).

    Args:
        mode: ``cfg`` / ``healthy`` / ``simplex``.
        x0: ``[B, C, H, W]`` clean slices (sets shape, dtype, device).
        t: ``[B]`` long timesteps on the CPU (simplex noise uses t as its third coordinate).
        config: the training config (simplex settings).
        generator: CPU generator.
    """
    if mode == "simplex":
        return simplex_noise(tuple(x0.shape), t.cpu(), config.simplex, generator=generator, device=x0.device, dtype=x0.dtype)
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """L_simple = mean over batch and pixels of (noise - eps_theta(x_t, t, y))^2 (spec A.5, P2 Eq. 5).

    Args:
        model: ``model(x_t, t, y) -> eps`` (possibly DDP-wrapped).
        schedule: the noise schedule.
        x0: ``[B, C, H, W]`` clean slices.
        t: ``[B]`` long training timesteps.
        noise: ``[B, C, H, W]`` the noise used in q_sample and regressed.
        y: ``[B]`` long labels (ignored by unconditional networks).

    Returns:
        Scalar float32 loss.
    """
    # 1. x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (spec A.2)
    x_t = q_sample(schedule, x0, t, noise)
    # 2. eps-prediction and the simple loss, averaged over pixels and batch (mean_flat, A.5)
    eps_pred = model(x_t, t, y)
    return (eps_pred.float() - noise.float()).pow(2).mean()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_diffusion(
    config: DiffusionTrainConfig,
    store: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
) -> Path:
    """Train a diffusion UNet into ``run_dir`` (see ``anomalydiff.training.checkpoint`` for the layout).

    Works the same on one process or under ``torchrun`` (DDP; rank 0 logs and writes checkpoints).

    Args:
        config: the training config (``config.model.in_channels`` None = the store's channel count).
        store: a prepared slice store.
        run_dir: the run folder (must be new or empty unless ``resume``).
        resume: continue from the last checkpoint in ``run_dir`` (optimizer, EMA, data order restored).
        device: ``auto`` (cuda if available) / ``cpu`` / ``cuda`` / ``cuda:N``.

    Returns:
        The run folder.
    """
    info = init_distributed(device)
    run_dir = Path(run_dir)
    logger = None
    try:
        store_ = SliceStore(store)
        dataset = diffusion_dataset(store_, config)
        config = replace(config, model=config.model.resolved(store_.shape[1]))
        if config.model.in_channels != store_.shape[1]:
            raise ValueError(
                f"model.in_channels={config.model.in_channels} but the store {store_.path} has {store_.shape[1]} channels; "
                "drop model.in_channels (it is filled in from the store) or use a matching store"
            )
        run_on_main(info, lambda: (prepare_run_folder(run_dir, resume), write_run_config(run_dir, config)))
        # 1. network, EMA copy, optimizer (AdamW, weight decay 0: A.5)
        torch.manual_seed(derive_seed(config.seed, INIT_KEY))
        model = build_diffusion_model(config.mode, config.model).to(info.device)
        ema = EMA(model, config.ema.rate, config.ema.warmup)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
        )
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
        ddp_model = wrap_model(model, info)
        schedule = make_schedule(config.schedule)
        sampler = ShardedBatchSampler(len(dataset), config.batch_size, config.seed, info.rank, info.world_size)
        subset = None
        if config.diagnostics.every > 0 and info.is_main:
            d = config.diagnostics
            subset = diag.select_validation_subset(store_, d.split, d.num_slices, d.seed)
        if info.is_main:
            _log(f"train diffusion ({config.mode}): {count_parameters(model):,} parameters, {len(dataset)} slices, "
                 f"device {info.device}, {info.world_size} process(es), steps {start_step}->{config.steps}")
        logger = StepLogger(run_dir, info, start_step, config.steps, config.log_every, wall_offset, config.progress)
        model.train()
        for step in range(start_step, config.steps):
            generator = seed_step(config.seed, info.rank, step)
            x0, y = load_batch(dataset, sampler.indices(step), info.device)
            # 2. t ~ U{0..T-1} (A.5), the noise (A.5 / D.1), label dropout (A.6), all from this step's generator
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
            noise = draw_noise(config.mode, x0, t, config, generator)
            y = drop_labels(y, config.label_dropout, generator) if config.mode == "cfg" else torch.full_like(y, NULL_LABEL)
            # 3. loss, backward, clip, AdamW step, EMA update
            with autocast(info.device, config.bf16):
                loss = diffusion_loss(ddp_model, schedule, x0, t.to(info.device), noise, y)
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
                    _run_diagnostics(config, ema.shadow, schedule, subset, run_dir, done, logger.wall_time())
                if done % config.checkpoint_every == 0 or last:
                    sync = replica_max_abs_diff(model, info)
                    if info.is_main:
                        position = sampler.position(done)
                        save_checkpoint(run_dir, model, ema, optimizer, {
                            "kind": "diffusion", "step": done, "epoch": position[0], "position": position[1],
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


def _run_diagnostics(
    config: DiffusionTrainConfig,
    ema_model: nn.Module,
    schedule: NoiseSchedule,
    subset: tuple[torch.Tensor, torch.Tensor],
    run_dir: Path,
    step: int,
    wall_time: float,
) -> None:
    d = config.diagnostics
    x0, labels = subset
    if config.mode == "cfg":
        rows = diag.implicit_classifier_metrics(ema_model, schedule, x0, labels, d.timesteps, d.noise_draws, d.seed, d.batch_size)
    else:
        noise = "simplex" if config.mode == "simplex" else "gaussian"
        rows = diag.unconditional_denoising_metrics(
            ema_model, schedule, x0, labels, d.timesteps, d.noise_draws, d.seed, d.batch_size, noise, config.simplex
        )
    diag.append_diagnostics(run_dir, step, wall_time, rows)
