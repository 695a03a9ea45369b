"""DDIM with classifier-free guidance (Sanchez et al., DGM4MICCAI 2022; DDIB-style translation).

"DDIM clf-free [17]" of the AnoFPDM paper's Table 1, as re-run there (spec D.3, ``scripts/translation_DDIB.py``):
the same CFG diffusion model as AnoFPDM (spec A.6: null = all-zero class embedding, ``NULL_LABEL``).
Symbols (architecture.md "Naming"): ``x0`` input in [-1, 1], ``xt`` noisy state, ``eps`` noise estimate,
``t`` training timestep, ``noise_level`` = L, ``guidance_w`` = w with ``eps~ = (1 + w) eps_h - w eps_null``
(the Ho-Salimans / Sanchez scale is ``s = 1 + w``, see ``anomalydiff.diffusion.guidance``).

Algorithm, per image (h = HEALTHY):

1. **Encode** from ``x0`` by DDIM inversion with the **null** condition (spec A.4 encoding):
   ``x0_hat, eps~ = predict_x0(x, t, eps_theta(x, t, null))``,
   ``x <- sqrt(alpha_bar[t_next]) x0_hat + sqrt(1 - alpha_bar[t_next]) eps~``.
2. **Decode** with DDIM and classifier-free guidance towards healthy (spec A.6, A.4 decoding):
   ``eps~ = (1 + w) eps_theta(x, t, h) - w eps_theta(x, t, null)``, both evaluated in ONE batched call on
   ``[x; x]`` with labels ``[h; null]`` (2 network evaluations per image per step), then
   ``x0_hat, eps~ = predict_x0(x, t, eps~)`` and ``x <- sqrt(alpha_bar[t_prev]) x0_hat + ...``;
   ``t_prev = -1`` returns ``x0_hat`` = ``x_hat``.
3. **Map** (spec D): ``A = med_5x5( (1/M) sum_m (x0_m - x_hat_m)^2 )`` over the inference modalities.

The method has no label-free threshold: P2 grid-searched L, w and a fixed tau with pixel labels (spec C.10,
Table 1 cross); ``pred_mask`` is None (tau comes from a fitted threshold policy), ``uses_pixel_labels`` True.

Loop indices (``index_convention``, explicit grid of training timesteps, stride ``j``):

- ``"code"`` (default; guided-diffusion's loop pattern, as in Diff-SCM ``sampling_utils`` and P2's
  re-run): grid ``G = [0, j, ..., L]``; L inversions (stride 1) evaluated at ``G[0..n-1]`` starting from the
  clean ``x0`` (read as level 0), to ``G[1..n]``; then L decoding steps evaluated at ``G[n-1] .. G[0]`` (the
  first reads the state of level L as ``G[n-1]``).
- ``"clean"``: grid ``G = [0, j, ..., L-1]``; inversions ``G[k] -> G[k+1]`` from ``x0`` (read as level 0),
  decoding at ``G[n] .. G[0]``: every model call sees the level of the state it is given.

Cost at stride 1: ``"code"`` L + 2L network evaluations per image (450 + 900 for BraTS, spec F.2),
``"clean"`` (L - 1) + 2L.

Deliberate differences from the official codes:

- Sanchez's original (``[SCM-code]``) uses an extra label index for null (dropout 0.35), a 100-step DDIM
  respacing with ``sampling_progression_ratio`` 0.75 and dynamic normalisation; P2's re-run (which we follow)
  uses AnoFPDM's CFG model, every step, no dynamic clipping. ``dynamic_clip=True`` adds Sanchez's
  normalisation (per image and channel: ``s = max(1, quantile_0.99 |x0_hat|)``, ``x0_hat = clamp(x0_hat, -s, s) / s``,
  then eps re-derived), applied to every x0 prediction of both loops [which loops Sanchez applies it to is
  UNVERIFIED].
- ``image_score`` (not defined by the papers) is the max (default) or mean of the map inside the brain.
- Fully deterministic: no draw from any RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from anomalydiff.diffusion.guidance import cfg_eps
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import ddim_invert_step, ddim_step, predict_eps_from_x0, predict_x0
from anomalydiff.labels import HEALTHY, NULL_LABEL, NUM_CLASSES
from anomalydiff.methods.base import EpsModel
from anomalydiff.methods.common import LoopPlan
from anomalydiff.methods.common import (
    NoFitCalibration,
    masked_image_score,
    reconstruction_error_map,
    strided_grid,
)
from anomalydiff.postprocess import median_filter
from anomalydiff.records import Batch, MethodOutput

__all__ = ["DDIB", "DDIBConfig", "dynamic_clip_x0"]


@dataclass(frozen=True)
class DDIBConfig:
    """Settings of the DDIM classifier-free counterfactual (defaults = P2's BraTS re-run, spec D.3)."""

    noise_level: int = 450  # L: P2 BraTS 450, ATLAS 300 (spec D.3)
    guidance_w: float = 1.1  # w of (1 + w) eps_h - w eps_null: P2 BraTS 1.1, ATLAS 1.3 (Sanchez s = 3 is w = 2)
    step_stride: int = 1  # P2: every step; j > 1 runs both loops on the strided grid [0, j, 2j, ...]
    index_convention: Literal["code", "clean"] = "code"  # guided-diffusion loop pattern, or no index lag
    target_label: int = HEALTHY  # decode towards healthy (spec D.3)
    dynamic_clip: bool = False  # Sanchez's dynamic normalisation; off in P2's re-run (spec D.3)
    dynamic_clip_quantile: float = 0.99  # Sanchez: the 99th percentile of |x0_hat| (spec D.3)
    modalities: tuple[int, ...] | None = (0, 3)  # BraTS FLAIR + T2 (spec C.1, D); None = all channels (ATLAS)
    median_size: int = 5  # 5x5 median filter before thresholding (spec C.9, D); 0 = off
    image_score: Literal["max", "mean"] = "max"  # not in the papers: max of the map inside the brain mask

    def __post_init__(self) -> None:
        if self.noise_level < 1:
            raise ValueError(f"DDIBConfig.noise_level is {self.noise_level}; use L >= 1 (P2: 450 / 300).")
        if self.step_stride < 1:
            raise ValueError(f"DDIBConfig.step_stride is {self.step_stride}; use an integer >= 1.")
        if self.target_label not in range(NUM_CLASSES):
            raise ValueError(f"DDIBConfig.target_label is {self.target_label}; use HEALTHY (0) or UNHEALTHY (1).")
        if not 0.0 < self.dynamic_clip_quantile <= 1.0:
            raise ValueError(f"DDIBConfig.dynamic_clip_quantile is {self.dynamic_clip_quantile}; use (0, 1] (0.99).")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"DDIBConfig.median_size is {self.median_size}; use 0 (off) or an odd size (5).")


def dynamic_clip_x0(x0_hat: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """Sanchez's dynamic normalisation of a predicted clean image (spec D.3).

    Per image and channel: ``s = max(1, Quantile_q(|x0_hat|))``, then ``clamp(x0_hat, -s, s) / s``.

    Args:
        x0_hat: ``[B, C, H, W]`` unclipped x0 prediction.
        quantile: ``q`` (0.99).

    Returns:
        ``[B, C, H, W]`` in [-1, 1].
    """
    flat = x0_hat.abs().flatten(2)
    s = torch.quantile(flat, quantile, dim=2).clamp(min=1.0)[..., None, None]
    return torch.maximum(torch.minimum(x0_hat, s), -s) / s


class DDIB(NoFitCalibration):
    """DDIM classifier-free counterfactual: null-label DDIM inversion, CFG decoding to healthy (spec D.3).

    Built from explicit parts: ``DDIB(eps_model, schedule, config)``.

    Args:
        eps_model: ``eps_model(x_t, t, y) -> eps`` of the CFG model (``NULL_LABEL`` = no condition).
        schedule: the noise schedule the network was trained with.
        config: :class:`DDIBConfig`.
    """

    name: ClassVar[str] = "ddib"
    #: P2 grid-searched L, w and the fixed threshold with pixel labels (spec C.10, Table 1 cross).
    uses_pixel_labels: ClassVar[bool] = True

    def __init__(self, eps_model: EpsModel, schedule: NoiseSchedule, config: DDIBConfig = DDIBConfig()) -> None:
        self.eps_model = eps_model
        self.schedule = schedule
        self.config = config
        self.plan = self.loop_plan()

    def loop_plan(self) -> LoopPlan:
        """The inversion and decoding timesteps (module docstring); ``start_level`` 0 = the clean ``x0``.

        Returns:
            The :class:`~anomalydiff.methods.common.LoopPlan`.
        """
        cfg = self.config
        highest = self.schedule.num_timesteps - 1
        top = cfg.noise_level if cfg.index_convention == "code" else cfg.noise_level - 1
        if top > highest:
            raise ValueError(
                f"DDIB noise_level={cfg.noise_level} ({cfg.index_convention} convention) inverts up to index {top}, "
                f"beyond the schedule's last timestep {highest}; lower noise_level."
            )
        grid = strided_grid(top, cfg.step_stride)
        n = len(grid) - 1
        encode = tuple((grid[k], grid[k + 1]) for k in range(n))
        first = n - 1 if cfg.index_convention == "code" else n
        decode = tuple((grid[k], grid[k - 1] if k > 0 else -1) for k in range(first, -1, -1))
        return LoopPlan(start_level=0, encode=encode, decode=decode)


    def _x0_and_eps(self, x: torch.Tensor, t_vec: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 prediction with the configured clipping (A.3 static clip, or Sanchez's dynamic one) and its eps."""
        if not self.config.dynamic_clip:
            return predict_x0(self.schedule, x, t_vec, eps, clip=True)
        x0_hat, _ = predict_x0(self.schedule, x, t_vec, eps, clip=False)
        x0_hat = dynamic_clip_x0(x0_hat, self.config.dynamic_clip_quantile)
        return x0_hat, predict_eps_from_x0(self.schedule, x, t_vec, x0_hat)

    def reconstruct(self, x0: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Healthy counterfactual of ``x0`` (steps 1-2 of the module docstring).

        Args:
            x0: ``[B, C, H, W]`` images in [-1, 1].

        Returns:
            ``(x_hat [B, C, H, W], network evaluations per image)``.
        """
        cfg = self.config
        batch = x0.shape[0]
        y_null = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=x0.device)
        y_pair = torch.cat([torch.full_like(y_null, cfg.target_label), y_null])
        evaluations = 0
        x = x0
        # 1. Null-label DDIM inversion from x0 (spec D.3, A.4 encoding)
        for t, t_next in self.plan.encode:
            t_vec = torch.full((batch,), t, dtype=torch.long, device=x0.device)
            eps_null = self.eps_model(x, t_vec, y_null)
            evaluations += 1
            x0_hat, eps_tilde = self._x0_and_eps(x, t_vec, eps_null)
            x = ddim_invert_step(self.schedule, x0_hat, eps_tilde, torch.full_like(t_vec, t_next))
        # 2. DDIM decoding with CFG towards healthy: eps_h and eps_null in ONE batched call (spec A.6, D.3)
        for t, t_prev in self.plan.decode:
            t_vec = torch.full((batch,), t, dtype=torch.long, device=x0.device)
            eps_pair = self.eps_model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), y_pair)
            evaluations += 2
            eps_h, eps_null = eps_pair[:batch], eps_pair[batch:]
            eps = cfg_eps(eps_h, eps_null, cfg.guidance_w)  # (1 + w) eps_h - w eps_null (A.6)
            x0_hat, eps_tilde = self._x0_and_eps(x, t_vec, eps)
            x = ddim_step(self.schedule, x0_hat, eps_tilde, torch.full_like(t_vec, t_prev))
        return x, evaluations

    def score(self, batch: Batch) -> MethodOutput:
        """Median-filtered squared error to the healthy counterfactual (spec D); no native mask.

        Args:
            batch: ``Batch`` with ``image [B, C, H, W]`` in [-1, 1]; labels are not used.

        Returns:
            ``MethodOutput`` with ``anomaly_map [B, 1, H, W]`` = ``med_5x5(mean_m (x0_m - x_hat_m)^2)``,
            ``image_score [B]``, ``pred_mask=None`` (threshold from a policy), ``nfe`` (encode + 2 x decode
            steps) and ``extras = {"reconstruction": x_hat}``.
        """
        cfg = self.config
        with torch.no_grad():
            x_hat, evaluations = self.reconstruct(batch.image)
            # 3. squared error averaged over the inference modalities, median filter (spec D)
            maps = reconstruction_error_map(batch.image, x_hat, "squared_mean", cfg.modalities)
            if cfg.median_size > 0:
                maps = median_filter(maps, size=cfg.median_size)
            image_score = masked_image_score(maps, batch.brain, cfg.image_score)
        return MethodOutput(
            anomaly_map=maps,
            image_score=image_score,
            pred_mask=None,
            pred_label=None,
            nfe=evaluations,
            extras={"reconstruction": x_hat},
        )
