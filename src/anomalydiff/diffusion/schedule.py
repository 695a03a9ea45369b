"""Noise schedules (spec A.1): betas, alphas, alpha_bar and how a batch of timesteps reads them.

Paper symbol -> name in this module (code indexing of guided-diffusion, spec A.1):

============================  =====================================================================
paper                         here
============================  =====================================================================
:math:`T`                     ``num_timesteps`` (1000 in both papers)
:math:`\\beta_{i+1}`           ``betas[i]`` for training timestep ``t = i`` in ``0..T-1``
:math:`\\alpha_{i+1}`          ``alphas[i] = 1 - betas[i]``
:math:`\\bar\\alpha_{i+1}`      ``alpha_bar[i] = prod_{s<=i} alphas[s]``
:math:`\\bar\\alpha_{i}`        ``alpha_bar_prev[i]`` (``alpha_bar_prev[0] = 1``: the clean image)
============================  =====================================================================

A timestep ``t`` is always an integer *training* timestep in ``0..T-1`` (never a strided index). The
value ``t = -1`` names the clean image (``alpha_bar = 1``) and is accepted only where a formula is
defined there (the target of a DDIM decoding step, :meth:`NoiseSchedule.alpha_bar_at`).

All tables are float64 torch tensors on the CPU. Coefficients are looked up and combined in float64
and only then cast to the dtype and device of the tensor they multiply, so float32 inputs get the
same coefficients the float64 numpy code of guided-diffusion uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch

#: A batch of training timesteps: a LongTensor ``[B]`` (or ``[1]`` / 0-dim, broadcast to the batch),
#: or one Python ``int`` applied to every sample.
Timesteps = Union[torch.Tensor, int]

#: Nichol & Dhariwal (2021) cosine-schedule offset ``s`` and beta cap.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


@dataclass(frozen=True)
class ScheduleConfig:
    """Which beta schedule to build (spec A.1).

    Attributes:
        name: "linear" (both papers, spec A.1) or "cosine" (Nichol & Dhariwal 2021; in the code, unused).
        num_timesteps: T, the number of training timesteps (1000 in both papers; tests use 20-50).
        beta_start: first beta of the linear schedule (guided-diffusion: 1e-4 at T = 1000; unused by cosine).
        beta_end: last beta of the linear schedule (guided-diffusion: 0.02 at T = 1000; unused by cosine).
    """

    name: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.name not in ("linear", "cosine"):
            raise ValueError(f"ScheduleConfig.name is {self.name!r}; use 'linear' or 'cosine'.")
        if int(self.num_timesteps) != self.num_timesteps or self.num_timesteps < 2:
            raise ValueError(
                f"ScheduleConfig.num_timesteps is {self.num_timesteps!r}; use an integer >= 2 (1000 in the papers)."
            )
        if self.name == "linear" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"ScheduleConfig beta_start={self.beta_start}, beta_end={self.beta_end}: the linear schedule needs "
                "0 < beta_start <= beta_end < 1 (the papers use 1e-4 and 0.02)."
            )


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear schedule ``np.linspace(beta_start, beta_end, T)`` in float64 (spec A.1).

    Args:
        num_timesteps: T.
        beta_start: first beta.
        beta_end: last beta.

    Returns:
        float64 array ``[T]``.
    """
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021), as in guided-diffusion ``betas_for_alpha_bar``.

    ``f(u) = cos((u + s) / (1 + s) * pi / 2) ** 2`` with ``s = 0.008`` and
    ``betas[i] = min(1 - f((i + 1) / T) / f(i / T), 0.999)``, in float64.

    Args:
        num_timesteps: T.

    Returns:
        float64 array ``[T]``.
    """

    def f(u: float) -> float:
        return math.cos((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2.0) ** 2

    n = num_timesteps
    return np.array([min(1.0 - f((i + 1) / n) / f(i / n), COSINE_MAX_BETA) for i in range(n)], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The float64 tables of one schedule (spec A.1). Build it with :func:`make_schedule`.

    Attributes:
        betas: ``[T]`` float64, ``betas[t]`` is the beta of training timestep ``t``.
        alphas: ``[T]`` float64, ``1 - betas``.
        alpha_bar: ``[T]`` float64, cumulative product of ``alphas``.
        alpha_bar_prev: ``[T]`` float64, ``alpha_bar`` shifted right by one with ``alpha_bar_prev[0] = 1``.
        num_timesteps: T.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    num_timesteps: int

    def timesteps(self, t: Timesteps, like: torch.Tensor, allow_clean: bool = False) -> torch.Tensor:
        """Check a batch of training timesteps and return it as an int64 CPU tensor ``[B]``.

        Args:
            t: LongTensor ``[B]`` (``[1]`` or 0-dim is broadcast to the batch) or a Python int.
            like: the batch the timesteps belong to, ``[B, ...]``.
            allow_clean: also accept ``t = -1`` (the clean image, ``alpha_bar = 1``).

        Returns:
            int64 tensor ``[B]`` on the CPU.

        Raises:
            ValueError: ``t`` is not integer, has the wrong length, or is out of range.
        """
        batch = int(like.shape[0]) if like.ndim > 0 else 1
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise ValueError(f"t must be a LongTensor [B] of training timesteps or an int; got {type(t).__name__}.")
        t_cpu = torch.as_tensor(t).detach().to("cpu")
        if t_cpu.is_floating_point() or t_cpu.is_complex() or t_cpu.dtype == torch.bool:
            raise ValueError(
                f"t must hold integer training timesteps (got dtype {t_cpu.dtype}); pass t.long(), not a float time."
            )
        if t_cpu.ndim == 0 or (t_cpu.ndim == 1 and t_cpu.shape[0] == 1):
            t_cpu = t_cpu.reshape(1).expand(batch)
        elif t_cpu.ndim != 1 or t_cpu.shape[0] != batch:
            raise ValueError(
                f"t has shape {tuple(t_cpu.shape)} but the batch has {batch} samples; pass one timestep per sample, "
                "shape [B]."
            )
        t_cpu = t_cpu.to(torch.int64)
        lowest = -1 if allow_clean else 0
        if t_cpu.numel() and (int(t_cpu.min()) < lowest or int(t_cpu.max()) > self.num_timesteps - 1):
            raise ValueError(
                f"t holds values in [{int(t_cpu.min())}, {int(t_cpu.max())}] but this schedule accepts "
                f"[{lowest}, {self.num_timesteps - 1}] here; pass training timesteps (0..T-1"
                f"{', or -1 for the clean image' if allow_clean else ''}), not strided step indices."
            )
        return t_cpu

    def alpha_bar64(self, t: Timesteps, like: torch.Tensor, allow_clean: bool = False) -> torch.Tensor:
        """``alpha_bar[t]`` per sample as float64 CPU ``[B]`` (1.0 where ``t == -1`` if ``allow_clean``).

        Args:
            t: training timesteps, see :meth:`timesteps`.
            like: the batch ``[B, ...]``.
            allow_clean: accept ``t = -1``.

        Returns:
            float64 CPU tensor ``[B]``.
        """
        t_cpu = self.timesteps(t, like, allow_clean=allow_clean)
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return table[t_cpu + 1]

    def alpha_bar_at(self, t: Timesteps, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar[t]`` shaped to broadcast against ``like``; ``t == -1`` gives 1.0 (the clean image).

        Args:
            t: LongTensor ``[B]`` of training timesteps in ``-1..T-1``.
            like: ``[B, C, H, W]`` (any rank >= 1); sets the dtype, device and rank of the result.

        Returns:
            ``[B, 1, 1, 1]`` (``[B] + [1] * (like.ndim - 1)``) in ``like``'s dtype and device.
        """
        return as_coefficient(self.alpha_bar64(t, like, allow_clean=True), like)


def as_coefficient(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values ``[B]`` to ``[B, 1, ..., 1]`` in ``like``'s dtype and device.

    Args:
        values: ``[B]`` (usually float64 on the CPU).
        like: ``[B, ...]``.

    Returns:
        ``[B] + [1] * (like.ndim - 1)`` tensor with ``like``'s dtype and device.
    """
    shape = (values.shape[0],) + (1,) * max(like.ndim - 1, 0)
    return values.reshape(shape).to(device=like.device, dtype=like.dtype)


def schedule_from_betas(betas: np.ndarray | torch.Tensor) -> NoiseSchedule:
    """Build the float64 tables from any beta sequence.

    Args:
        betas: ``[T]`` with ``0 < beta < 1`` and ``T >= 2``.

    Returns:
        The :class:`NoiseSchedule`.

    Raises:
        ValueError: betas are not a 1-D sequence of at least 2 values in (0, 1).
    """
    if isinstance(betas, torch.Tensor):
        betas64 = betas.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        betas64 = torch.from_numpy(np.array(betas, dtype=np.float64))
    if betas64.ndim != 1 or betas64.shape[0] < 2:
        raise ValueError(f"betas must be 1-D with at least 2 entries; got shape {tuple(betas64.shape)}.")
    if not bool(((betas64 > 0) & (betas64 < 1)).all()):
        raise ValueError("every beta must lie in (0, 1); check the schedule's beta_start / beta_end.")
    # 1. alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s (spec A.1)
    alphas = 1.0 - betas64
    alpha_bar = torch.cumprod(alphas, dim=0)
    # 2. alpha_bar_prev[0] = 1 (the clean image), alpha_bar_prev[i] = alpha_bar[i-1]
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return NoiseSchedule(
        betas=betas64,
        alphas=alphas,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        num_timesteps=int(betas64.shape[0]),
    )


def make_schedule(config: ScheduleConfig) -> NoiseSchedule:
    """Build the schedule a config names (spec A.1).

    Args:
        config: which schedule and how many timesteps.

    Returns:
        The :class:`NoiseSchedule` with float64 tables.
    """
    if config.name == "linear":
        betas = linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
    else:
        betas = cosine_betas(config.num_timesteps)
    return schedule_from_betas(betas)
