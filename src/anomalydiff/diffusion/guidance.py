"""Guidance math (spec A.6, A.7): classifier-free guidance and noise-aware classifier guidance.

Paper symbol -> name:

===============================================================  ============================================
paper                                                            here
===============================================================  ============================================
:math:`w` (AnoFPDM, P2 Eq. 6)                                    ``guidance_w``
:math:`s = 1 + w` (Ho & Salimans, Sanchez et al.)                ``guidance_scale`` (only in the converters)
:math:`\\epsilon_\\theta(x_t,t,y)`, :math:`\\epsilon_\\theta(x_t,t,\\varnothing)`  ``eps_cond``, ``eps_null``
:math:`\\nabla_{x_t}\\log p^i(y\\mid x_t)` (implicit classifier)     :func:`implicit_classifier_grad`
:math:`\\nabla_{x_t}\\log p_\\phi(y\\mid x_t,t)` (noisy classifier)   :func:`classifier_log_prob_grad`
:math:`s` (Wolleb, ``classifier_scale``)                         ``classifier_scale``
===============================================================  ============================================

Conventions: the AnoFPDM guided noise is ``(1 + w) eps_cond - w eps_null``, so ``w = 0`` is the plain
conditional model and "w = 2" in P2 is Ho-Salimans ``s = 3`` (spec E.17). This module is the one place
that converts between the two scales (:func:`guidance_scale_from_w`, :func:`guidance_w_from_scale`).

Classifier guidance for DDIM (spec A.7): clip first (:func:`~anomalydiff.diffusion.steps.predict_x0`),
then ``eps_hat = eps_tilde - s sqrt(1 - alpha_bar_t) grad`` (:func:`classifier_guided_eps`), then
``x0_hat = predict_x0(xt, t, eps_hat, clip=False)`` (not clipped again), then the DDIM step. For DDPM:
``mean' = mean + s variance grad`` (:func:`classifier_guided_mean`).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from anomalydiff.diffusion.schedule import NoiseSchedule, Timesteps, as_coefficient

#: A guidance strength: one float for the batch, or a tensor ``[B]`` (one per sample).
Strength = Union[float, torch.Tensor]


def _per_sample(value: Strength, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A float stays a float; a tensor ``[B]`` (or 0-dim) becomes ``[B, 1, ..., 1]`` in like's dtype/device."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value
    if value.ndim == 1 and value.shape[0] in (1, like.shape[0]):
        return value.reshape((value.shape[0],) + (1,) * (like.ndim - 1))
    raise ValueError(
        f"a guidance strength tensor must be 0-dim or [B] with B = {like.shape[0]}; got shape {tuple(value.shape)}."
    )


def guidance_scale_from_w(guidance_w: float) -> float:
    """Ho-Salimans / Sanchez scale ``s`` of ``eps_null + s (eps_cond - eps_null)`` for AnoFPDM's ``w``: ``1 + w``.

    Args:
        guidance_w: AnoFPDM guidance strength w.

    Returns:
        s = 1 + w.
    """
    return 1.0 + float(guidance_w)


def guidance_w_from_scale(guidance_scale: float) -> float:
    """AnoFPDM ``w`` for a Ho-Salimans / Sanchez scale ``s``: ``s - 1`` (Sanchez's s = 3 is w = 2).

    Args:
        guidance_scale: s in ``eps_null + s (eps_cond - eps_null)``.

    Returns:
        w = s - 1.
    """
    return float(guidance_scale) - 1.0


def cfg_eps(eps_cond: torch.Tensor, eps_null: torch.Tensor, guidance_w: Strength) -> torch.Tensor:
    """Classifier-free guided noise ``(1 + w) eps_cond - w eps_null`` (spec A.6, P2 Eq. 6).

    Args:
        eps_cond: ``[B, C, H, W]`` conditional prediction ``eps(x_t, t, y)``.
        eps_null: ``[B, C, H, W]`` null-condition prediction ``eps(x_t, t, null)``.
        guidance_w: w (float, or tensor ``[B]`` per sample); ``w = 0`` returns ``eps_cond``.

    Returns:
        guided eps ``[B, C, H, W]``.
    """
    w = _per_sample(guidance_w, eps_cond)
    # 1. eps~ = (1 + w) eps_y - w eps_null (P2 Eq. 6)
    return (1.0 + w) * eps_cond - w * eps_null


def implicit_classifier_grad(
    schedule: NoiseSchedule, eps_cond: torch.Tensor, eps_null: torch.Tensor, t: Timesteps
) -> torch.Tensor:
    """Gradient of the implicit classifier ``grad log p^i(y | x_t) = -(eps_cond - eps_null) / sqrt(1 - alpha_bar_t)``.

    From ``eps(x_t) ~ -sqrt(1 - alpha_bar_t) grad log p_t(x_t)`` and Bayes' rule (spec A.6), so that
    ``cfg_eps(eps_cond, eps_null, w) == classifier_guided_eps(eps_null, t, this, classifier_scale=1 + w)``.

    Args:
        schedule: the noise schedule.
        eps_cond: ``[B, C, H, W]`` conditional prediction.
        eps_null: ``[B, C, H, W]`` null-condition prediction.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.

    Returns:
        ``[B, C, H, W]`` gradient with respect to x_t.
    """
    alpha_bar = schedule.alpha_bar64(t, eps_cond)
    sqrt_one_minus_ab = as_coefficient((1.0 - alpha_bar).sqrt(), eps_cond)
    # 1. grad log p^i(y|x_t) = -(eps_y - eps_null) / sqrt(1 - alpha_bar_t) (spec A.6)
    return -(eps_cond - eps_null) / sqrt_one_minus_ab


def classifier_log_prob_grad(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Gradient of ``sum_b log softmax(classifier(xt, t))[b, y_b]`` with respect to ``xt`` (spec A.7).

    This is guided-diffusion's ``cond_fn``: the batch sum makes each sample's gradient its own (for a
    classifier that treats samples independently, e.g. in eval mode). Works when the caller is under
    ``torch.no_grad()`` or ``torch.inference_mode()``; leaves no ``.grad`` on the classifier's parameters.

    Args:
        classifier: ``classifier(x_t, t) -> logits [B, K]`` (a noise-aware classifier).
        xt: ``[B, C, H, W]`` noisy images.
        t: LongTensor ``[B]`` of training timesteps, passed to the classifier unchanged.
        y: LongTensor ``[B]`` target classes in ``0..K-1`` (e.g. HEALTHY).

    Returns:
        Detached gradient ``[B, C, H, W]`` in xt's dtype and device.

    Raises:
        ValueError: the logits are not ``[B, K]`` or a label is outside ``0..K-1``.
    """
    y = torch.as_tensor(y, device=xt.device).long().reshape(-1)
    if y.shape[0] == 1 and xt.shape[0] != 1:
        y = y.expand(xt.shape[0])
    with torch.inference_mode(False), torch.enable_grad():
        # 1. a fresh leaf copy of x_t that tracks gradients even under no_grad / inference_mode callers
        x_in = xt.detach().clone().requires_grad_(True)
        logits = classifier(x_in, t)
        if logits.ndim != 2 or logits.shape[0] != xt.shape[0]:
            raise ValueError(
                f"the classifier returned logits of shape {tuple(logits.shape)}; expected [B, K] with B = "
                f"{xt.shape[0]}. Check that classifier(x_t, t) returns one row of class logits per image."
            )
        if y.shape[0] != xt.shape[0] or int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise ValueError(
                f"y must hold one class index in [0, {logits.shape[1] - 1}] per image (B = {xt.shape[0]}); got "
                f"{y.tolist()}. NULL_LABEL is not a classifier class: guide toward HEALTHY or UNHEALTHY."
            )
        # 2. log p_phi(y | x_t, t) = log softmax(logits)[y], summed over the batch (spec A.7)
        log_probs = torch.log_softmax(logits, dim=-1)
        selected = log_probs[torch.arange(xt.shape[0], device=log_probs.device), y.to(log_probs.device)].sum()
        # 3. grad with respect to x_t only (no .grad accumulates on the classifier's parameters)
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.detach().to(dtype=xt.dtype)


def classifier_guided_eps(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    t: Timesteps,
    grad: torch.Tensor,
    classifier_scale: Strength,
) -> torch.Tensor:
    """DDIM classifier guidance ``eps_hat = eps - s sqrt(1 - alpha_bar_t) grad`` (spec A.7, ``condition_score``).

    Args:
        schedule: the noise schedule.
        eps: ``[B, C, H, W]`` the (clipped, re-derived) noise ``eps_tilde`` at ``(x_t, t)``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        grad: ``[B, C, H, W]`` ``grad log p(y | x_t)`` (from :func:`classifier_log_prob_grad`).
        classifier_scale: s (float, or tensor ``[B]``); 0 returns ``eps``.

    Returns:
        guided eps ``[B, C, H, W]``.
    """
    alpha_bar = schedule.alpha_bar64(t, eps)
    sqrt_one_minus_ab = as_coefficient((1.0 - alpha_bar).sqrt(), eps)
    scale = _per_sample(classifier_scale, eps)
    # 1. eps^ = e~ - s sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t, t) (spec A.7)
    return eps - scale * sqrt_one_minus_ab * grad


def classifier_guided_mean(
    mean: torch.Tensor, variance: torch.Tensor, grad: torch.Tensor, classifier_scale: Strength
) -> torch.Tensor:
    """DDPM classifier guidance ``mean' = mean + s variance grad`` (spec A.7, ``condition_mean``).

    Args:
        mean: ``[B, C, H, W]`` posterior mean (from :func:`~anomalydiff.diffusion.steps.ddpm_posterior`).
        variance: ``[B, 1, 1, 1]`` (or ``[B, C, H, W]``) step variance Sigma_t.
        grad: ``[B, C, H, W]`` ``grad log p(y | x_t)``.
        classifier_scale: s (float, or tensor ``[B]``); 0 returns ``mean``.

    Returns:
        guided mean ``[B, C, H, W]``.
    """
    scale = _per_sample(classifier_scale, mean)
    # 1. mu' = mu + s Sigma_t grad log p_phi(y | x_t, t) (spec A.7, Dhariwal & Nichol)
    return mean + scale * variance * grad
