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

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from anomalydiff.data.store import SliceDataset, SliceStore
from anomalydiff.diffusion.noise import simplex_noise
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import q_sample
from anomalydiff.labels import HEALTHY, NULL_LABEL
from anomalydiff.models.unet import ClassConditionalUNet, UnconditionalUNet, UNetConfig
from anomalydiff.training import diagnostics as diag
from anomalydiff.training.config import DiffusionTrainConfig
from anomalydiff.training.loop import run_training

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
    return run_training(
        config, store, run_dir, resume, device,
        kind="diffusion", title=f"diffusion ({config.mode})", init_key=INIT_KEY, prepare=partial(_prepare, config),
        build_model=lambda resolved: build_diffusion_model(resolved.mode, resolved.model),
        draw_inputs=partial(_step_inputs, config), loss_fn=diffusion_loss, diagnose=partial(_diagnostics, config),
    )


def _prepare(config: DiffusionTrainConfig, store: SliceStore) -> tuple[SliceDataset, DiffusionTrainConfig]:
    """The mode's training slices, and the config with ``model.in_channels`` filled in from the store."""
    config = replace(config, model=config.model.resolved(store.shape[1]))
    if config.model.in_channels != store.shape[1]:
        raise ValueError(
            f"model.in_channels={config.model.in_channels} but the store {store.path} has {store.shape[1]} channels; "
            "drop model.in_channels (it is filled in from the store) or use a matching store"
        )
    return diffusion_dataset(store, config), config


def _step_inputs(
    config: DiffusionTrainConfig, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's noise (A.5 / D.1) and labels: dropped to NULL_LABEL with p (cfg, A.6), else all NULL_LABEL.

    Args:
        config: the training config.
        x0: ``[B, C, H, W]`` clean slices; y: ``[B]`` their labels; t: ``[B]`` long timesteps on the CPU.
        generator: the step's CPU generator (drawn from in this order: noise, then label dropout).

    Returns:
        noise ``[B, C, H, W]`` and the labels ``[B]`` the network is given.
    """
    noise = draw_noise(config.mode, x0, t, config, generator)
    if config.mode != "cfg":
        return noise, torch.full_like(y, NULL_LABEL)
    return noise, drop_labels(y, config.label_dropout, generator)


def _diagnostics(
    config: DiffusionTrainConfig, ema_model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor
) -> list[diag.Row]:
    """Implicit-classifier metrics (cfg) or denoising errors (healthy / simplex) of the EMA network.

    Args:
        config: the training config (mode, ``diagnostics``, simplex settings).
        ema_model: the EMA network.
        schedule: the noise schedule.
        x0: ``[N, C, H, W]`` validation slices; labels: ``[N]`` their image labels.

    Returns:
        rows ``{"t", "metric", "value"}`` of ``diagnostics.csv``.
    """
    d = config.diagnostics
    if config.mode == "cfg":
        return diag.implicit_classifier_metrics(ema_model, schedule, x0, labels, d.timesteps, d.noise_draws, d.seed, d.batch_size)
    noise = "simplex" if config.mode == "simplex" else "gaussian"
    return diag.unconditional_denoising_metrics(
        ema_model, schedule, x0, labels, d.timesteps, d.noise_draws, d.seed, d.batch_size, noise, config.simplex
    )
