"""CG-CDM: Hu et al., *Conditional Diffusion Models for Weakly Supervised Medical Image Segmentation* (MICCAI 2023).

The "Gradient"-type baseline of the AnoFPDM paper's Table 1 (spec D.4; ``[CDM-code]``
``scripts/image_p_seg.py::main_ddim_guided``). Symbols (architecture.md "Naming"): ``x0`` input in [-1, 1],
``xt`` noisy state, ``eps`` noise estimate, ``t`` training timestep, ``noise_level`` = t0, ``num_steps`` = the
chain length, ``classifier_scale`` = the classifier-guidance scale.

The condition enters the network as a class-embedding vector, and the method differentiates the denoised
image with respect to that vector by a finite difference, so the diffusion model must expose its embedding:
``class_embedding(y) -> e [B, D]`` and ``forward_embedding(x_t, t, e) -> eps``
(``anomalydiff.models.ClassConditionalUNet`` does; ``forward(x, t, y) == forward_embedding(x, t,
class_embedding(y))``).

Algorithm, per image (u = UNHEALTHY, h = HEALTHY):

1. ``x_t0 = q_sample(x0, t0, n)`` with ``n ~ N(0, I)`` (spec D.4 step 1; t0 = 400).
2. Two DDIM chains from the same ``x_t0`` for ``num_steps`` steps, evaluated at ``t = t0-1, ..., t0-num_steps``
   and stepping to ``t - 1`` (spec D.4 step 2: "t = 399 ... 390"):
   chain A with ``e_A = e(u)``, chain B with the perturbed ``e_B = alpha e(u) + (1 - alpha) e(h)``
   (alpha = 0.95). Both chains use classifier guidance with scale s = 10 towards ``guidance_label`` (A.7 DDIM:
   ``eps_hat = eps~ - s sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t, t)``, x0 from eps_hat not re-clipped).
   The two chains run as ONE batched network call per step (``[x_A; x_B]``, 2 evaluations per image) and
   one batched classifier gradient.
3. ``Delta = sum_steps (x^A - x^B)`` (states after each step): a finite-difference approximation of
   ``d x / d c`` (spec D.4 step 3).
4. Map ``a = minmax(|sum_c Delta_c|)`` per image, then an Otsu threshold per image (spec D.4 step 4),
   optionally keeping only the largest 8-connected component.

Deliberate differences / choices (P2's CG-CDM settings are UNVERIFIED, spec D.4):

- The original uses 224x224 and a 4000-step schedule; we use the schedule the models were trained with.
- The classifier guidance label of both chains is ``guidance_label`` (default UNHEALTHY, the image's class
  as in the original's ``cond_fn`` with the tumour label) [UNVERIFIED]; with equal guidance in both chains the
  difference isolates the effect of the class embedding.
- The q_sample noise comes from a per-image generator seeded from ``(seed, subject_id, slice_index)``.
- ``image_score`` (not defined by the paper) is the max (default) or mean of ``|sum_c Delta_c|`` inside the
  brain, before the min-max normalisation (which would make every max 1).
- The median filter (``median_size``) is applied to ``|sum_c Delta_c|`` before the min-max normalisation.
- P2 reports CG-CDM with pixel-label tuning (Table 1 cross); as a method with Otsu it is label-free, so
  ``uses_pixel_labels`` is False here; set ``tuned_with_pixel_labels`` when a grid search chose its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from skimage.measure import label as label_components

from anomalydiff.diffusion.guidance import classifier_guided_eps, classifier_log_prob_grad
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import ddim_step, predict_x0, q_sample
from anomalydiff.labels import HEALTHY, NUM_CLASSES, UNHEALTHY
from anomalydiff.methods.base import Classifier
from anomalydiff.methods.common import (
    NoFitCalibration,
    gaussian_per_image,
    image_generators,
    masked_image_score,
    minmax_maps,
    otsu_masks,
)
from anomalydiff.postprocess import median_filter
from anomalydiff.records import Batch, MethodOutput

__all__ = ["CGCDM", "CGCDMConfig", "EmbeddingEpsModel", "keep_largest_component"]


@runtime_checkable
class EmbeddingEpsModel(Protocol):
    """A class-conditional noise model that exposes its class embedding (spec D.4)."""

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """Class embedding ``[B, D]`` of labels ``y [B]``."""
        ...

    def forward_embedding(self, x_t: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Noise estimate ``[B, C, H, W]`` for ``x_t [B, C, H, W]``, timesteps ``t [B]``, embeddings ``[B, D]``."""
        ...


@dataclass(frozen=True)
class CGCDMConfig:
    """Settings of CG-CDM (defaults from [CDM-code] ``main_ddim_guided``, spec D.4)."""

    noise_level: int = 400  # t0: q_sample level (spec D.4 step 1)
    num_steps: int = 10  # DDIM steps per chain, t = t0-1 .. t0-num_steps (spec D.4 step 2)
    classifier_scale: float = 10.0  # classifier-guidance scale of both chains (spec D.4 step 2)
    alpha: float = 0.95  # perturbed embedding alpha e(u) + (1 - alpha) e(h) of chain B (spec D.4 step 2)
    chain_label: int = UNHEALTHY  # chain A's condition: the true (tumour) label (spec D.4)
    reference_label: int = HEALTHY  # the class mixed into chain B's embedding (spec D.4: e_normal)
    guidance_label: int = UNHEALTHY  # classifier target of both chains [UNVERIFIED, see module docstring]
    modalities: tuple[int, ...] | None = None  # channels summed in Delta; spec D.4: all channels
    median_size: int = 0  # spec D.4 has no median filter; 5 = the P2 protocol filter (C.9); 0 = off
    keep_largest_component: bool = False  # spec D.4 step 4 "optionally keeping the largest connected component"
    image_score: Literal["max", "mean"] = "max"  # not in the paper: max of the map inside the brain mask
    tuned_with_pixel_labels: bool = False  # P2 tuned its baselines with pixel labels (C.10); Otsu alone does not
    seed: int = 0  # seeds the per-image generators (the q_sample noise)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"CGCDMConfig.num_steps is {self.num_steps}; use >= 1 (spec D.4: 10).")
        if self.noise_level < self.num_steps:
            raise ValueError(
                f"CGCDMConfig.noise_level={self.noise_level} is below num_steps={self.num_steps}: the chains step "
                "t0-1 .. t0-num_steps down to -1 at most; raise noise_level (spec D.4: 400) or lower num_steps."
            )
        if self.classifier_scale < 0:
            raise ValueError(f"CGCDMConfig.classifier_scale is {self.classifier_scale}; use s >= 0 (spec D.4: 10).")
        for name in ("chain_label", "reference_label", "guidance_label"):
            if getattr(self, name) not in range(NUM_CLASSES):
                raise ValueError(f"CGCDMConfig.{name} is {getattr(self, name)}; use HEALTHY (0) or UNHEALTHY (1).")
        if self.median_size < 0 or (self.median_size > 0 and self.median_size % 2 == 0):
            raise ValueError(f"CGCDMConfig.median_size is {self.median_size}; use 0 (off) or an odd size (5).")


def keep_largest_component(masks: torch.Tensor) -> torch.Tensor:
    """Keep only the largest 8-connected component of each mask (spec D.4 step 4, optional).

    Args:
        masks: ``[B, 1, H, W]`` bool.

    Returns:
        ``[B, 1, H, W]`` bool; an empty mask stays empty; ties keep the component labelled first.
    """
    out = torch.zeros_like(masks, dtype=torch.bool)
    for b in range(masks.shape[0]):
        labels = label_components(masks[b, 0].cpu().numpy(), connectivity=2)
        if labels.max() == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        out[b, 0] = torch.from_numpy(labels == int(sizes.argmax())).to(masks.device)
    return out


class CGCDM(NoFitCalibration):
    """CG-CDM: finite difference of two classifier-guided DDIM chains with perturbed class embeddings (D.4).

    Built from explicit parts: ``CGCDM(eps_model_with_embedding, classifier, schedule, config)``.

    Args:
        eps_model: a model with ``class_embedding(y)`` and ``forward_embedding(x_t, t, class_emb)``
            (:class:`EmbeddingEpsModel`, e.g. ``ClassConditionalUNet``).
        classifier: noisy classifier ``classifier(x_t, t) -> logits [B, 2]``.
        schedule: the noise schedule the networks were trained with.
        config: :class:`CGCDMConfig`.
    """

    name: ClassVar[str] = "cgcdm"
    #: Otsu per image is label-free; an instance with ``tuned_with_pixel_labels`` says True.
    uses_pixel_labels: ClassVar[bool] = False

    def __init__(
        self,
        eps_model: EmbeddingEpsModel,
        classifier: Classifier,
        schedule: NoiseSchedule,
        config: CGCDMConfig = CGCDMConfig(),
    ) -> None:
        if not isinstance(eps_model, EmbeddingEpsModel):
            raise TypeError(
                f"CGCDM needs a diffusion model with class_embedding(y) and forward_embedding(x_t, t, class_emb); "
                f"{type(eps_model).__name__} has not both. Pass a ClassConditionalUNet (anomalydiff.models)."
            )
        if config.noise_level > schedule.num_timesteps - 1:
            raise ValueError(
                f"CGCDM noise_level={config.noise_level} is beyond the schedule's last timestep "
                f"{schedule.num_timesteps - 1}; lower noise_level."
            )
        self.eps_model = eps_model
        self.classifier = classifier
        self.schedule = schedule
        self.config = config
        self.uses_pixel_labels = bool(config.tuned_with_pixel_labels)  # type: ignore[misc]
        #: chain timesteps t0-1 .. t0-num_steps (each step goes to t - 1)
        self.chain_steps: tuple[int, ...] = tuple(
            range(config.noise_level - 1, config.noise_level - 1 - config.num_steps, -1)
        )

    def native_threshold(self) -> str | None:
        """Otsu per image where the method thresholds itself, else None (a fitted policy)."""
        return "otsu_per_image"

    def difference(
        self, x0: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Accumulated chain difference ``Delta = sum_steps (x^A - x^B)`` (spec D.4 steps 1-3).

        Args:
            x0: ``[B, C, H, W]`` images in [-1, 1].
            generators: one generator per image.

        Returns:
            ``(Delta [B, C, H, W], chain A's last x0 prediction [B, C, H, W], network evaluations per image,
            classifier evaluations per image)``.
        """
        cfg, schedule = self.config, self.schedule
        batch = x0.shape[0]
        device = x0.device

        def labels(value: int) -> torch.Tensor:
            return torch.full((batch,), value, dtype=torch.long, device=device)

        # 2a. class embeddings: chain A e(u); chain B alpha e(u) + (1 - alpha) e(h) (spec D.4)
        emb_a = self.eps_model.class_embedding(labels(cfg.chain_label))
        emb_ref = self.eps_model.class_embedding(labels(cfg.reference_label))
        emb_b = cfg.alpha * emb_a + (1.0 - cfg.alpha) * emb_ref
        emb_pair = torch.cat([emb_a, emb_b])
        y_guide = labels(cfg.guidance_label).repeat(2)
        # 1. x_t0 = q_sample(x0, t0, n) (spec D.4 step 1); both chains start here
        t0 = torch.full((batch,), cfg.noise_level, dtype=torch.long, device=device)
        x_t0 = q_sample(schedule, x0, t0, gaussian_per_image(x0, generators))
        x = torch.cat([x_t0, x_t0])
        delta = torch.zeros_like(x0)
        x0_hat = x
        evaluations = 0
        classifier_calls = 0
        for t in self.chain_steps:
            t_vec = torch.full((2 * batch,), t, dtype=torch.long, device=device)
            # 2b. both chains in one batched call (2 evaluations per image)
            eps = self.eps_model.forward_embedding(x, t_vec, emb_pair)
            evaluations += 2
            x0_hat, eps_tilde = predict_x0(schedule, x, t_vec, eps, clip=True)  # A.3
            if cfg.classifier_scale != 0:
                # 2c. classifier guidance (A.7 DDIM): eps_hat, x0 from eps_hat without re-clipping
                grad = classifier_log_prob_grad(self.classifier, x, t_vec, y_guide)
                classifier_calls += 2
                eps_tilde = classifier_guided_eps(schedule, eps_tilde, t_vec, grad, cfg.classifier_scale)
                x0_hat, _ = predict_x0(schedule, x, t_vec, eps_tilde, clip=False)
            # 2d. DDIM step to t - 1 (A.4)
            x = ddim_step(schedule, x0_hat, eps_tilde, t_vec - 1)
            # 3. Delta += x^A - x^B (spec D.4 step 3)
            delta = delta + (x[:batch] - x[batch:])
        return delta, x0_hat[:batch], evaluations, classifier_calls

    def score(self, batch: Batch) -> MethodOutput:
        """Min-max normalised ``|sum_c Delta_c|`` map and its Otsu mask (spec D.4 step 4).

        Args:
            batch: ``Batch`` with ``image [B, C, H, W]`` in [-1, 1]; labels are not used.

        Returns:
            ``MethodOutput`` with ``anomaly_map [B, 1, H, W]`` in [0, 1] (``|sum_c Delta_c|``, median-filtered
            when ``median_size > 0``, then min-max normalised), ``image_score [B]`` (max/mean of the
            un-normalised ``|sum_c Delta_c|`` inside the brain: the normalised map always peaks at 1),
            ``pred_mask`` (Otsu per image, optionally largest component only), ``nfe`` = 2 x num_steps and
            ``extras = {"difference": Delta [B, C, H, W], "reconstruction": chain A's last x0 prediction
            [B, C, H, W] (for figures), "classifier_evaluations": int}``.
        """
        cfg = self.config
        with torch.no_grad():
            generators = image_generators(batch, cfg.seed)
            delta, x0_hat_a, evaluations, classifier_calls = self.difference(batch.image, generators)
            # 4. a = minmax(|sum_c Delta_c|) per image (spec D.4 step 4)
            channels = delta if cfg.modalities is None else delta[:, list(cfg.modalities)]
            magnitude = channels.sum(dim=1, keepdim=True).abs()
            if cfg.median_size > 0:
                magnitude = median_filter(magnitude, size=cfg.median_size)
            maps = minmax_maps(magnitude)
            pred_mask = otsu_masks(maps)
            if cfg.keep_largest_component:
                pred_mask = keep_largest_component(pred_mask)
            # image score from the un-normalised magnitude (the min-max map always peaks at 1)
            image_score = masked_image_score(magnitude, batch.brain, cfg.image_score)
        return MethodOutput(
            anomaly_map=maps,
            image_score=image_score,
            pred_mask=pred_mask,
            pred_label=None,
            nfe=evaluations,
            extras={"difference": delta, "reconstruction": x0_hat_a, "classifier_evaluations": classifier_calls},
        )
