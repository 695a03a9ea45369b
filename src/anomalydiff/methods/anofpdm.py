"""AnoFPDM: anomaly detection with the forward process of a classifier-free-guided diffusion model.

Paper: Che, Rafsani, Shah, Siddiquee, Wu, *AnoFPDM: Anomaly Detection with Forward Process of Diffusion
Models for Brain MRI*, arXiv 2404.15683 (v3, WACV 2025 workshop). Official code: github.com/SoloChe/AnoFPDM
(HEAD 94e838c). Implemented from ``method-spec.md`` section C (equation numbers below are the spec's, which
follow the paper's where they could be reconstructed) and the rulings of section E.

Naming (architecture.md): ``x0`` the input image in [-1, 1]; ``xt`` the noisy state; ``eps`` a noise
estimate; ``alpha_bar`` the cumulative schedule product; ``t``/``k`` a *training* timestep (0..T-1);
``guidance_w`` the CFG strength w with eps = (1+w) eps_h - w eps_null; ``end_step`` t_e. ``M`` is the number
of inference modalities (``config.modalities``), ``T''`` the number of evaluated forward steps
(``forward_steps`` T' divided by ``step_stride``).

Equations implemented (all per image; per modality where stated):

- (A.3) one-step prediction ``x0_hat(xt, t; e) = clip((xt - sqrt(1 - alpha_bar_t) e) / sqrt(alpha_bar_t))``.
- (A.6 / Eq. 6) guided noise ``eps_tilde = (1 + w) eps(xt, t, healthy) - w eps(xt, t, null)``.
- (Eq. 7) HGP ``x0_hat^h_t = x0_hat(xt, t; eps_tilde)``.
- (Eq. 10) UGP ``x0_hat^0_t = x0_hat(xt, t; eps(xt, t, null))`` with ``ugp_mode="null"`` (the paper), or
  ``x0_hat(xt, t; eps(xt, t, healthy))`` with ``ugp_mode="cond"`` (the official code, the default; spec E.1).
- (Eq. 12) divergence ``D_t = mean_pixels (HGP - UGP)^2`` per modality.
- (Eqs. 14, 16) ``MSE^h_t = mean (HGP - x0)^2`` and ``MSE^0_t = mean (UGP - x0)^2`` over modalities and pixels.
- (Eq. 18) ``s_cos = cos(m^h, m^0)`` of the two MSE sequences (``CosineSimilarity(eps=1e-6)``); predicted
  unhealthy iff ``s_cos <= tau_cos``.
- (Eq. 19) sub-anomaly map ``SAM_t = (HGP_t - x0)^2`` per modality.
- (Eq. 21) end step ``t_e = argmax_t D_t`` per image and modality (first maximum).
- (Eq. 20) aggregated map ``AAM = mean of SAM_t over evaluated steps [0, t_e)`` (the code's range, E.3);
  the single-SAM ``t_e`` variant uses the SAM at the evaluated step just before ``t_e`` (C.9).
- (Algorithm 1, C.8) ``r = clip(D_max / D*_max, 0, 1)``; ``j = trunc(round(r, 2) * 100)``;
  ``q = flip(linspace(q_l, q_u, 101))[j]``; ``tau_m = Quantile(AAM_m, q_m)`` on the unfiltered map;
  ``tau = mean_m tau_m``; ``Y = median5x5(mean_m AAM_m) >= tau``; components of <= 40 pixels removed (C.9).
- (C.6) ``tau_cos`` = the healthy-validation quantile (levels 0.005..0.095) with the fewest errors (first
  minimum); ``acc(w) = 1 - n_min / N``; ``w`` = the largest grid value with ``acc(w) >= 0.99 max acc``.
- (C.8) ``D*_max`` per modality = the largest ``max_t D_t`` over the unhealthy validation slices.

Deliberate differences from the official code (each is allowed or asked for by the spec):

1. Cost: 2 network evaluations per evaluated step (one batched call on ``[xt; xt]`` with labels
   ``[healthy; null]``) instead of the official 4 (DDIM) or 3 (DDPM): the conditional eps is reused for the
   code-UGP and the null eps is reused for the DDIM inversion (spec C.5 "a clean implementation needs 2").
2. No index lag in DDIM encoding: ``x^(0) = q_sample(x0, 0)``, then the state scored with index ``k`` sits at
   level ``k`` and is inverted with ``eps_null(x^(k), k)`` to the next evaluated index (spec C.5 / E.2 clean
   version). DDPM encoding draws a fresh ``q_sample`` at every step, as in the code.
3. Streamed reductions: nothing of shape ``[T', M, H, W]`` is held. Per step only the ``[B, M]`` divergence
   and the ``[B]`` MSEs are kept; the AAM is obtained from a running SAM total snapshotted whenever the
   running argmax of ``D_t`` moves (per-step maps are kept only with ``keep_steps=True``, for figures).
4. ``t_e = 0`` (the divergence peaks at the first evaluated step): the code averages an empty range and gets
   NaN. Here the AAM (and the single-SAM variant) fall back to the SAM at the first step, i.e. the paper's
   inclusive range ``1..t_e`` (Eq. 20) for that case, so no NaN reaches maps, thresholds or metrics.
5. A pixel whose aggregated map is exactly 0 is never flagged. This differs from the code only when the
   per-image threshold is itself 0 (the quantile falls on exact zeros, e.g. a small brain on a background
   whose clipped predictions equal the input); the code then flags the whole image.
6. Fitting the guidance grid: eps_h, eps_null and the trajectory do not depend on w (DDIM inverts with the
   null model; DDPM noise is seeded per image), and the unclipped HGP is linear in w, so ``fit`` evaluates
   every w of the grid from ONE forward pass per validation slice.
7. Randomness: every stochastic draw (``q_sample`` at step 0; DDPM noise) comes from a per-image generator
   seeded from ``(config.seed, subject_id, slice_index)``, so results do not depend on batching; the code
   draws from one global stream. Test slices are distinct (E.11) -- that is the data stage's business.
8. The Algorithm-1 index ``j`` is computed in float64, which reproduces the spec's truncation example
   (0.29 -> 28; float32 would give 29).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from anomalydiff.config import from_dict, to_dict
from anomalydiff.diffusion.guidance import cfg_eps
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import ddim_invert_step, predict_x0, q_sample
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.common import gaussian_per_image, image_generators
from anomalydiff.methods.base import EpsModel, NotFittedError
from anomalydiff.postprocess import median_filter, remove_small_components
from anomalydiff.records import Batch, MethodOutput

__all__ = [
    "AnoFPDM",
    "AnoFPDMConfig",
    "cosine_score",
    "dynamic_threshold",
    "fit_cos_threshold",
    "quantile_level",
    "select_guidance_w",
]

#: Fields of the config that change D_t or s_cos; a calibration fitted under other values is invalid.
_CALIBRATION_KEYS = ("forward_steps", "encoding", "ugp_mode", "modalities", "step_stride")


@dataclass(frozen=True)
class AnoFPDMConfig:
    """Settings of AnoFPDM (defaults = the BraTS setting of the paper / official code)."""

    #: CFG strength w used when ``select_w`` is False (BraTS: "selected w=2 for brats", spec C.6 / C.12).
    guidance_w: float = 2.0
    #: Number of forward steps T' (``forward_steps`` 600 in config/run_translation_*_fpdm.sh, spec C.5).
    forward_steps: int = 600
    #: "ddim" = deterministic null-model inversion (main method), "ddpm" = fresh q_sample per step (C.5, C.9).
    encoding: Literal["ddim", "ddpm"] = "ddim"
    #: UGP from the healthy-conditional eps ("cond", official code) or the null eps ("null", paper; spec E.1).
    ugp_mode: Literal["cond", "null"] = "cond"
    #: Channels used for maps, MSEs and divergences; None = all (ATLAS T1). BraTS preset (0, 3) = FLAIR, T2 (C.1).
    modalities: tuple[int, ...] | None = None
    #: Quantile range [q_l, q_u] of Algorithm 1 (code obtain_hyperpara.py, spec C.8 / E.9).
    quantile_range: tuple[float, float] = (0.90, 0.98)
    #: Number of quantile levels between q_l and q_u (code: linspace(.90, .98, 101), spec C.8).
    quantile_levels: int = 101
    #: Healthy-validation quantiles searched for tau_cos: linspace(start, stop, num) (cal_cos_and_abe_range, C.6).
    cos_quantiles: tuple[float, float, int] = (0.005, 0.095, 100)
    #: Guidance strengths searched by ``fit``, ascending (values the code used, spec C.6).
    w_grid: tuple[float, ...] = (1.0, 1.2, 1.5, 1.8, 2.0, 3.0, 5.0)
    #: Select w on validation (C.6; True) or keep ``guidance_w`` and fit only tau_cos and D*_max (False).
    select_w: bool = True
    #: Keep the largest w whose accuracy is >= this fraction of the peak accuracy (spec C.6: 99%).
    accuracy_ratio: float = 0.99
    #: "global": peak over the whole grid; "incremental": scan upward, stop at the first w below the ratio
    #: times the peak of the smaller candidates (both readings of C.6; the paper's text is ambiguous).
    w_selection: Literal["global", "incremental"] = "global"
    #: Single-SAM "t_e" variant of Table 1: the SAM at the step before t_e instead of the AAM (C.9, last_only).
    single_sam: bool = False
    #: Evaluate every k-th forward step (0, k, 2k, ... < T'); 1 = every step as in the paper (speed option).
    step_stride: int = 1
    #: Median filter size applied to the aggregated map before thresholding (median_pool 5x5, spec C.9).
    median_size: int = 5
    #: Connected components with filled area <= this many pixels are removed from the mask (spec C.9).
    min_component: int = 40
    #: Seed of the per-image generators (q_sample at step 0, DDPM noise); reproducible, batching-independent.
    seed: int = 0
    #: Keep per-step HGP/UGP/xt in ``extras`` (memory grows with T''; for figures only).
    keep_steps: bool = False

    def __post_init__(self) -> None:
        if self.forward_steps < 1:
            raise ValueError(f"AnoFPDMConfig.forward_steps must be >= 1, got {self.forward_steps}")
        if self.step_stride < 1:
            raise ValueError(f"AnoFPDMConfig.step_stride must be >= 1, got {self.step_stride}")
        low, high = self.quantile_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"AnoFPDMConfig.quantile_range must satisfy 0 <= q_l <= q_u <= 1, got {self.quantile_range}"
            )
        if self.quantile_levels < 2:
            raise ValueError(f"AnoFPDMConfig.quantile_levels must be >= 2, got {self.quantile_levels}")
        q_start, q_stop, q_num = self.cos_quantiles
        if not (0.0 <= q_start <= q_stop <= 1.0 and int(q_num) >= 1):
            raise ValueError(
                "AnoFPDMConfig.cos_quantiles must be (start, stop, num) with 0 <= start <= stop <= 1 and "
                f"num >= 1, got {self.cos_quantiles}"
            )
        if len(self.w_grid) == 0 or any(b <= a for a, b in zip(self.w_grid, self.w_grid[1:])):
            raise ValueError(f"AnoFPDMConfig.w_grid must be non-empty and strictly ascending, got {self.w_grid}")
        if any(w < 0 for w in self.w_grid) or self.guidance_w < 0:
            raise ValueError("AnoFPDMConfig: guidance strengths must be >= 0 (w = 0 is the conditional model)")
        if not 0.0 < self.accuracy_ratio <= 1.0:
            raise ValueError(f"AnoFPDMConfig.accuracy_ratio must be in (0, 1], got {self.accuracy_ratio}")
        if self.median_size < 1 or self.median_size % 2 == 0:
            raise ValueError(f"AnoFPDMConfig.median_size must be a positive odd number, got {self.median_size}")
        if self.min_component < 0:
            raise ValueError(f"AnoFPDMConfig.min_component must be >= 0, got {self.min_component}")
        if self.modalities is not None and (len(self.modalities) == 0 or min(self.modalities) < 0):
            raise ValueError(
                f"AnoFPDMConfig.modalities must be None or non-negative channel indices, got {self.modalities}"
            )

    @property
    def steps(self) -> list[int]:
        """The evaluated training timesteps ``0, stride, 2*stride, ... < forward_steps``."""
        return list(range(0, self.forward_steps, self.step_stride))


# ---------------------------------------------------------------------------------------------------------
# Pure pieces (public so that they can be checked against hand-computed examples)
# ---------------------------------------------------------------------------------------------------------


def cosine_score(mse_guided: torch.Tensor, mse_unguided: torch.Tensor) -> torch.Tensor:
    """Eq. 18: cosine similarity of the guided and unguided MSE sequences.

    Args:
        mse_guided: ``[..., T'']`` per-step MSE of the HGP against the input.
        mse_unguided: ``[..., T'']`` per-step MSE of the UGP against the input.

    Returns:
        ``[...]`` s_cos, as ``torch.nn.CosineSimilarity(dim=-1, eps=1e-6)`` (spec C.6).
    """
    return F.cosine_similarity(mse_guided, mse_unguided, dim=-1, eps=1e-6)


def quantile_level(
    ratio: torch.Tensor, quantile_range: tuple[float, float] = (0.90, 0.98), quantile_levels: int = 101
) -> torch.Tensor:
    """Algorithm 1 steps 1-3: the quantile level from the divergence ratio ``D_max / D*_max``.

    ``r = clip(ratio, 0, 1)``, ``j = trunc(round(r, 2) * (levels - 1))`` (the float product is truncated, so
    0.29 -> 28, spec E.13; computed in float64), ``q = flip(linspace(q_l, q_u, levels))[j]``: a large
    divergence (large lesion) gives a low quantile and hence more pixels.

    Args:
        ratio: ``[...]`` D_max / D*_max (any float dtype).
        quantile_range: ``(q_l, q_u)``.
        quantile_levels: number of levels (101 in the code).

    Returns:
        ``[...]`` float64 quantile levels.
    """
    r = torch.clamp(ratio.to(torch.float64), 0.0, 1.0)  # 1. clip rule
    j = (torch.round(r, decimals=2) * (quantile_levels - 1)).to(torch.int64)  # 2. truncating index
    j = torch.clamp(j, 0, quantile_levels - 1)
    levels = torch.flip(
        torch.linspace(quantile_range[0], quantile_range[1], quantile_levels, dtype=torch.float64), dims=(0,)
    ).to(r.device)
    return levels[j]  # 3. q = q_u - j/(levels-1) (q_u - q_l)


def dynamic_threshold(
    aam: torch.Tensor,
    d_max: torch.Tensor,
    d_max_star: torch.Tensor,
    quantile_range: tuple[float, float] = (0.90, 0.98),
    quantile_levels: int = 101,
    median_size: int = 5,
    min_component: int = 40,
) -> dict[str, torch.Tensor]:
    """Algorithm 1 (spec C.8) plus the C.9 post-processing, for a batch.

    Args:
        aam: ``[B, M, H, W]`` per-modality aggregated anomaly maps (unfiltered).
        d_max: ``[B, M]`` per-image ``max_t D_t``.
        d_max_star: ``[M]`` validation constant ``D*_max`` (> 0).
        quantile_range: ``(q_l, q_u)``.
        quantile_levels: number of quantile levels.
        median_size: median filter size (C.9).
        min_component: components with filled area <= this are removed (C.9).

    Returns:
        dict with ``mask`` ``[B, 1, H, W]`` bool (after the CC filter), ``anomaly_map`` ``[B, 1, H, W]``
        (median-filtered modality mean), ``threshold`` ``[B]`` (tau) and ``quantile`` ``[B, M]`` (q_m).
    """
    if aam.ndim != 4 or d_max.shape != aam.shape[:2] or d_max_star.shape != aam.shape[1:2]:
        raise ValueError(
            f"dynamic_threshold: need aam [B,M,H,W], d_max [B,M], d_max_star [M]; got {tuple(aam.shape)}, "
            f"{tuple(d_max.shape)}, {tuple(d_max_star.shape)}"
        )
    batch_size, num_mods = aam.shape[:2]
    # 1.-3. quantile level per image and modality from D_max / D*_max
    ratio = d_max.to(torch.float64) / d_max_star.to(device=d_max.device, dtype=torch.float64)[None, :]
    q = quantile_level(ratio, quantile_range, quantile_levels)
    # 4. tau_m = Quantile(AAM_m, q_m) over all pixels, background included, BEFORE median filtering
    #    (torch.quantile, linear interpolation, as the code)
    flat = aam.flatten(2)
    tau_m = torch.stack(
        [
            torch.stack([torch.quantile(flat[b, m], q[b, m].to(aam.dtype)) for m in range(num_mods)])
            for b in range(batch_size)
        ]
    )
    # 5. tau = mean over modalities
    tau = tau_m.mean(dim=1)
    # 6. prediction on the median-filtered modality-averaged map; an exactly-zero pixel is never flagged
    anomaly_map = median_filter(aam.mean(dim=1, keepdim=True), size=median_size)
    mask = (anomaly_map >= tau[:, None, None, None]) & (anomaly_map > 0)
    mask = remove_small_components(mask, max_size=min_component)
    return {"mask": mask, "anomaly_map": anomaly_map, "threshold": tau, "quantile": q}


def fit_cos_threshold(
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cos_quantiles: tuple[float, float, int] = (0.005, 0.095, 100),
) -> tuple[float, float, int]:
    """Spec C.6 steps 1-5: the cosine threshold from image-level validation labels.

    For ``q`` in ``linspace(*cos_quantiles)``: ``tau_q`` = q-quantile of the healthy scores (linear
    interpolation); errors ``n(q) = #{unhealthy: s > tau_q} + #{healthy: s < tau_q}``; the first minimum wins.

    Args:
        scores: ``[N]`` s_cos of the validation slices.
        labels: ``[N]`` image labels (``HEALTHY`` / ``UNHEALTHY``).
        cos_quantiles: ``(start, stop, num)`` of the healthy quantile levels.

    Returns:
        ``(tau_cos, accuracy, n_errors)`` with ``accuracy = 1 - n_errors / N``.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().to(torch.float64).numpy(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(labels).detach().cpu().numpy())
    healthy, unhealthy = s[y == HEALTHY], s[y == UNHEALTHY]
    if healthy.size == 0:
        raise ValueError("fit_cos_threshold: no healthy validation slices; tau_cos needs healthy slices")
    if not np.all(np.isfinite(s)):
        raise ValueError("fit_cos_threshold: non-finite cosine scores; check the eps model outputs")
    levels = np.linspace(cos_quantiles[0], cos_quantiles[1], int(cos_quantiles[2]))  # 2. healthy quantiles
    taus = np.quantile(healthy, levels)
    errors = (unhealthy[None, :] > taus[:, None]).sum(1) + (healthy[None, :] < taus[:, None]).sum(1)  # 3.
    best = int(np.argmin(errors))  # 4. first minimum
    n_errors = int(errors[best])
    return float(taus[best]), 1.0 - n_errors / s.size, n_errors  # 5.


def select_guidance_w(
    w_grid: Iterable[float],
    accuracies: Iterable[float],
    accuracy_ratio: float = 0.99,
    rule: Literal["global", "incremental"] = "global",
) -> float:
    """Spec C.6: the largest guidance strength whose accuracy stays within ``accuracy_ratio`` of the peak.

    Args:
        w_grid: ascending candidate strengths.
        accuracies: validation accuracy per candidate.
        accuracy_ratio: 0.99 in the paper.
        rule: ``"global"`` -- the peak is over the whole grid and the largest qualifying w is returned;
            ``"incremental"`` -- scan upward and stop at the first w whose accuracy is below the ratio times
            the peak of the candidates searched so far; the last accepted w is returned.

    Returns:
        The selected w.
    """
    ws, accs = list(map(float, w_grid)), list(map(float, accuracies))
    if len(ws) == 0 or len(ws) != len(accs):
        raise ValueError(f"select_guidance_w: need one accuracy per w, got {len(ws)} w and {len(accs)} accuracies")
    if rule == "global":
        peak = max(accs)
        return max(w for w, a in zip(ws, accs) if a >= accuracy_ratio * peak)
    if rule == "incremental":
        selected, peak = ws[0], accs[0]
        for w, a in zip(ws[1:], accs[1:]):
            if a < accuracy_ratio * peak:
                break
            selected, peak = w, max(peak, a)
        return selected
    raise ValueError(f"select_guidance_w: rule must be 'global' or 'incremental', got {rule!r}")


@dataclass
class _Step:
    """What the forward loop yields at one evaluated step."""

    index: int  # position in the evaluated grid
    t: torch.Tensor  # [B] long training timestep
    xt: torch.Tensor  # [B, C, H, W] noisy state at level t
    eps_healthy: torch.Tensor  # [B, C, H, W] eps(xt, t, HEALTHY)
    eps_null: torch.Tensor  # [B, C, H, W] eps(xt, t, NULL_LABEL)


class AnoFPDM:
    """AnoFPDM (spec C): label-free segmentation from the forward process of a CFG diffusion model.

    Args:
        eps_model: ``eps_model(xt [N,C,H,W], t [N] long, y [N] long) -> eps [N,C,H,W]``; ``y == NULL_LABEL``
            is the null condition (a trained ``ClassConditionalUNet`` or an analytic function).
        schedule: the noise schedule the model was trained with.
        config: method settings.
        model_id: optional identity of the model (e.g. checkpoint path + step), stored in the calibration
            and checked when a calibration is loaded.

    Fitted attributes (``fit`` or ``load_calibration``): ``guidance_w_``, ``tau_cos_``, ``d_max_star_``
    (``[M]``), ``accuracy_by_w_``, ``tau_cos_by_w_``, ``d_max_star_by_w_``.
    """

    name: ClassVar[str] = "anofpdm"
    uses_pixel_labels: ClassVar[bool] = False

    def __init__(
        self,
        eps_model: EpsModel,
        schedule: NoiseSchedule,
        config: AnoFPDMConfig = AnoFPDMConfig(),
        model_id: str | None = None,
    ) -> None:
        if config.forward_steps > schedule.num_timesteps:
            raise ValueError(
                f"AnoFPDMConfig.forward_steps={config.forward_steps} exceeds the schedule's "
                f"{schedule.num_timesteps} timesteps; lower forward_steps"
            )
        self.eps_model = eps_model
        self.schedule = schedule
        self.config = config
        self.model_id = model_id
        self.guidance_w_: float | None = None
        self.tau_cos_: float | None = None
        self.d_max_star_: list[float] | None = None
        self.accuracy_by_w_: dict[float, float] = {}
        self.tau_cos_by_w_: dict[float, float] = {}
        self.d_max_star_by_w_: dict[float, list[float]] = {}
        self.num_validation_: dict[str, int] = {}

    # ------------------------------------------------------------------ forward process
    @property
    def steps(self) -> list[int]:
        """Evaluated training timesteps (length T'')."""
        return self.config.steps

    def _modalities(self, num_channels: int) -> list[int]:
        mods = list(range(num_channels)) if self.config.modalities is None else list(self.config.modalities)
        if max(mods) >= num_channels:
            raise ValueError(
                f"AnoFPDMConfig.modalities={self.config.modalities} but the images have {num_channels} channels; "
                "set modalities to valid channel indices (e.g. method.modalities=null for all channels)"
            )
        return mods

    def _forward_process(self, batch: Batch) -> Iterator[_Step]:
        """Spec C.5: the noisy states and both eps evaluations, ONE batched model call per evaluated step.

        DDIM: ``x^(0) = q_sample(x0, 0, z)``; ``x^(next) = DDIMinv(x^(k))`` with the null eps at (x^(k), k)
        (A.4, no lag). DDPM: ``x^(k) = q_sample(x0, k, z_k)`` with fresh per-image noise at every step.
        """
        x0 = batch.image
        device, batch_size = x0.device, x0.shape[0]
        generators = image_generators(batch, self.config.seed)
        labels = torch.cat(
            [
                torch.full((batch_size,), HEALTHY, dtype=torch.long, device=device),
                torch.full((batch_size,), NULL_LABEL, dtype=torch.long, device=device),
            ]
        )
        steps = self.steps
        # 1. x^(0) = q_sample(x0, 0) (both encodings; alpha_bar[0] = 0.9999)
        t = torch.zeros(batch_size, dtype=torch.long, device=device)
        xt = q_sample(self.schedule, x0, t, gaussian_per_image(x0, generators))
        for index, k in enumerate(steps):
            t = torch.full((batch_size,), k, dtype=torch.long, device=device)
            if index > 0 and self.config.encoding == "ddpm":
                # 1b. DDPM encoding: fresh marginal sample at level k (P2 Eq. 2)
                xt = q_sample(self.schedule, x0, t, gaussian_per_image(x0, generators))
            # 2. one network call on [xt; xt] with labels [healthy; null] (2 NFE per image)
            eps = self.eps_model(torch.cat([xt, xt]), torch.cat([t, t]), labels)
            eps_healthy, eps_null = eps[:batch_size], eps[batch_size:]
            yield _Step(index=index, t=t, xt=xt, eps_healthy=eps_healthy, eps_null=eps_null)
            if self.config.encoding == "ddim" and index + 1 < len(steps):
                # 1a. DDIM inversion with the null eps to the next evaluated index (P2 Eq. 4, spec A.4)
                x0_null, eps_null_tilde = predict_x0(self.schedule, xt, t, eps_null, clip=True)
                t_next = torch.full((batch_size,), steps[index + 1], dtype=torch.long, device=device)
                xt = ddim_invert_step(self.schedule, x0_null, eps_null_tilde, t_next)

    # ------------------------------------------------------------------ validation statistics
    def guidance_grid_statistics(self, batch: Batch, w_values: Iterable[float]) -> dict[str, torch.Tensor]:
        """Per-step statistics for several guidance strengths from ONE forward pass (design note 6).

        The unclipped HGP is ``x0_null + (1 + w)(x0_cond - x0_null)`` (linear in w), clipped as in A.3.

        Args:
            batch: images (labels unused).
            w_values: W guidance strengths.

        Returns:
            dict with ``cos`` ``[W, B]``, ``d_max`` ``[W, B, M]``, ``divergence`` ``[W, B, T'', M]``,
            ``mse_guided`` ``[W, B, T'']`` and ``mse_unguided`` ``[B, T'']``.
        """
        ws = [float(w) for w in w_values]
        x0 = batch.image
        mods = self._modalities(x0.shape[1])
        x0_m = x0[:, mods]
        # per-step sequences are preallocated and written in place (see score: no per-step allocations kept)
        num_w, num_steps, batch_size = len(ws), len(self.steps), x0.shape[0]
        div = x0.new_zeros((num_w, batch_size, num_steps, len(mods)))
        mse_h = x0.new_zeros((num_w, batch_size, num_steps))
        mse_n = x0.new_zeros((batch_size, num_steps))
        with torch.no_grad():
            for step in self._forward_process(batch):
                # 2. unclipped one-step predictions of both eps (A.3)
                x0_cond, _ = predict_x0(self.schedule, step.xt, step.t, step.eps_healthy, clip=False)
                x0_null, _ = predict_x0(self.schedule, step.xt, step.t, step.eps_null, clip=False)
                x0_cond, x0_null = x0_cond[:, mods], x0_null[:, mods]
                ugp = (x0_cond if self.config.ugp_mode == "cond" else x0_null).clamp(-1.0, 1.0)  # Eq. 10 / E.1
                for i, w in enumerate(ws):
                    hgp = (x0_null + (1.0 + w) * (x0_cond - x0_null)).clamp(-1.0, 1.0)  # Eq. 7, linear in w
                    div[i, :, step.index] = ((hgp - ugp) ** 2).mean(dim=(2, 3))  # Eq. 12
                    mse_h[i, :, step.index] = ((hgp - x0_m) ** 2).mean(dim=(1, 2, 3))  # Eq. 14
                mse_n[:, step.index] = ((ugp - x0_m) ** 2).mean(dim=(1, 2, 3))  # Eq. 16
        return {
            "cos": cosine_score(mse_h, mse_n.unsqueeze(0).expand_as(mse_h)),  # Eq. 18
            "d_max": div.max(dim=2).values,
            "divergence": div,
            "mse_guided": mse_h,
            "mse_unguided": mse_n,
        }

    # ------------------------------------------------------------------ fit / calibration
    def fit(self, val_batches: Iterable[Batch]) -> "AnoFPDM":
        """Calibrate w, tau_cos and D*_max on validation batches using image-level labels only (C.6, C.8).

        Args:
            val_batches: validation batches; ``label`` must be ``HEALTHY`` or ``UNHEALTHY`` (masks unused).

        Returns:
            self.
        """
        ws = list(self.config.w_grid) if self.config.select_w else [float(self.config.guidance_w)]
        cos_parts, dmax_parts, label_parts = [], [], []
        for batch in val_batches:
            bad = ~((batch.label == HEALTHY) | (batch.label == UNHEALTHY))
            if bool(bad.any()):
                raise ValueError(
                    "AnoFPDM.fit: validation slices need image labels HEALTHY (0) or UNHEALTHY (1); got "
                    f"{sorted(set(batch.label[bad].tolist()))}. Use a labelled validation split."
                )
            stats = self.guidance_grid_statistics(batch, ws)
            cos_parts.append(stats["cos"].cpu())
            dmax_parts.append(stats["d_max"].cpu())
            label_parts.append(batch.label.cpu())
        if not label_parts:
            raise ValueError("AnoFPDM.fit: val_batches is empty; pass the validation batches")
        cos = torch.cat(cos_parts, dim=1)  # [W, N]
        d_max = torch.cat(dmax_parts, dim=1)  # [W, N, M]
        labels = torch.cat(label_parts)
        unhealthy = labels == UNHEALTHY
        if not bool(unhealthy.any()):
            raise ValueError("AnoFPDM.fit: no unhealthy validation slices; D*_max (spec C.8) needs some")
        self.accuracy_by_w_, self.tau_cos_by_w_, self.d_max_star_by_w_ = {}, {}, {}
        for i, w in enumerate(ws):
            tau, accuracy, _ = fit_cos_threshold(cos[i], labels, self.config.cos_quantiles)  # C.6 1-5
            self.tau_cos_by_w_[w], self.accuracy_by_w_[w] = tau, accuracy
            self.d_max_star_by_w_[w] = d_max[i][unhealthy].max(dim=0).values.tolist()  # C.8 D*_max
        chosen = select_guidance_w(
            ws, [self.accuracy_by_w_[w] for w in ws], self.config.accuracy_ratio, self.config.w_selection
        )
        d_star = self.d_max_star_by_w_[chosen]
        if not all(v > 0 and math.isfinite(v) for v in d_star):
            raise ValueError(
                f"AnoFPDM.fit: D*_max={d_star} at w={chosen} is not positive and finite; the model's guidance "
                "has no effect on the unhealthy validation slices (does the eps model use its label?)"
            )
        self.guidance_w_, self.tau_cos_, self.d_max_star_ = chosen, self.tau_cos_by_w_[chosen], d_star
        self.num_validation_ = {"healthy": int((labels == HEALTHY).sum()), "unhealthy": int(unhealthy.sum())}
        return self

    def _check_fitted(self) -> None:
        if self.guidance_w_ is None or self.tau_cos_ is None or self.d_max_star_ is None:
            raise NotFittedError(
                "AnoFPDM is not calibrated: call fit(val_batches) on labelled validation data, or "
                "load_calibration(...) with a calibration JSON written by calibration()"
            )

    def calibration(self) -> dict[str, Any]:
        """The fitted values (and the config and model identity) as a JSON-serialisable dict."""
        self._check_fitted()
        return {
            "method": self.name,
            "model": self.model_id,
            "config": to_dict(self.config),
            "guidance_w": self.guidance_w_,
            "tau_cos": self.tau_cos_,
            "d_max_star": list(self.d_max_star_ or []),
            "by_w": [
                {
                    "guidance_w": w,
                    "accuracy": self.accuracy_by_w_[w],
                    "tau_cos": self.tau_cos_by_w_[w],
                    "d_max_star": self.d_max_star_by_w_[w],
                }
                for w in sorted(self.accuracy_by_w_)
            ],
            "num_validation": dict(self.num_validation_),
        }

    def load_calibration(self, calibration: dict[str, Any]) -> "AnoFPDM":
        """Restore values written by :meth:`calibration`; refuses a calibration of another setting or model.

        Args:
            calibration: the dict (e.g. ``json.load`` of the calibration file).

        Returns:
            self.
        """
        if calibration.get("method") != self.name:
            raise ValueError(f"calibration is for method {calibration.get('method')!r}, not {self.name!r}")
        fitted_model = calibration.get("model")
        if self.model_id is not None and fitted_model is not None and fitted_model != self.model_id:
            raise ValueError(
                f"calibration was fitted for model {fitted_model!r} but this method wraps {self.model_id!r}; "
                "refit with fit(val_batches) for this model"
            )
        fitted_config = from_dict(AnoFPDMConfig, calibration["config"], where="calibration.config")
        for key in _CALIBRATION_KEYS:
            if getattr(fitted_config, key) != getattr(self.config, key):
                raise ValueError(
                    f"calibration was fitted with {key}={getattr(fitted_config, key)!r} but this method has "
                    f"{key}={getattr(self.config, key)!r}; use the matching config or refit with fit(val_batches)"
                )
        self.guidance_w_ = float(calibration["guidance_w"])
        self.tau_cos_ = float(calibration["tau_cos"])
        self.d_max_star_ = [float(v) for v in calibration["d_max_star"]]
        self.accuracy_by_w_ = {float(r["guidance_w"]): float(r["accuracy"]) for r in calibration.get("by_w", [])}
        self.tau_cos_by_w_ = {float(r["guidance_w"]): float(r["tau_cos"]) for r in calibration.get("by_w", [])}
        self.d_max_star_by_w_ = {
            float(r["guidance_w"]): [float(v) for v in r["d_max_star"]] for r in calibration.get("by_w", [])
        }
        self.num_validation_ = dict(calibration.get("num_validation", {}))
        return self

    # ------------------------------------------------------------------ scoring
    def score(self, batch: Batch) -> MethodOutput:
        """Maps, masks and healthy/unhealthy decisions for a batch; needs no labels (C.5, C.7-C.9).

        Args:
            batch: images ``[B, C, H, W]`` in [-1, 1] with ``subject_id``/``slice_index`` (seeding).

        Returns:
            MethodOutput with ``anomaly_map`` ``[B,1,H,W]`` (median-filtered aggregated map A),
            ``image_score`` ``[B]`` = 1 - s_cos, ``pred_mask`` = Algorithm-1 mask after the CC filter, gated by
            ``s_cos <= tau_cos`` (mixed setup), ``pred_label`` ``[B]``, ``nfe`` = 2 T'', and ``extras``:
            ``mask_ungated`` ``[B,1,H,W]`` (unhealthy setup), ``end_step`` ``[B,M]`` (t_e as a training
            timestep), ``d_max`` ``[B,M]``, ``cos`` ``[B]``, ``divergence`` ``[B,T'',M]``, ``mse_guided`` and
            ``mse_unguided`` ``[B,T'']``, ``hgp_at_end`` ``[B,M,H,W]``, ``aam`` ``[B,M,H,W]`` (the unfiltered
            per-modality map: AAM, or the single SAM in the t_e variant), ``threshold`` ``[B]``, ``quantile``
            ``[B,M]``, ``timesteps`` ``[T'']``, ``guidance_w``; with ``keep_steps`` also ``hgp_steps`` and
            ``ugp_steps`` ``[B,T'',M,H,W]`` and ``xt_steps`` ``[B,T'',C,H,W]``.
        """
        self._check_fitted()
        assert self.guidance_w_ is not None and self.tau_cos_ is not None and self.d_max_star_ is not None
        x0 = batch.image
        mods = self._modalities(x0.shape[1])
        if len(self.d_max_star_) != len(mods):
            raise ValueError(
                f"calibration has {len(self.d_max_star_)} D*_max values but {len(mods)} inference modalities; "
                "refit with fit(val_batches)"
            )
        w = self.guidance_w_
        x0_m = x0[:, mods]
        batch_size, num_mods = x0_m.shape[:2]
        zeros = torch.zeros_like(x0_m)
        running_sum = zeros.clone()  # sum of SAM_t over evaluated steps before the current one
        aam_sum = zeros.clone()  # running_sum snapshotted at the current argmax of D_t
        previous_sam = zeros.clone()
        single_sam = zeros.clone()  # SAM at the step before the current argmax (t_e variant)
        first_sam = zeros.clone()
        hgp_at_end = zeros.clone()
        best_d = torch.full((batch_size, num_mods), -math.inf, dtype=x0.dtype, device=x0.device)
        best_index = torch.zeros((batch_size, num_mods), dtype=torch.long, device=x0.device)
        # Per-step sequences are preallocated and written in place: keeping one small tensor per step made
        # glibc's heap fragment (RSS grew ~2 MB per step at B=8, 128x128) although no map was retained.
        num_steps = len(self.steps)
        divergence = x0.new_zeros((batch_size, num_steps, num_mods))
        mse_h = x0.new_zeros((batch_size, num_steps))
        mse_n = x0.new_zeros((batch_size, num_steps))
        kept: dict[str, list[torch.Tensor]] = {"hgp_steps": [], "ugp_steps": [], "xt_steps": []}
        with torch.no_grad():
            for step in self._forward_process(batch):
                # 3. HGP (Eq. 7) and UGP (Eq. 10 or the code's conditional UGP, E.1), clipped (A.3)
                hgp, _ = predict_x0(self.schedule, step.xt, step.t, cfg_eps(step.eps_healthy, step.eps_null, w))
                ugp_eps = step.eps_healthy if self.config.ugp_mode == "cond" else step.eps_null
                ugp, _ = predict_x0(self.schedule, step.xt, step.t, ugp_eps)
                hgp, ugp = hgp[:, mods], ugp[:, mods]
                # 4. streamed reductions: D_t (Eq. 12), MSE^h_t (Eq. 14), MSE^0_t (Eq. 16), SAM_t (Eq. 19)
                sam = (hgp - x0_m) ** 2
                d = ((hgp - ugp) ** 2).mean(dim=(2, 3))
                divergence[:, step.index] = d
                mse_h[:, step.index] = sam.mean(dim=(1, 2, 3))
                mse_n[:, step.index] = ((ugp - x0_m) ** 2).mean(dim=(1, 2, 3))
                # 5. running argmax of D_t (Eq. 21, first maximum); snapshot the AAM sum over [0, t_e)
                #    (in-place copies of fixed-size [H, W] slices: the accumulators are allocated once)
                moved = d > best_d
                for b, m in moved.nonzero().tolist():
                    aam_sum[b, m].copy_(running_sum[b, m])
                    single_sam[b, m].copy_(previous_sam[b, m])
                    hgp_at_end[b, m].copy_(hgp[b, m])
                best_index.masked_fill_(moved, step.index)
                best_d = torch.where(moved, d, best_d)
                if step.index == 0:
                    first_sam = sam
                running_sum.add_(sam)
                previous_sam = sam
                if self.config.keep_steps:
                    kept["hgp_steps"].append(hgp)
                    kept["ugp_steps"].append(ugp)
                    kept["xt_steps"].append(step.xt)
            # 6. AAM over [0, t_e) (Eq. 20, code range E.3) or the single SAM at t_e - 1 (C.9);
            #    t_e = 0 falls back to the first SAM (the paper's inclusive range), never NaN
            count = best_index[:, :, None, None]
            if self.config.single_sam:
                aam = torch.where(count > 0, single_sam, first_sam)
            else:
                aam = torch.where(count > 0, aam_sum / count.clamp(min=1).to(x0.dtype), first_sam)
            # 7. Algorithm 1 (C.8) and post-processing (C.9)
            d_max = best_d
            d_max_star = torch.tensor(self.d_max_star_, dtype=torch.float64, device=x0.device)
            result = dynamic_threshold(
                aam,
                d_max,
                d_max_star,
                self.config.quantile_range,
                self.config.quantile_levels,
                self.config.median_size,
                self.config.min_component,
            )
            # 8. classification gate (Eq. 18, C.9 mixed setup)
            cos = cosine_score(mse_h, mse_n)
            unhealthy = cos <= self.tau_cos_
        steps = torch.tensor(self.steps, dtype=torch.long, device=x0.device)
        extras: dict[str, Any] = {
            "mask_ungated": result["mask"],
            "end_step": steps[best_index],
            "d_max": d_max,
            "cos": cos,
            "divergence": divergence,
            "mse_guided": mse_h,
            "mse_unguided": mse_n,
            "hgp_at_end": hgp_at_end,
            "aam": aam,
            "threshold": result["threshold"],
            "quantile": result["quantile"],
            "timesteps": steps,
            "guidance_w": w,
        }
        if self.config.keep_steps:
            extras.update({key: torch.stack(value, dim=1) for key, value in kept.items()})
        return MethodOutput(
            anomaly_map=result["anomaly_map"],
            image_score=1.0 - cos,
            pred_mask=result["mask"] & unhealthy[:, None, None, None],
            pred_label=unhealthy.to(torch.long),
            nfe=2 * len(self.steps),
            extras=extras,
        )

    def with_config(self, **changes: Any) -> "AnoFPDM":
        """A copy with some config fields changed (e.g. ``keep_steps=True`` for figures), same calibration."""
        other = AnoFPDM(self.eps_model, self.schedule, dataclasses.replace(self.config, **changes), self.model_id)
        if self.guidance_w_ is not None:
            other.load_calibration(self.calibration())
        return other
