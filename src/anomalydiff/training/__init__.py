"""Training loops: the diffusion UNet (modes cfg / healthy / simplex) and the noisy classifier.

EMA, atomic safetensors checkpoints with exact ``--resume``, DDP under torchrun, and diagnostics that tell
whether a model has learned the class difference.
"""

from anomalydiff.training.checkpoint import RunFolderError, load_checkpoint, save_checkpoint
from anomalydiff.training.classifier import classifier_loss, train_classifier
from anomalydiff.training.config import (
    ClassifierTrainConfig,
    DiagnosticsConfig,
    DiffusionTrainConfig,
    EMAConfig,
    OptimConfig,
    build_train_config,
    load_train_config,
)
from anomalydiff.training.diagnostics import (
    implicit_classifier_metrics,
    noisy_classifier_metrics,
    plot_diagnostics,
    select_validation_subset,
    unconditional_denoising_metrics,
)
from anomalydiff.training.diffusion import diffusion_loss, drop_labels, train_diffusion
from anomalydiff.training.ema import EMA

__all__ = [
    "EMA",
    "ClassifierTrainConfig",
    "DiagnosticsConfig",
    "DiffusionTrainConfig",
    "EMAConfig",
    "OptimConfig",
    "RunFolderError",
    "build_train_config",
    "classifier_loss",
    "diffusion_loss",
    "drop_labels",
    "implicit_classifier_metrics",
    "load_checkpoint",
    "load_train_config",
    "noisy_classifier_metrics",
    "plot_diagnostics",
    "save_checkpoint",
    "select_validation_subset",
    "train_classifier",
    "train_diffusion",
    "unconditional_denoising_metrics",
]
