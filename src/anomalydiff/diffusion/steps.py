"""One-step diffusion math (spec A.2-A.4): forward noising, x0 <-> eps, DDIM decode / invert, DDPM step.

Paper symbol -> name (guided-diffusion code indexing, spec A.1):

=====================================================  ====================================================
paper                                                  here
=====================================================  ====================================================
:math:`x_0`                                            ``x0`` (a clean image in [-1, 1])
:math:`x_t`                                            ``xt`` (state at training timestep ``t``)
:math:`\\epsilon`, :math:`\\epsilon_\\theta(x_t,t)`       ``eps``
:math:`\\hat x_0`, :math:`\\tilde e` (spec A.3)          ``x0_hat``, ``eps_tilde`` (clipped, re-derived)
:math:`\\bar\\alpha[i]`                                  ``schedule.alpha_bar[t]`` (``t = -1``: 1, clean)
:math:`\\mu`, :math:`\\sigma_t^2` (spec A.4 DDPM)        ``mean``, ``variance`` (fixed-large)
=====================================================  ====================================================

Every ``t`` / ``t_prev`` / ``t_next`` is a LongTensor ``[B]`` of *training* timesteps (a Python int is
broadcast to the batch). Samplers walk an explicit integer grid from :func:`timestep_grid`; a step from
``t`` to ``t_prev`` (decode) or ``t_next`` (invert) may skip any number of timesteps.

All functions are pure, keep the input's dtype and device, and take their coefficients from the float64
tables of the schedule.
"""

from __future__ import annotations

import torch

from anomalydiff.diffusion.schedule import NoiseSchedule, Timesteps, as_coefficient

#: The data range of x0 that ``clip`` enforces (spec A.3: ``clip_denoised=True`` in both codebases).
X0_CLIP = 1.0


def _sqrt_alpha_bars(
    schedule: NoiseSchedule, t: Timesteps, like: torch.Tensor, allow_clean: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(alpha_bar[t]), sqrt(1 - alpha_bar[t]))`` as ``[B, 1, ..., 1]`` coefficients in like's dtype."""
    alpha_bar = schedule.alpha_bar64(t, like, allow_clean=allow_clean)
    return as_coefficient(alpha_bar.sqrt(), like), as_coefficient((1.0 - alpha_bar).sqrt(), like)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
    """Forward marginal ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` (spec A.2, P2 Eq. 2).

    Args:
        schedule: the noise schedule.
        x0: clean images ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        noise: ``[B, C, H, W]``, usually standard Gaussian (or simplex noise for AnoDDPM).

    Returns:
        xt ``[B, C, H, W]``.
    """
    sqrt_ab, sqrt_one_minus_ab = _sqrt_alpha_bars(schedule, t, x0, allow_clean=False)
    # 1. x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (spec A.2)
    return sqrt_ab * x0 + sqrt_one_minus_ab * noise


def predict_eps_from_x0(schedule: NoiseSchedule, xt: torch.Tensor, t: Timesteps, x0: torch.Tensor) -> torch.Tensor:
    """The noise that maps ``x0`` to ``xt`` at ``t``: ``(xt - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)``.

    This is guided-diffusion's ``_predict_eps_from_xstart`` (spec A.3).

    Args:
        schedule: the noise schedule.
        xt: ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        x0: ``[B, C, H, W]``.

    Returns:
        eps ``[B, C, H, W]``.
    """
    sqrt_ab, sqrt_one_minus_ab = _sqrt_alpha_bars(schedule, t, xt, allow_clean=False)
    # 1. e~ = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t) (spec A.3)
    return (xt - sqrt_ab * x0) / sqrt_one_minus_ab


def predict_x0(
    schedule: NoiseSchedule, xt: torch.Tensor, t: Timesteps, eps: torch.Tensor, clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step (Tweedie) x0 estimate, clipped to [-1, 1], and the noise re-derived from it (spec A.3).

    ``x0_hat = clip((xt - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), -1, 1)`` and
    ``eps_tilde = (xt - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t)``.
    With ``clip=False`` nothing is clipped and ``eps_tilde`` is ``eps`` itself (the unclipped x0 of
    classifier guidance, spec A.7).

    Args:
        schedule: the noise schedule.
        xt: ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        eps: noise estimate at ``(xt, t)``, ``[B, C, H, W]``.
        clip: clip x0_hat to [-1, 1] and re-derive eps (``clip_denoised=True`` in both papers' code).

    Returns:
        ``(x0_hat, eps_tilde)``, both ``[B, C, H, W]``.
    """
    sqrt_ab, sqrt_one_minus_ab = _sqrt_alpha_bars(schedule, t, xt, allow_clean=False)
    # 1. x0 from eps (spec A.3)
    x0_hat = (xt - sqrt_one_minus_ab * eps) / sqrt_ab
    if not clip:
        return x0_hat, eps
    # 2. clip to the data range, then 3. re-derive eps from the clipped x0 (spec A.3, `_predict_eps_from_xstart`)
    x0_hat = x0_hat.clamp(-X0_CLIP, X0_CLIP)
    eps_tilde = (xt - sqrt_ab * x0_hat) / sqrt_one_minus_ab
    return x0_hat, eps_tilde


def ddim_step(schedule: NoiseSchedule, x0_hat: torch.Tensor, eps: torch.Tensor, t_prev: Timesteps) -> torch.Tensor:
    """DDIM decoding step (eta = 0) to the less noisy timestep ``t_prev`` (spec A.4, code ``ddim_sample``).

    ``x_prev = sqrt(alpha_bar[t_prev]) x0_hat + sqrt(1 - alpha_bar[t_prev]) eps``, where ``x0_hat`` and
    ``eps`` come from :func:`predict_x0` at the current ``(xt, t)``. ``t_prev = -1`` returns ``x0_hat``
    (``alpha_bar[-1] := 1``). ``t_prev`` may be any timestep below ``t`` (strided grids).

    Args:
        schedule: the noise schedule.
        x0_hat: ``[B, C, H, W]`` predicted clean image at the current step.
        eps: ``[B, C, H, W]`` the (re-derived, possibly guided) noise at the current step.
        t_prev: LongTensor ``[B]`` target training timesteps in ``-1..T-1``.

    Returns:
        x_prev ``[B, C, H, W]`` at level ``t_prev``.
    """
    sqrt_ab_prev, sqrt_one_minus_ab_prev = _sqrt_alpha_bars(schedule, t_prev, x0_hat, allow_clean=True)
    # 1. x_{t_prev} = sqrt(alpha_bar[t_prev]) x0_hat + sqrt(1 - alpha_bar[t_prev]) e~ (spec A.4 decoding)
    return sqrt_ab_prev * x0_hat + sqrt_one_minus_ab_prev * eps


def ddim_invert_step(
    schedule: NoiseSchedule, x0_hat: torch.Tensor, eps: torch.Tensor, t_next: Timesteps
) -> torch.Tensor:
    """DDIM inversion (encoding) step to the noisier timestep ``t_next`` (spec A.4, P2 Eq. 4).

    ``x_next = sqrt(alpha_bar[t_next]) x0_hat + sqrt(1 - alpha_bar[t_next]) eps``, where ``x0_hat`` and
    ``eps`` come from :func:`predict_x0` on the *current* state and its timestep ``t`` (the network is
    evaluated at ``t``; the output sits at ``t_next``, e.g. ``t + 1`` or ``t + stride``).

    Args:
        schedule: the noise schedule.
        x0_hat: ``[B, C, H, W]`` predicted clean image at the current step.
        eps: ``[B, C, H, W]`` the (re-derived) noise at the current step.
        t_next: LongTensor ``[B]`` target training timesteps in ``0..T-1``.

    Returns:
        x_next ``[B, C, H, W]`` at level ``t_next``.
    """
    sqrt_ab_next, sqrt_one_minus_ab_next = _sqrt_alpha_bars(schedule, t_next, x0_hat, allow_clean=False)
    # 1. x_{t_next} = sqrt(alpha_bar[t_next]) x0_hat + sqrt(1 - alpha_bar[t_next]) e~ (spec A.4 encoding)
    return sqrt_ab_next * x0_hat + sqrt_one_minus_ab_next * eps


def _fixed_large_variance(schedule: NoiseSchedule) -> torch.Tensor:
    """Fixed-large variance table ``[T]``: ``beta_t``, first entry = posterior variance at index 1 (spec A.4)."""
    posterior_variance = schedule.betas * (1.0 - schedule.alpha_bar_prev) / (1.0 - schedule.alpha_bar)
    return torch.cat([posterior_variance[1:2], schedule.betas[1:]])


def ddpm_posterior(
    schedule: NoiseSchedule, xt: torch.Tensor, t: Timesteps, x0_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and fixed-large variance of the DDPM reverse step ``p(x_{t-1} | x_t)`` (spec A.4, P2 Eq. 3).

    ``mean = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) * x0_hat
    + (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t) * xt`` (posterior-mean form with the clipped
    x0_hat; equal to the paper form ``(xt - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)`` when no
    clipping is active). ``variance = beta_t`` ("fixed-large", ``learn_sigma=False``), except at ``t = 0``
    where guided-diffusion uses the posterior variance of index 1.

    Args:
        schedule: the noise schedule.
        xt: ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        x0_hat: ``[B, C, H, W]`` predicted clean image (usually clipped, from :func:`predict_x0`).

    Returns:
        ``(mean [B, C, H, W], variance [B, 1, 1, 1])`` in xt's dtype and device.
    """
    t_cpu = schedule.timesteps(t, xt)
    beta = schedule.betas[t_cpu]
    alpha = schedule.alphas[t_cpu]
    alpha_bar = schedule.alpha_bar[t_cpu]
    alpha_bar_prev = schedule.alpha_bar_prev[t_cpu]
    # 1. posterior-mean coefficients (spec A.4, DDPM Eq. 7), in float64
    coef_x0 = beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
    coef_xt = (1.0 - alpha_bar_prev) * alpha.sqrt() / (1.0 - alpha_bar)
    mean = as_coefficient(coef_x0, xt) * x0_hat + as_coefficient(coef_xt, xt) * xt
    # 2. fixed-large variance sigma_t^2 = beta_t (first entry: posterior variance at index 1)
    variance = as_coefficient(_fixed_large_variance(schedule)[t_cpu], xt)
    return mean, variance


def ddpm_step(
    schedule: NoiseSchedule, xt: torch.Tensor, t: Timesteps, x0_hat: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """DDPM ancestral step ``x_{t-1} = mean + sigma_t * noise``, with no noise where ``t == 0`` (spec A.4).

    Args:
        schedule: the noise schedule.
        xt: ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``0..T-1``.
        x0_hat: ``[B, C, H, W]`` predicted clean image (from :func:`predict_x0`).
        noise: ``[B, C, H, W]`` the step noise z (Gaussian, or simplex noise for AnoDDPM).

    Returns:
        x_prev ``[B, C, H, W]`` at level ``t - 1`` (the final image where ``t == 0``).
    """
    mean, variance = ddpm_posterior(schedule, xt, t, x0_hat)
    # 1. z is switched off at t = 0 (guided-diffusion `nonzero_mask`)
    nonzero = as_coefficient((schedule.timesteps(t, xt) != 0).to(torch.float64), xt)
    # 2. x_{t-1} = mu + sigma_t z (spec A.4)
    return mean + nonzero * variance.sqrt() * noise


def timestep_grid(start: int, stop: int, stride: int) -> list[int]:
    """An explicit integer grid of training timesteps from ``start`` to ``stop``, BOTH ends included.

    The grid is ``start, start +- stride, start +- 2 stride, ...`` (descending when ``start > stop``),
    then ``stop`` itself: if ``stop`` is not on the stride lattice the last gap is shorter than ``stride``.
    Consecutive pairs are the (current, target) timesteps of a sampler:

    - decode: ``timestep_grid(L, -1, s)`` -> pairs ``(t, t_prev)``; the last ``t_prev`` is ``-1`` (the clean
      image, :func:`ddim_step` returns ``x0_hat``). Only the first element of each pair reaches a network.
    - invert: ``timestep_grid(0, L, s)`` -> pairs ``(t, t_next)``.

    Examples: ``timestep_grid(0, 10, 4) == [0, 4, 8, 10]``, ``timestep_grid(10, -1, 5) == [10, 5, 0, -1]``,
    ``timestep_grid(3, 3, 1) == [3]``.

    Args:
        start: first timestep (``>= -1``).
        stop: last timestep (``>= -1``; ``-1`` = the clean image).
        stride: spacing ``>= 1``.

    Returns:
        The list of ints, strictly monotone, starting at ``start`` and ending at ``stop``.

    Raises:
        ValueError: stride < 1 or an end below -1.
    """
    for name, value in (("start", start), ("stop", stop), ("stride", stride)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"timestep_grid {name} must be an integer; got {value!r}.")
    start, stop, stride = int(start), int(stop), int(stride)
    if stride < 1:
        raise ValueError(f"timestep_grid stride must be >= 1; got {stride}.")
    if start < -1 or stop < -1:
        raise ValueError(
            f"timestep_grid ends must be training timesteps >= 0 (or -1 for the clean image); got {start}, {stop}."
        )
    step = stride if stop >= start else -stride
    grid = list(range(start, stop, step))
    grid.append(stop)
    return grid
