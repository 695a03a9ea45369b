"""The timestep-aware noisy classifier p_phi(y | x_t, t) of Wolleb et al. (spec A.7, B.1, D.2).

MONAI's ``DiffusionModelEncoder`` (the encoder half of the diffusion UNet plus a fully connected head;
MONAI's docstring cites Wolleb et al.) with 2 output logits. Guided-diffusion's ``EncoderUNetModel`` uses an
attention-pooling head instead of MONAI's flatten + MLP head; the rest maps one to one.

Naming: ``x_t`` ``[B, C, H, W]`` noisy image, ``t`` ``[B]`` long training timestep (0..T-1), ``logits``
``[B, 2]`` over (HEALTHY, UNHEALTHY).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from torch import nn

from anomalydiff.labels import NUM_CLASSES


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the noisy classifier (sizes live in ``configs/models/{tiny,cpu,paper}.yaml``)."""

    in_channels: int | None = None  # image channels; None = filled in from the slice store by the trainer
    image_size: int | None = None  # square input side (the FC head depends on it); None = from the store
    channels: tuple[int, ...] = (32, 64, 64, 64)  # channels per level; every level halves the resolution
    attention_levels: tuple[bool, ...] = (False, False, True, True)  # B.1: attention at the coarse levels
    num_res_blocks: int = 2  # residual blocks per level (D.2: depth 2)
    num_head_channels: tuple[int, ...] = (32, 32, 32, 32)  # channels per attention head per level (B.1: 64)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every entry of channels
    resblock_updown: bool = False  # B.1 uses residual down-sampling; MONAI default (conv) is cheaper

    def resolved(self, in_channels: int, image_size: int) -> "ClassifierConfig":
        """This config with ``in_channels`` / ``image_size`` filled in from the store where they are None."""
        return replace(
            self,
            in_channels=self.in_channels if self.in_channels is not None else in_channels,
            image_size=self.image_size if self.image_size is not None else image_size,
        )


class NoisyClassifier(nn.Module):
    """logits = f_phi(x_t, t): a noise- and timestep-aware healthy/unhealthy classifier (spec A.7).

    A model instance is a ``classifier(x_t, t) -> logits`` callable (``anomalydiff.methods.base``).

    Args:
        config: architecture; ``in_channels`` and ``image_size`` must be set (see ``resolved``).
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if config.in_channels is None or config.image_size is None:
            raise ValueError(
                "ClassifierConfig.in_channels / image_size is None: set them (model.in_channels=..., "
                "model.image_size=...) or build the network through the trainer, which fills them from the store"
            )
        n = len(config.channels)
        if len(config.attention_levels) != n or len(config.num_head_channels) != n:
            raise ValueError(
                f"ClassifierConfig: channels {config.channels}, attention_levels {config.attention_levels} and "
                f"num_head_channels {config.num_head_channels} must have one entry per level"
            )
        self.config = config
        self.encoder = DiffusionModelEncoder(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=NUM_CLASSES,
            input_shape=(config.image_size, config.image_size),
            num_res_blocks=config.num_res_blocks,
            channels=tuple(config.channels),
            attention_levels=tuple(config.attention_levels),
            norm_num_groups=config.norm_num_groups,
            resblock_updown=config.resblock_updown,
            num_head_channels=tuple(config.num_head_channels),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits of noisy images.

        Args:
            x_t: ``[B, C, H, W]`` noisy images, H = W = ``config.image_size``.
            t: ``[B]`` long training timesteps (a 0-d tensor or int is broadcast).

        Returns:
            logits: ``[B, 2]`` over (HEALTHY, UNHEALTHY).
        """
        size = self.config.image_size
        if tuple(x_t.shape[-2:]) != (size, size):
            raise ValueError(
                f"NoisyClassifier was built for {size}x{size} inputs (its head depends on the size), "
                f"got {tuple(x_t.shape[-2:])}; resize the images or train a classifier at this size"
            )
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.encoder(x_t, t.long())
