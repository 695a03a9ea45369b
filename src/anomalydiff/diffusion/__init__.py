"""Pure diffusion math shared by every method (spec A): schedules, one-step updates, guidance, noise.

Paper symbol -> name (guided-diffusion code indexing, spec A.1; ``t`` is always a *training* timestep):

=========================================  ====================================================================
paper                                      here
=========================================  ====================================================================
:math:`T`                                  ``schedule.num_timesteps``
:math:`\\beta_t, \\alpha_t, \\bar\\alpha_t`     ``schedule.betas[t]``, ``schedule.alphas[t]``, ``schedule.alpha_bar[t]``
:math:`\\bar\\alpha_{t-1}`                   ``schedule.alpha_bar_prev[t]`` (1 at ``t = 0``); ``alpha_bar_at(-1) = 1``
:math:`x_0, x_t, \\epsilon`                  ``x0``, ``xt``, ``eps``
:math:`\\hat x_0, \\tilde e` (A.3)            ``predict_x0(...) -> (x0_hat, eps_tilde)``
DDIM decode / inversion (A.4)              ``ddim_step(.., t_prev)``, ``ddim_invert_step(.., t_next)``
DDPM posterior, ancestral step (A.4)       ``ddpm_posterior``, ``ddpm_step``
:math:`w` of P2 Eq. 6 (A.6)                ``guidance_w`` in ``cfg_eps``; Ho-Salimans ``s = 1 + w``
:math:`s` of Wolleb (A.7)                  ``classifier_scale``
=========================================  ====================================================================

Samplers are written out in each method as short loops over an explicit integer grid
(:func:`timestep_grid`); no scheduler object owns a loop or a state.
"""

from anomalydiff.diffusion.guidance import (
    cfg_eps,
    classifier_guided_eps,
    classifier_guided_mean,
    classifier_log_prob_grad,
    guidance_scale_from_w,
    guidance_w_from_scale,
    implicit_classifier_grad,
)
from anomalydiff.diffusion.schedule import (
    NoiseSchedule,
    ScheduleConfig,
    Timesteps,
    as_coefficient,
    cosine_betas,
    linear_betas,
    make_schedule,
    schedule_from_betas,
)
from anomalydiff.diffusion.steps import (
    ddim_invert_step,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    predict_eps_from_x0,
    predict_x0,
    q_sample,
    timestep_grid,
)

__all__ = [
    "NoiseSchedule",
    "ScheduleConfig",
    "Timesteps",
    "as_coefficient",
    "cfg_eps",
    "classifier_guided_eps",
    "classifier_guided_mean",
    "classifier_log_prob_grad",
    "cosine_betas",
    "ddim_invert_step",
    "ddim_step",
    "ddpm_posterior",
    "ddpm_step",
    "guidance_scale_from_w",
    "guidance_w_from_scale",
    "implicit_classifier_grad",
    "linear_betas",
    "make_schedule",
    "predict_eps_from_x0",
    "predict_x0",
    "q_sample",
    "schedule_from_betas",
    "timestep_grid",
]
