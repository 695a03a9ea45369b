"""Training of the noisy classifier p_phi(y | x_t, t) (spec A.7, B.1): noised inputs, uniform t, cross-entropy.

Naming: ``x0`` clean slices, ``t`` training timestep, ``eps`` Gaussian noise, ``xt`` noised input, ``y``
image labels (architecture.md).

Example::

    config = load_train_config(ClassifierTrainConfig, "configs/train/phantom_classifier_cpu.yaml")
    train_classifier(config, store="data/phantom_store", run_dir="runs/clf_cpu")
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalydiff.data.store import SliceDataset, SliceStore
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import q_sample
from anomalydiff.models.classifier import NoisyClassifier
from anomalydiff.training import diagnostics as diag
from anomalydiff.training.config import ClassifierTrainConfig
from anomalydiff.training.loop import run_training

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
    return run_training(
        config, store, run_dir, resume, device,
        kind="classifier", title="classifier", init_key=INIT_KEY, prepare=partial(_prepare, config),
        build_model=lambda resolved: NoisyClassifier(resolved.model), draw_inputs=_step_inputs,
        loss_fn=classifier_loss, diagnose=partial(_diagnostics, config),
    )


def _prepare(config: ClassifierTrainConfig, store: SliceStore) -> tuple[SliceDataset, ClassifierTrainConfig]:
    """Every labelled training slice, and the config with ``model.in_channels`` / ``image_size`` from the store."""
    dataset = SliceDataset(store, split=config.train_split)
    _, channels, height, width = store.shape
    if height != width:
        raise ValueError(f"{store.path}: slices are {height}x{width}; the noisy classifier expects square slices")
    config = replace(config, model=config.model.resolved(channels, height))
    if (config.model.in_channels, config.model.image_size) != (channels, height):
        raise ValueError(
            f"model.in_channels={config.model.in_channels}, model.image_size={config.model.image_size} but the store "
            f"{store.path} has {channels} channels of {height}x{width}; drop those fields (they are filled in from "
            "the store) or use a matching store"
        )
    return dataset, config


def _step_inputs(
    x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's eps ~ N(0, I) ``[B, C, H, W]`` from its CPU generator (A.7); the labels ``[B]`` are kept."""
    return torch.randn(x0.shape, generator=generator).to(x0.device), y


def _diagnostics(
    config: ClassifierTrainConfig, ema_model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor
) -> list[diag.Row]:
    """Accuracy and AUROC of the EMA classifier on the noised validation slices ``x0 [N, C, H, W]``, ``labels [N]``."""
    d = config.diagnostics
    return diag.noisy_classifier_metrics(ema_model, schedule, x0, labels, d.timesteps, d.noise_draws, d.seed, d.batch_size)
