"""Wolleb et al. 2022, *Diffusion Models for Medical Anomaly Detection* (MICCAI 2022, arXiv 2203.04306).

Spec section B (the method), A.3/A.4/A.7 (the steps it is built from), D.2 (the AnoFPDM paper's re-run,
"DDIM clf" of its Table 1) and E.14/E.16 (paper-vs-code notes). Symbols (architecture.md "Naming"):
``x0`` the input image in [-1, 1], ``xt`` the noisy state, ``eps`` the network's noise estimate, ``t`` a
*training* timestep (code index 0..T-1; -1 names the clean image), ``noise_level`` = L,
``classifier_scale`` = s, ``x_hat`` the healthy counterfactual ("reconstruction").

Algorithm (spec B.3), per image, with h = HEALTHY:

1. ``x <- q_sample(x0, t=0, noise)``: an almost clean copy (alpha_bar[0] = 0.9999).
2. **Encode** (DDIM inversion, spec A.4): ``x0_hat, eps~ = predict_x0(x, t, eps_theta(x, t, h))`` (clip to
   [-1, 1] then re-derive eps, A.3), ``x <- sqrt(alpha_bar[t']) x0_hat + sqrt(1 - alpha_bar[t']) eps~``. The
   diffusion model is conditioned on y = h, no classifier gradient.
3. **Decode** (guided DDIM, spec A.7 + A.4): ``eps_hat = eps~ - s sqrt(1 - alpha_bar[t]) grad_x log p_phi(h | x, t)``,
   ``x0_hat = (x - sqrt(1 - alpha_bar[t]) eps_hat) / sqrt(alpha_bar[t])`` (**not** clipped again),
   ``x <- sqrt(alpha_bar[t_prev]) x0_hat + sqrt(1 - alpha_bar[t_prev]) eps_hat``; at ``t_prev = -1`` the output
   is ``x0_hat`` = ``x_hat``.
4. **Anomaly map** (B.3 step 4): ``a = sum_c |x0_c - x_hat_c|``; CheXpert form (``map_normalisation="minmax"``):
   ``sum_c |mm(x0) - mm(x_hat)|`` with ``mm`` the per-image min-max normalisation.
5. **Segmentation** (B.3 step 5): ``mask = 1[a > tau_Otsu(a)]``, Otsu per image (skimage ``threshold_otsu``).

Loop indices (spec B.3 "code detail", E.16), ``index_convention``:

- ``"code"`` (default, the official loops literally): ``noise_level = L`` runs ``L - 1`` inversions evaluated
  at ``t = 1 .. L-1`` (state leaves at level ``t + 1``, so the first one skips level 1) and ``L - 1`` guided
  decoding steps evaluated at ``t = L-2 .. 0`` (the first one reads a state at level ``L`` as ``L - 2``).
  With ``step_stride = j`` the same loops run in *grid-position* space on the explicit grid
  ``G = [0, j, 2j, ..., L]``, as guided-diffusion's respaced sampler would: inversions at ``G[1..n-1]`` to
  ``G[2..n]``, decoding at ``G[n-2] .. G[0]``.
- ``"clean"`` (paper form, no lag): grid ``G = [0, j, ..., L-1]`` (paper t = L is code index L-1); inversions
  at ``G[0..n-1]`` to ``G[1..n]``, decoding at ``G[n] .. G[0]``, every model call sees the index of the state
  it is given. ``L - 1`` inversions and ``L`` decoding steps at stride 1.
- With ``encoding="q_sample"`` there is no inversion: the state is noised straight to ``G[n-1]`` (``code``;
  L-1 at stride 1, the decoding loop then reads it as ``G[n-2]``, as the official ``range(L-1)`` loop does)
  or to ``G[n]`` = L-1 (``clean``), and the same decoding loop runs. :meth:`Wolleb.loop_plan` lists every
  timestep.

Variants (named presets in ``configs/methods/``):

- ``wolleb_p1``: P1 as published, L = 500, s = 100, every step (``timestep_respacing ddim1000``), L1 map
  summed over all channels, Otsu per image.
- ``wolleb_p2``: the AnoFPDM re-run (spec D.2): ``encoding="q_sample"`` (stochastic noising to index L-1,
  the official DDIM inversion is commented out there), L = 200, s = 1000 (BraTS; 500 for ATLAS), squared error
  averaged over FLAIR and T2 (channels 0, 3), 5x5 median filter, and a fixed threshold fitted *outside* the
  method by a threshold policy (``pred_mask`` is None). P2 grid-searched L, s and that threshold with pixel
  labels (Table 1 cross, spec C.10), so this preset sets ``tuned_with_pixel_labels`` and the instance's
  ``uses_pixel_labels`` is True. P1 itself uses no pixel labels (Otsu), so the class attribute is False.
- ``wolleb_ddpm``: P1's stochastic ablation (spec B.3 "DDPM variant"): ``q_sample`` to index L-1, then
  ancestral sampling with the classifier-guided posterior mean ``mu' = mu + s Sigma grad`` (A.7, DDPM form).

Deliberate differences from the official code ([P1-code] ``scripts/classifier_sample_known.py``):

- The DDPM variant uses the fixed-large variance ``sigma_t^2 = beta_t`` of our epsilon-only networks; P1 trains
  ``learn_sigma=True`` and samples with the learned variance (spec A.4). The DDIM variants do not use the
  variance, so they are unaffected.
- With ``classifier_scale = 0`` no classifier gradient is computed (it would be multiplied by 0).
- Stochastic draws (the q_sample noise, DDPM step noise) come from a per-image generator seeded from
  ``(seed, subject_id, slice_index)``, so results do not depend on batching; the official code uses the global
  RNG with batch size 1.
- Step stride: P1 always uses every step; ``step_stride`` runs the same loops on an explicit strided grid of
  training timesteps (a strided index never reaches a model). The DDPM sampler needs stride 1.
- ``image_score`` (not defined by P1) is the max (default) or mean of the final map inside the brain mask.

Cost (spec B.3): ``nfe`` = UNet evaluations per image (``2 (L - 1)`` = 998 at L = 500, ``code``); the classifier
forward/backward passes (one per decoding step) are reported in ``extras["classifier_evaluations"]``.

Shared helpers (per-image generators, error maps, Otsu masks, strided grids) live in ``methods/common.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch

from anomalydiff.diffusion.guidance import (
    classifier_guided_eps,
    classifier_guided_mean,
    classifier_log_prob_grad,
)
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import (
    ddim_invert_step,
    ddim_step,
    ddpm_posterior,
    predict_x0,
    q_sample,
)
from anomalydiff.labels import HEALTHY, NULL_LABEL, NUM_CLASSES
from anomalydiff.methods.base import Classifier, EpsModel
from anomalydiff.postprocess import median_filter
from anomalydiff.records import Batch, MethodOutput
from anomalydiff.methods.common import (
    NoFitCalibration,
    LoopPlan,
    gaussian_per_image,
    image_generators,
    masked_image_score,
    otsu_masks,
    reconstruction_error_map,
    strided_grid,
    _timesteps,
    _labels,
)

__all__ = ["Wolleb", "WollebConfig"]


# ----------------------------------------------------------------------------------------------------------
# Wolleb et al. 2022
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WollebConfig:
    """Settings of Wolleb et al. 2022 (defaults = P1 as published, spec B.3)."""

    noise_level: int = 500  # L: P1 README sampling command `--noise_level 500` (spec B.3); P2 re-run 200 (D.2)
    classifier_scale: float = 100.0  # s: P1 README `--classifier_scale 100`; P2 re-run 1000 BraTS / 500 ATLAS
    encoding: Literal["ddim", "q_sample"] = "ddim"  # P1: DDIM inversion (B.3); P2 re-run: q_sample to L-1 (D.2)
    sampler: Literal["ddim", "ddpm"] = "ddim"  # P1 main method; "ddpm" = P1's stochastic ablation (B.3)
    index_convention: Literal["code", "clean"] = "code"  # official loop lengths (B.3 code detail, E.16) or no lag
    step_stride: int = 1  # P1 `timestep_respacing ddim1000`: every step; j > 1 runs the loops on a strided grid
    model_label: int = HEALTHY  # B.3: diffusion model conditioned on y = h (NULL_LABEL for an unconditional net)
    target_label: int = HEALTHY  # B.3: classifier guidance towards the healthy class
    map_error: Literal["l1_sum", "squared_mean"] = "l1_sum"  # P1: sum_c |x - x_hat| (B.3.4); P2: squared (D)
    modalities: tuple[int, ...] | None = None  # channels in the map; P1 all 4 (B.3.4); P2 BraTS FLAIR+T2 (0, 3)
    map_normalisation: Literal["none", "minmax"] = "none"  # "minmax": P1's CheXpert map form (B.3.4)
    median_size: int = 0  # P1: no filter; P2 protocol: 5x5 median filter (C.9, D); 0 = off
    threshold: Literal["otsu", "policy"] = "otsu"  # P1: Otsu per image (B.3.5); P2: fixed tau from a policy (D)
    image_score: Literal["max", "mean"] = "max"  # not in P1: max of the map inside the brain mask
    tuned_with_pixel_labels: bool = False  # P2 grid-searched L, s, tau with pixel labels (C.10); P1 did not
    seed: int = 0  # seeds the per-image generators (q_sample noise, DDPM step noise)

    def __post_init__(self) -> None:
        if self.noise_level < 2:
            raise ValueError(f"WollebConfig.noise_level is {self.noise_level}; use L >= 2 (P1: 500, P2: 200).")
        if self.classifier_scale < 0:
            raise ValueError(f"WollebConfig.classifier_scale is {self.classifier_scale}; use s >= 0 (P1: 100).")
        if self.step_stride < 1:
            raise ValueError(f"WollebConfig.step_stride is {self.step_stride}; use an integer >= 1 (P1: 1).")
        if self.sampler == "ddpm" and self.step_stride != 1:
            raise ValueError(
                "WollebConfig: the DDPM sampler steps t -> t-1 with the single-step posterior, so it needs "
                f"step_stride=1 (got {self.step_stride}); use sampler='ddim' for strided sampling."
            )
        if self.sampler == "ddpm" and self.encoding != "q_sample":
            raise ValueError(
                "WollebConfig: the DDPM variant noises with q_sample (spec B.3); set encoding='q_sample' "
                "together with sampler='ddpm'."
            )
        for name in ("model_label", "target_label"):
            value = getattr(self, name)
            allowed = (*range(NUM_CLASSES), NULL_LABEL) if name == "model_label" else tuple(range(NUM_CLASSES))
            if value not in allowed:
                raise ValueError(f"WollebConfig.{name} is {value}; use one of {allowed} (labels.py).")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"WollebConfig.median_size is {self.median_size}; use 0 (off) or an odd size (P2: 5).")


class Wolleb(NoFitCalibration):
    """Wolleb et al. 2022: DDIM encoding and classifier-guided DDIM decoding towards healthy (spec B).

    Built from explicit parts: ``Wolleb(eps_model, classifier, schedule, config)``.

    Args:
        eps_model: ``eps_model(x_t, t, y) -> eps`` (class-conditional; called with ``config.model_label``).
        classifier: noisy classifier ``classifier(x_t, t) -> logits [B, 2]``.
        schedule: the noise schedule the networks were trained with.
        config: :class:`WollebConfig`.
    """

    name: ClassVar[str] = "wolleb"
    #: P1 is label-free (Otsu); an instance built with ``tuned_with_pixel_labels`` (the P2 preset) says True.
    uses_pixel_labels: ClassVar[bool] = False

    def __init__(
        self,
        eps_model: EpsModel,
        classifier: Classifier,
        schedule: NoiseSchedule,
        config: WollebConfig = WollebConfig(),
    ) -> None:
        self.eps_model = eps_model
        self.classifier = classifier
        self.schedule = schedule
        self.config = config
        self.uses_pixel_labels = bool(config.tuned_with_pixel_labels)  # type: ignore[misc]
        self.plan = self.loop_plan()

    def loop_plan(self) -> LoopPlan:
        """The encode/decode timesteps for this config (see the module docstring).

        Returns:
            The :class:`LoopPlan`.

        Raises:
            ValueError: the noise level does not fit the schedule.
        """
        cfg = self.config
        highest = self.schedule.num_timesteps - 1
        if cfg.index_convention == "code":
            # Official loops (spec B.3 code detail): grid up to L, inversions at G[1..n-1] -> G[2..n],
            # decoding at G[n-2] .. G[0]; q_sample encoding noises to G[n-1] (= L-1 at stride 1).
            if cfg.noise_level > highest:
                raise ValueError(
                    f"noise_level={cfg.noise_level} with index_convention='code' inverts up to index L, beyond "
                    f"the schedule's last timestep {highest}; lower noise_level or use index_convention='clean'."
                )
            grid = strided_grid(cfg.noise_level, cfg.step_stride)
            n = len(grid) - 1
            if n < 2:
                raise ValueError(
                    f"noise_level={cfg.noise_level} with step_stride={cfg.step_stride} leaves no decoding step "
                    "under index_convention='code'; lower step_stride or raise noise_level."
                )
            encode = tuple((grid[k], grid[k + 1]) for k in range(1, n)) if cfg.encoding == "ddim" else ()
            start = 0 if cfg.encoding == "ddim" else grid[n - 1]
            decode = tuple((grid[k], grid[k - 1] if k > 0 else -1) for k in range(n - 2, -1, -1))
        else:
            # Clean (paper form): grid up to L-1, inversions G[k] -> G[k+1], decoding G[n] .. G[0].
            if cfg.noise_level - 1 > highest:
                raise ValueError(
                    f"noise_level={cfg.noise_level} exceeds the schedule's {self.schedule.num_timesteps} "
                    "timesteps; use noise_level <= T."
                )
            grid = strided_grid(cfg.noise_level - 1, cfg.step_stride)
            n = len(grid) - 1
            encode = tuple((grid[k], grid[k + 1]) for k in range(n)) if cfg.encoding == "ddim" else ()
            start = 0 if cfg.encoding == "ddim" else grid[n]
            decode = tuple((grid[k], grid[k - 1] if k > 0 else -1) for k in range(n, -1, -1))
        return LoopPlan(start_level=start, encode=encode, decode=decode)

    # -- fit / calibration -------------------------------------------------------------------------------
    def native_threshold(self) -> str | None:
        """Otsu per image where the method thresholds itself, else None (a fitted policy)."""
        return "otsu_per_image" if self.config.threshold == "otsu" else None

    # -- inference -----------------------------------------------------------------------------------------
    def reconstruct(
        self, x0: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, int, int]:
        """Healthy counterfactual ``x_hat`` of ``x0`` (spec B.3 steps 1-3).

        Args:
            x0: ``[B, C, H, W]`` images in [-1, 1].
            generators: one generator per image (:func:`image_generators`).

        Returns:
            ``(x_hat [B, C, H, W], unet_evaluations_per_image, classifier_evaluations_per_image)``.
        """
        cfg, schedule, plan = self.config, self.schedule, self.plan
        y_model = _labels(cfg.model_label, x0)
        y_target = _labels(cfg.target_label, x0)
        unet_calls = 0
        classifier_calls = 0
        # 1. Noise: q_sample to the start level (index 0 for DDIM inversion, spec B.3.1; L-1 for q_sample, D.2).
        noise = gaussian_per_image(x0, generators)
        x = q_sample(schedule, x0, _timesteps(plan.start_level, x0), noise)
        # 2. Encode: DDIM inversion with the model conditioned on y = h, no classifier (spec A.4, B.3.2).
        for t, t_next in plan.encode:
            t_vec = _timesteps(t, x)
            eps = self.eps_model(x, t_vec, y_model)
            unet_calls += 1
            x0_hat, eps_tilde = predict_x0(schedule, x, t_vec, eps, clip=True)  # A.3 clip, re-derive eps
            x = ddim_invert_step(schedule, x0_hat, eps_tilde, _timesteps(t_next, x))
        # 3. Decode towards healthy with classifier guidance (spec A.7 + A.4, B.3.3).
        for t, t_prev in plan.decode:
            t_vec = _timesteps(t, x)
            eps = self.eps_model(x, t_vec, y_model)
            unet_calls += 1
            x0_hat, eps_tilde = predict_x0(schedule, x, t_vec, eps, clip=True)
            grad = None
            if cfg.classifier_scale != 0:
                grad = classifier_log_prob_grad(self.classifier, x, t_vec, y_target)
                classifier_calls += 1
            if cfg.sampler == "ddim":
                if grad is not None:
                    # 3a. eps_hat = eps~ - s sqrt(1 - alpha_bar_t) grad; x0 from eps_hat, not clipped again (A.7).
                    eps_tilde = classifier_guided_eps(schedule, eps_tilde, t_vec, grad, cfg.classifier_scale)
                    x0_hat, _ = predict_x0(schedule, x, t_vec, eps_tilde, clip=False)
                # 3b. DDIM decoding step (A.4); t_prev = -1 returns x0_hat.
                x = ddim_step(schedule, x0_hat, eps_tilde, _timesteps(t_prev, x))
            else:
                # 3a'. DDPM: posterior mean (fixed-large variance, A.4), guided mean mu + s Sigma grad (A.7).
                mean, variance = ddpm_posterior(schedule, x, t_vec, x0_hat)
                if grad is not None:
                    mean = classifier_guided_mean(mean, variance, grad, cfg.classifier_scale)
                # 3b'. x_{t-1} = mu' + sigma_t z, no noise at t = 0.
                if t > 0:
                    x = mean + variance.sqrt() * gaussian_per_image(x, generators)
                else:
                    x = mean
        return x, unet_calls, classifier_calls

    def score(self, batch: Batch) -> MethodOutput:
        """Anomaly map, image score and (with ``threshold="otsu"``) the Otsu mask of each image.

        Args:
            batch: ``Batch`` with ``image [B, C, H, W]`` in [-1, 1]; labels are not used.

        Returns:
            ``MethodOutput`` with ``anomaly_map [B, 1, H, W]`` (the error map of B.3.4, median-filtered when
            ``median_size > 0``), ``image_score [B]`` (max/mean inside the brain), ``pred_mask`` (Otsu per
            image, or None with ``threshold="policy"``), ``nfe`` (UNet evaluations per image) and
            ``extras = {"reconstruction": x_hat [B, C, H, W], "classifier_evaluations": int}``.
        """
        cfg = self.config
        x0 = batch.image
        with torch.no_grad():
            x_hat, unet_calls, classifier_calls = self.reconstruct(x0, image_generators(batch, cfg.seed))
            # 4. Anomaly map (spec B.3.4; P2: squared error over the inference modalities, spec D).
            maps = reconstruction_error_map(x0, x_hat, cfg.map_error, cfg.modalities, cfg.map_normalisation)
            if cfg.median_size > 0:
                maps = median_filter(maps, size=cfg.median_size)
            # 5. Otsu per image (spec B.3.5), or leave the fixed threshold to a fitted policy (spec D).
            pred_mask = otsu_masks(maps) if cfg.threshold == "otsu" else None
            image_score = masked_image_score(maps, batch.brain, cfg.image_score)
        return MethodOutput(
            anomaly_map=maps,
            image_score=image_score,
            pred_mask=pred_mask,
            pred_label=None,
            nfe=unet_calls,
            extras={"reconstruction": x_hat, "classifier_evaluations": classifier_calls},
        )
