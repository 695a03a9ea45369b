"""AnoDDPM (Wyatt et al., CVPR-W 2022), as re-run in the AnoFPDM paper's Table 1: "AnoDDPM (G)" and "(S)".

Spec D.1 (the method), A.2-A.4 (the steps) and D (the shared map and threshold). Symbols (architecture.md
"Naming"): ``x0`` input in [-1, 1], ``xt`` noisy state, ``eps`` noise estimate, ``t`` training timestep,
``noise_level`` = lambda, ``x_hat`` the reconstruction.

The model is an unconditional DDPM trained on **healthy slices only** (``UnconditionalUNet``; we call it with
``y = NULL_LABEL``, which it ignores). The simplex model is trained with simplex noise as the regression
target; the Gaussian model with Gaussian noise.

Algorithm, per image:

1. Partial noising to lambda (spec D.1, A.2): ``x_lambda = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) n``, with
   ``n ~ N(0, I)`` ("gaussian") or fractal 3-D OpenSimplex noise at the timestep ("simplex", D.1: 6 octaves,
   persistence 0.8, frequency 64, fresh seed per sample and channel).
2. DDPM reconstruction (spec A.4): for each t down to 0, ``x0_hat = clip(predict_x0(x, t, eps_theta))``,
   ``x <- mu_t(x, x0_hat) + sigma_t z`` with the fixed-large variance ``sigma_t^2 = beta_t`` and ``z`` drawn
   from the same noise family as step 1 (simplex noise at timestep t for "(S)"); no noise at t = 0.
3. Map (spec D): ``A = med_5x5( (1/M) sum_m (x0_m - x_hat_m)^2 )`` over the inference modalities (BraTS:
   FLAIR and T2, channels 0 and 3).

AnoDDPM has no label-free threshold of its own: the papers pick a fixed tau by a Dice grid search with pixel
labels on validation (spec C.10; Table 1 cross), so ``pred_mask`` is None and the fixed threshold comes from a
fitted threshold policy (``anomalydiff.postprocess``); ``uses_pixel_labels`` is True.

Loop indices (``index_convention``): ``"code"`` (default) follows AnoDDPM's ``forward_backward``:
``q_sample`` at index lambda, then reverse steps at t = lambda-1 .. 0 (the first step reads a state of level
lambda as lambda-1). ``"clean"``: ``q_sample`` at index lambda-1 (paper t = lambda), then steps at
lambda-1 .. 0, no lag. Both spend lambda network evaluations (one per reverse step).

Deliberate differences from the official code ([ADDPM-code], P2 ``config/run_translation_*``):

- Simplex noise is our vectorised torch port of OpenSimplex (``anomalydiff.diffusion.noise``), same
  algorithm and parameters; seeds come from the per-image generator, not Python's ``random``.
- Every stochastic draw comes from a per-image generator seeded from ``(seed, subject_id, slice_index)``, so
  results do not depend on batching.
- ``image_score`` (not defined by AnoDDPM) is the max (default) or mean of the final map inside the brain.
- P2 sampled with DDPM at 128x128; the original AnoDDPM used 256x256 and lambda = 250 (spec D.1 table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch

from anomalydiff.diffusion.noise import SimplexConfig, fractal_simplex_noise
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import ddpm_step, predict_x0, q_sample
from anomalydiff.labels import NULL_LABEL
from anomalydiff.methods.base import EpsModel
from anomalydiff.methods.common import (
    NoFitCalibration,
    gaussian_per_image,
    image_generators,
    masked_image_score,
    reconstruction_error_map,
)
from anomalydiff.postprocess import median_filter
from anomalydiff.records import Batch, MethodOutput

__all__ = ["AnoDDPM", "AnoDDPMConfig"]

#: Upper bound of the OpenSimplex seeds ``simplex_noise`` draws (``torch.randint(0, 2**63 - 1, ...)``).
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class AnoDDPMConfig:
    """Settings of AnoDDPM (defaults = the AnoFPDM paper's BraTS simplex run, spec D.1 table)."""

    noise: Literal["gaussian", "simplex"] = "simplex"  # "(G)" or "(S)" of P2 Table 1 (spec D.1)
    noise_level: int = 200  # lambda: P2 BraTS simplex 200, Gaussian 300; ATLAS 200 / 100 (spec D.1 table)
    simplex: SimplexConfig = field(default_factory=SimplexConfig)  # 6 octaves, 0.8, frequency 64 (spec D.1)
    index_convention: Literal["code", "clean"] = "code"  # AnoDDPM forward_backward (q at lambda) or no lag
    model_label: int = NULL_LABEL  # the healthy-only model is unconditional and ignores y
    modalities: tuple[int, ...] | None = (0, 3)  # BraTS FLAIR + T2 (spec C.1, D); None = all channels (ATLAS)
    median_size: int = 5  # 5x5 median filter before thresholding (spec C.9, D); 0 = off
    image_score: Literal["max", "mean"] = "max"  # not in the paper: max of the map inside the brain mask
    seed: int = 0  # seeds the per-image generators (initial noise and every step's noise)

    def __post_init__(self) -> None:
        if self.noise_level < 1:
            raise ValueError(f"AnoDDPMConfig.noise_level is {self.noise_level}; use lambda >= 1 (P2: 200/300).")
        if self.noise not in ("gaussian", "simplex"):
            raise ValueError(f"AnoDDPMConfig.noise is {self.noise!r}; use 'gaussian' or 'simplex'.")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"AnoDDPMConfig.median_size is {self.median_size}; use 0 (off) or an odd size (5).")


class AnoDDPM(NoFitCalibration):
    """AnoDDPM: partial noising to lambda and DDPM reconstruction with a healthy-only model (spec D.1).

    Built from explicit parts: ``AnoDDPM(eps_model, schedule, config)``.

    Args:
        eps_model: ``eps_model(x_t, t, y) -> eps`` of the healthy-only (unconditional) network; for the simplex
            variant, the network trained to predict simplex noise.
        schedule: the noise schedule the network was trained with.
        config: :class:`AnoDDPMConfig`.
    """

    name: ClassVar[str] = "anoddpm"
    #: P2 grid-searched lambda and the fixed threshold with pixel labels (spec C.10, Table 1 cross).
    uses_pixel_labels: ClassVar[bool] = True

    def __init__(self, eps_model: EpsModel, schedule: NoiseSchedule, config: AnoDDPMConfig = AnoDDPMConfig()) -> None:
        self.eps_model = eps_model
        self.schedule = schedule
        self.config = config
        highest = schedule.num_timesteps - 1
        self.start_level = config.noise_level if config.index_convention == "code" else config.noise_level - 1
        if self.start_level > highest:
            raise ValueError(
                f"AnoDDPM noise_level={config.noise_level} ({config.index_convention} convention) noises to index "
                f"{self.start_level}, beyond the schedule's last timestep {highest}; lower noise_level."
            )
        #: reverse-step timesteps, lambda-1 .. 0 (one network evaluation each)
        self.reverse_steps: tuple[int, ...] = tuple(range(config.noise_level - 1, -1, -1))


    def _noise(self, like: torch.Tensor, t: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Noise of the configured family for each image at timestep ``t``, ``[B, C, H, W]``.

        Simplex: each image's ``C`` OpenSimplex seeds are drawn from its own generator exactly as
        ``simplex_noise((1, C, H, W), t, generator=g)`` draws them, then the whole batch is evaluated in one
        ``fractal_simplex_noise`` call (the per-call set-up dominates at small sizes).
        """
        if self.config.noise == "gaussian":
            return gaussian_per_image(like, generators)
        _, channels, height, width = like.shape
        seeds = torch.cat([
            torch.randint(0, _INT64_MAX, (1, channels), generator=g, device=g.device, dtype=torch.int64)
            for g in generators
        ])
        t_vec = torch.full((like.shape[0],), int(t), dtype=torch.long)
        return fractal_simplex_noise(
            seeds, t_vec, height, width, config=self.config.simplex, device=like.device, dtype=like.dtype
        )

    def reconstruct(self, x0: torch.Tensor, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, int]:
        """DDPM reconstruction from the partially noised input (spec D.1).

        Args:
            x0: ``[B, C, H, W]`` images in [-1, 1].
            generators: one generator per image.

        Returns:
            ``(x_hat [B, C, H, W], network evaluations per image)``.
        """
        schedule = self.schedule
        y = torch.full((x0.shape[0],), int(self.config.model_label), dtype=torch.long, device=x0.device)
        # 1. x_lambda = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) n, n Gaussian or simplex (spec D.1, A.2)
        start = torch.full((x0.shape[0],), self.start_level, dtype=torch.long, device=x0.device)
        x = q_sample(schedule, x0, start, self._noise(x0, self.start_level, generators))
        calls = 0
        for t in self.reverse_steps:
            t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
            eps = self.eps_model(x, t_vec, y)
            calls += 1
            # 2. clipped x0 prediction (A.3), posterior mean + sigma_t z with z of the same family (A.4, D.1)
            x0_hat, _ = predict_x0(schedule, x, t_vec, eps, clip=True)
            noise = self._noise(x, t, generators) if t > 0 else torch.zeros_like(x)
            x = ddpm_step(schedule, x, t_vec, x0_hat, noise)
        return x, calls

    def score(self, batch: Batch) -> MethodOutput:
        """Median-filtered squared reconstruction error (spec D); no native mask.

        Args:
            batch: ``Batch`` with ``image [B, C, H, W]`` in [-1, 1]; labels are not used.

        Returns:
            ``MethodOutput`` with ``anomaly_map [B, 1, H, W]`` = ``med_5x5(mean_m (x0_m - x_hat_m)^2)``,
            ``image_score [B]`` (max/mean of the map inside the brain), ``pred_mask=None`` (threshold from a
            policy), ``nfe`` = lambda (one per reverse step), ``extras = {"reconstruction": x_hat}``.
        """
        cfg = self.config
        with torch.no_grad():
            x_hat, calls = self.reconstruct(batch.image, image_generators(batch, cfg.seed))
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
            nfe=calls,
            extras={"reconstruction": x_hat},
        )
