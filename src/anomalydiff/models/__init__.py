"""Networks: noise-prediction UNets and the noisy classifier (MONAI), built from frozen configs.

- :class:`ClassConditionalUNet` ``(x_t, t, y) -> eps`` with ``NULL_LABEL`` = the zero class embedding (A.6).
- :class:`UnconditionalUNet` ``(x_t, t, y=None) -> eps`` for healthy-only AnoDDPM models (D.1).
- :class:`NoisyClassifier` ``(x_t, t) -> logits[B, 2]`` (A.7).
- :func:`save_model` / :func:`load_model`: safetensors weights + JSON config, checked on load.
"""

from anomalydiff.models.classifier import ClassifierConfig, NoisyClassifier
from anomalydiff.models.io import CheckpointError, build_model, load_model, read_model_info, save_model
from anomalydiff.models.unet import ClassConditionalUNet, UnconditionalUNet, UNetConfig

__all__ = [
    "CheckpointError",
    "ClassConditionalUNet",
    "ClassifierConfig",
    "NoisyClassifier",
    "UNetConfig",
    "UnconditionalUNet",
    "build_model",
    "load_model",
    "read_model_info",
    "save_model",
]
