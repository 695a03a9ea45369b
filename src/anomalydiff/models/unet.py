"""Noise-prediction UNets: class-conditional (CFG, AnoFPDM / Wolleb) and unconditional (AnoDDPM).

Both wrap MONAI's ``DiffusionModelUNet`` (``spatial_dims=2``). The class-conditional network owns its
class embedding instead of MONAI's ``class_embedding`` so that

* the null condition is the **all-zero class embedding** (spec A.6): label ``NULL_LABEL`` indexes row 2
  of ``nn.Embedding(3, D, padding_idx=NULL_LABEL)``, a row that is initialised to zero and never receives
  a gradient, so it stays zero through training;
* a caller can pass any embedding vector (``forward_embedding``), e.g. the CG-CDM baseline's
  interpolation ``alpha * e_unhealthy + (1 - alpha) * e_healthy`` (spec D.4).

Naming (architecture.md): ``x_t`` noisy image ``[B, C, H, W]``, ``t`` training timestep ``[B]`` long in
0..T-1 (never a respaced index), ``y`` label ``[B]`` long in {HEALTHY, UNHEALTHY, NULL_LABEL}, ``eps``
predicted noise ``[B, C, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, get_timestep_embedding
from torch import nn

from anomalydiff.labels import NULL_LABEL

ClassConditioning = Literal["add", "add+cross_attention"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a noise-prediction UNet (sizes live in ``configs/models/{tiny,cpu,paper}.yaml``).

    MONAI's UNet has no FiLM scale-shift norm and no res-block dropout, unlike the ADM UNet of AnoFPDM
    (spec C.2); everything else maps one to one.
    """

    in_channels: int | None = None  # image channels; None = filled in from the slice store by the trainer
    out_channels: int | None = None  # eps channels; None = in_channels (eps-prediction, learn_sigma False, C.2)
    channels: tuple[int, ...] = (32, 64, 64)  # channels per resolution level ("cpu" size; C.2 uses 128*(1,1,2,3,4))
    attention_levels: tuple[bool, ...] = (False, True, True)  # self-attention per level (C.2: at 32,16,8 px)
    num_res_blocks: int = 2  # residual blocks per level (C.2: 2)
    num_head_channels: tuple[int, ...] = (32, 32, 32)  # channels per attention head per level (C.2: 4 heads)
    norm_num_groups: int = 32  # GroupNorm groups (ADM: 32); must divide every entry of channels
    resblock_updown: bool = False  # C.2 uses conv up/down-sampling, not residual blocks
    class_conditioning: ClassConditioning = "add"  # A.6 (i) add to time embedding; "+cross_attention" adds A.6 (ii)
    use_flash_attention: bool = False  # torch SDPA kernels in attention (GPU speed-up; off = MONAI default)

    def resolved(self, in_channels: int) -> "UNetConfig":
        """This config with ``in_channels`` / ``out_channels`` filled in (the store's channel count)."""
        c_in = self.in_channels if self.in_channels is not None else in_channels
        c_out = self.out_channels if self.out_channels is not None else c_in
        return replace(self, in_channels=c_in, out_channels=c_out)

    @property
    def embedding_dim(self) -> int:
        """Width D of the time and class embeddings (MONAI: 4 x the first level's channels)."""
        return 4 * self.channels[0]


def _check_config(config: UNetConfig) -> None:
    if config.in_channels is None:
        raise ValueError(
            "UNetConfig.in_channels is None: set model.in_channels, or build the network through the trainer, "
            "which fills it in from the slice store (config.resolved(channels))"
        )
    n = len(config.channels)
    if len(config.attention_levels) != n or len(config.num_head_channels) != n:
        raise ValueError(
            f"UNetConfig: channels {config.channels}, attention_levels {config.attention_levels} and "
            f"num_head_channels {config.num_head_channels} must have one entry per level"
        )


def _build_monai_unet(config: UNetConfig, cross_attention_dim: int | None) -> DiffusionModelUNet:
    _check_config(config)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=int(config.in_channels),  # type: ignore[arg-type]
        out_channels=int(config.out_channels if config.out_channels is not None else config.in_channels),  # type: ignore[arg-type]
        num_res_blocks=config.num_res_blocks,
        channels=tuple(config.channels),
        attention_levels=tuple(config.attention_levels),
        norm_num_groups=config.norm_num_groups,
        resblock_updown=config.resblock_updown,
        num_head_channels=tuple(config.num_head_channels),
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
        num_class_embeds=None,  # the class embedding is ours (zero null row, embedding input)
        use_flash_attention=config.use_flash_attention,
    )


def _as_timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a [B]={batch} tensor of training timesteps, got shape {tuple(t.shape)}")
    return t.long()


def _run_unet(
    unet: DiffusionModelUNet,
    x_t: torch.Tensor,
    t: torch.Tensor,
    class_emb: torch.Tensor | None,
    context: torch.Tensor | None,
) -> torch.Tensor:
    """MONAI ``DiffusionModelUNet.forward`` with an externally supplied class embedding (steps as in MONAI 1.6)."""
    # 1. time embedding
    t_emb = get_timestep_embedding(t, unet.block_out_channels[0]).to(dtype=x_t.dtype)
    emb = unet.time_embed(t_emb)
    # 2. class embedding added to the time embedding every ResBlock receives (spec A.6 (i))
    if class_emb is not None:
        emb = emb + class_emb.to(dtype=emb.dtype)
    # 3. initial convolution
    h = unet.conv_in(x_t)
    # 4. down path, keeping the skip connections
    skips: list[torch.Tensor] = [h]
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb, context=context)
        skips.extend(res)
    # 5. middle
    h = unet.middle_block(hidden_states=h, temb=emb, context=context)
    # 6. up path
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        h = block(hidden_states=h, res_hidden_states_list=res, temb=emb, context=context)
    # 7. output
    return unet.out(h)


class ClassConditionalUNet(nn.Module):
    """eps_theta(x_t, t, y) with labels {HEALTHY, UNHEALTHY} and NULL_LABEL = the zero class embedding.

    A model instance is an ``eps_model`` callable (architecture.md): ``model(x_t, t, y) -> eps``.

    Args:
        config: architecture; ``config.in_channels`` must be set (see :meth:`UNetConfig.resolved`).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embedding_dim
        self.cross_attention = config.class_conditioning == "add+cross_attention"
        self.unet = _build_monai_unet(config, cross_attention_dim=dim if self.cross_attention else None)
        # Row NULL_LABEL (= 2) is zero and gets no gradient: the null condition of spec A.6.
        self.label_embedding = nn.Embedding(3, dim, padding_idx=NULL_LABEL)

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """Class embedding of labels.

        Args:
            y: ``[B]`` long labels in {HEALTHY, UNHEALTHY, NULL_LABEL}.

        Returns:
            ``[B, D]`` embeddings (all zero for NULL_LABEL), D = ``config.embedding_dim``.
        """
        return self.label_embedding(y.long())

    def forward_embedding(self, x_t: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Noise prediction for an arbitrary class embedding.

        Args:
            x_t: ``[B, C, H, W]`` noisy images.
            t: ``[B]`` long training timesteps (a 0-d tensor or int is broadcast).
            class_emb: ``[B, D]`` class embeddings (e.g. an interpolation of two rows of :meth:`class_embedding`).

        Returns:
            eps: ``[B, C_out, H, W]``.
        """
        t = _as_timesteps(t, x_t.shape[0], x_t.device)
        if class_emb.shape != (x_t.shape[0], self.config.embedding_dim):
            raise ValueError(
                f"class_emb must be [B, D]={(x_t.shape[0], self.config.embedding_dim)}, got {tuple(class_emb.shape)}"
            )
        context = None
        if self.cross_attention:
            # A.6 (ii): the outer product c c^T as D context tokens of width D; the null condition gives zeros.
            c = class_emb.to(dtype=x_t.dtype)
            context = c[:, :, None] * c[:, None, :]
        return _run_unet(self.unet, x_t, t, class_emb, context)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t, y).

        Args:
            x_t: ``[B, C, H, W]`` noisy images.
            t: ``[B]`` long training timesteps.
            y: ``[B]`` long labels in {HEALTHY, UNHEALTHY, NULL_LABEL}.

        Returns:
            eps: ``[B, C_out, H, W]``.
        """
        if y is None:
            raise ValueError("ClassConditionalUNet needs labels y; pass NULL_LABEL for the unconditional prediction")
        y = torch.as_tensor(y, device=x_t.device)
        if y.ndim == 0:
            y = y.expand(x_t.shape[0])
        return self.forward_embedding(x_t, t, self.class_embedding(y))


class UnconditionalUNet(nn.Module):
    """eps_theta(x_t, t) for the healthy-only AnoDDPM models (spec D.1); ``y`` is accepted and ignored.

    Args:
        config: architecture (``class_conditioning`` is ignored).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = _build_monai_unet(config, cross_attention_dim=None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t).

        Args:
            x_t: ``[B, C, H, W]`` noisy images.
            t: ``[B]`` long training timesteps.
            y: ignored (any labels, or None), so the network fits the ``eps_model(x_t, t, y)`` interface.

        Returns:
            eps: ``[B, C_out, H, W]``.
        """
        del y
        return _run_unet(self.unet, x_t, _as_timesteps(t, x_t.shape[0], x_t.device), None, None)
