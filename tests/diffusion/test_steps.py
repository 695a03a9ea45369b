"""One-step diffusion math against diffusers, MONAI and hand-computed float64 values (spec A.2-A.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from monai.networks.schedulers import DDIMScheduler as MonaiDDIMScheduler

from anomalydiff.diffusion import (
    NoiseSchedule,
    ScheduleConfig,
    ddim_invert_step,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    make_schedule,
    predict_eps_from_x0,
    predict_x0,
    q_sample,
    timestep_grid,
)

T = 1000
F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return make_schedule(ScheduleConfig(name="linear", num_timesteps=T))


def hand_alpha_bar() -> np.ndarray:
    """alpha_bar of the spec A.1 schedule computed independently with numpy."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def eps_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic, bounded, nonlinear analytic noise model (so errors would show and propagate)."""
    return 0.8 * torch.tanh(1.3 * x) + 0.2 * torch.cos(torch.tensor(0.01 * t, dtype=x.dtype)) + 0.1 * torch.sin(3 * x)


def full(t: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), t, dtype=torch.long)


def random_image(seed: int, shape: tuple[int, ...] = (2, 2, 4, 4), scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def inference_steps_for(stride: int) -> int:
    """diffusers / MONAI step by ``T // num_inference_steps``: pick the count whose stride is ``stride``."""
    num_inference_steps = T // stride
    assert T // num_inference_steps == stride
    return num_inference_steps


def diffusers_ddim(schedule: NoiseSchedule, stride: int, grid: list[int], clip: bool) -> DDIMScheduler:
    reference = DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True, steps_offset=0
    )
    reference.set_timesteps(inference_steps_for(stride))
    reference.timesteps = torch.tensor(grid[:-1])  # explicit grid: step() derives prev = t - stride itself
    reference.alphas_cumprod = schedule.alpha_bar.clone()  # float64 so the comparison is exact
    reference.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return reference


# ---------------------------------------------------------------------------------------------- forward / x0


def test_q_sample_matches_hand_formula_diffusers_and_monai(schedule: NoiseSchedule) -> None:
    x0, noise = random_image(0, scale=0.5), random_image(1)
    t = torch.tensor([3, 777])
    xt = q_sample(schedule, x0, t, noise)
    ab = torch.from_numpy(hand_alpha_bar()[[3, 777]]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, **EXACT)
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    reference.alphas_cumprod = schedule.alpha_bar.clone()
    torch.testing.assert_close(xt, reference.add_noise(x0, noise, t), **EXACT)
    monai = MonaiDDIMScheduler(num_train_timesteps=T, schedule="linear_beta")
    monai.alphas_cumprod = schedule.alpha_bar.clone()
    torch.testing.assert_close(xt, monai.add_noise(x0, noise, t), **EXACT)
    # eps recovered from (xt, x0) is the noise that was added
    torch.testing.assert_close(predict_eps_from_x0(schedule, xt, t, x0), noise, rtol=1e-10, atol=1e-10)


def test_predict_x0_clips_then_rederives_eps_against_hand_values(schedule: NoiseSchedule) -> None:
    # one pixel per sample: sample 0 at t=499 has a raw x0 above 1, sample 1 at t=10 stays inside [-1, 1]
    xt = torch.tensor([0.9, 0.3], dtype=F64).reshape(2, 1, 1, 1)
    eps = torch.tensor([-0.5, 0.2], dtype=F64).reshape(2, 1, 1, 1)
    t = torch.tensor([499, 10])
    x0_hat, eps_tilde = predict_x0(schedule, xt, t, eps)
    ab = hand_alpha_bar()
    raw0 = (0.9 - np.sqrt(1 - ab[499]) * -0.5) / np.sqrt(ab[499])
    assert raw0 > 1  # clipping is active for sample 0
    expected_eps0 = (0.9 - np.sqrt(ab[499]) * 1.0) / np.sqrt(1 - ab[499])
    raw1 = (0.3 - np.sqrt(1 - ab[10]) * 0.2) / np.sqrt(ab[10])
    assert abs(raw1) < 1
    torch.testing.assert_close(x0_hat.flatten(), torch.tensor([1.0, raw1], dtype=F64), **EXACT)
    torch.testing.assert_close(eps_tilde.flatten(), torch.tensor([expected_eps0, 0.2], dtype=F64), **EXACT)
    assert abs(expected_eps0 - -0.5) > 0.1  # the re-derived eps really differs where clipped
    # clip=False: the raw Tweedie estimate and the input eps, untouched
    raw_x0, same_eps = predict_x0(schedule, xt, t, eps, clip=False)
    torch.testing.assert_close(raw_x0.flatten(), torch.tensor([raw0, raw1], dtype=F64), **EXACT)
    assert same_eps is eps


def test_predict_x0_keeps_dtype_and_rejects_the_clean_index(schedule: NoiseSchedule) -> None:
    xt = random_image(2).float()
    x0_hat, eps_tilde = predict_x0(schedule, xt, full(100, xt), torch.zeros_like(xt))
    assert x0_hat.dtype == eps_tilde.dtype == torch.float32
    with pytest.raises(ValueError, match="training timesteps"):
        predict_x0(schedule, xt, full(-1, xt), torch.zeros_like(xt))


# ---------------------------------------------------------------------------------------------- DDIM decode


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("stride", [1, 7, 50])
def test_ddim_decode_matches_diffusers_step_on_an_explicit_grid(
    schedule: NoiseSchedule, stride: int, clip: bool
) -> None:
    grid = timestep_grid(T - 1, -1, stride)  # e.g. stride 7: 999, 992, ..., 5, -1
    reference = diffusers_ddim(schedule, stride, grid, clip=clip)
    x = random_image(3)
    clipped_somewhere = False
    for t, t_prev in zip(grid[:-1], grid[1:]):
        assert t_prev == max(t - stride, -1)  # the prev timestep diffusers derives is the one we mean
        eps = eps_model(x, t)
        x0_hat, eps_tilde = predict_x0(schedule, x, full(t, x), eps, clip=clip)
        ours = ddim_step(schedule, x0_hat, eps_tilde, full(t_prev, x))
        # use_clipped_model_output re-derives eps from the clipped x0, exactly as spec A.3
        out = reference.step(eps, t, x, eta=0.0, use_clipped_model_output=clip)
        torch.testing.assert_close(out.pred_original_sample, x0_hat, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(out.prev_sample, ours, rtol=1e-11, atol=1e-11)
        raw_x0, _ = predict_x0(schedule, x, full(t, x), eps, clip=False)
        clipped_somewhere |= bool((raw_x0.abs() > 1).any())
        x = ours
    assert clipped_somewhere  # the clip branch was exercised, not vacuous
    # the last step lands on x0_hat itself (alpha_bar[-1] = 1)
    torch.testing.assert_close(x, x0_hat, rtol=0, atol=0)


@pytest.mark.parametrize("stride", [1, 7, 50])
def test_ddim_decode_matches_monai_step_where_it_agrees(schedule: NoiseSchedule, stride: int) -> None:
    # MONAI's step clips without re-deriving eps, so it agrees with spec A.3 only with clipping off
    reference = MonaiDDIMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    reference.set_timesteps(inference_steps_for(stride))
    reference.alphas_cumprod = schedule.alpha_bar.clone()
    reference.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    grid = timestep_grid(T - 1, -1, stride)
    x = random_image(4)
    for t, t_prev in zip(grid[:-1], grid[1:]):
        eps = eps_model(x, t)
        x0_hat, eps_tilde = predict_x0(schedule, x, full(t, x), eps, clip=False)
        ours = ddim_step(schedule, x0_hat, eps_tilde, full(t_prev, x))
        prev_sample, pred_x0 = reference.step(eps, t, x)
        torch.testing.assert_close(pred_x0, x0_hat, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(prev_sample, ours, rtol=1e-11, atol=1e-11)
        x = ours


def test_monai_set_timesteps_grid_disagrees_with_its_step_stride() -> None:
    # the pitfall of architecture.md: MONAI's own grid (linspace, rounded) does not step by T // n, so its
    # loop evaluates at one timestep and steps to a level that is not the next grid point; we use explicit grids
    reference = MonaiDDIMScheduler(num_train_timesteps=T, schedule="linear_beta")
    reference.set_timesteps(inference_steps_for(7))
    gaps = set((reference.timesteps[:-1] - reference.timesteps[1:]).tolist())
    assert gaps != {7}


# ---------------------------------------------------------------------------------------------- DDIM inversion


@pytest.mark.parametrize("stride", [1, 7, 50])
def test_ddim_inversion_matches_diffusers_inverse_and_monai_reversed_step(schedule: NoiseSchedule, stride: int) -> None:
    inverse = DDIMInverseScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    inverse.set_timesteps(inference_steps_for(stride))
    inverse.alphas_cumprod = schedule.alpha_bar.clone()
    inverse.initial_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    monai = MonaiDDIMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    monai.set_timesteps(inference_steps_for(stride))
    monai.alphas_cumprod = schedule.alpha_bar.clone()
    grid = timestep_grid(0, T - 1, stride)  # 0, stride, ..., then 999 (the last gap may be shorter)
    ab = hand_alpha_bar()
    x = random_image(5, scale=0.5)
    monai_failed_near_t = False
    for t, t_next in zip(grid[:-1], grid[1:]):
        eps = eps_model(x, t)
        x0_hat, eps_tilde = predict_x0(schedule, x, full(t, x), eps, clip=False)
        ours = ddim_invert_step(schedule, x0_hat, eps_tilde, full(t_next, x))
        if t_next - t == stride:
            # diffusers' inverse step takes the TARGET timestep and derives the current one as target - stride
            torch.testing.assert_close(inverse.step(eps, t_next, x).prev_sample, ours, rtol=1e-11, atol=1e-11)
            torch.testing.assert_close(monai.reversed_step(eps, t, x)[0], ours, rtol=1e-11, atol=1e-11)
        else:
            # the shorter last gap ends at T-1: MONAI's reversed_step indexes alpha_bar[t + stride] past the end
            if t + stride > T - 1:
                with pytest.raises(IndexError):
                    monai.reversed_step(eps, t, x)
                monai_failed_near_t = True
            x0_hand = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
            expected = np.sqrt(ab[t_next]) * x0_hand + np.sqrt(1 - ab[t_next]) * eps
            torch.testing.assert_close(ours, expected, rtol=1e-11, atol=1e-11)
        x = ours
    assert monai_failed_near_t == (stride != 1)


def test_ddim_inversion_first_step_from_a_clean_image_matches_diffusers(schedule: NoiseSchedule) -> None:
    # diffusers' pipelines invert from the clean image: target 0, current "t = -1" (alpha_bar = 1), eps at 0
    inverse = DDIMInverseScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    inverse.set_timesteps(inference_steps_for(1))
    inverse.alphas_cumprod = schedule.alpha_bar.clone()
    inverse.initial_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    x0 = random_image(6, scale=0.5)
    eps = eps_model(x0, 0)
    ours = ddim_invert_step(schedule, x0, eps, full(0, x0))
    torch.testing.assert_close(inverse.step(eps, 0, x0).prev_sample, ours, **EXACT)


def test_ddim_step_to_the_clean_index_returns_x0_hat_and_inversion_rejects_it(schedule: NoiseSchedule) -> None:
    x0_hat, eps = random_image(7, scale=0.5), random_image(8)
    assert torch.equal(ddim_step(schedule, x0_hat, eps, full(-1, x0_hat)), x0_hat)
    with pytest.raises(ValueError, match="accepts"):
        ddim_invert_step(schedule, x0_hat, eps, full(-1, x0_hat))
    with pytest.raises(ValueError, match="accepts"):
        ddim_invert_step(schedule, x0_hat, eps, full(T, x0_hat))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("stride", [1, 7, 50])
def test_invert_then_decode_with_an_exact_eps_model_is_an_exact_round_trip(
    schedule: NoiseSchedule, stride: int, dtype: torch.dtype, tol: float
) -> None:
    x0 = (0.9 * torch.tanh(random_image(9))).to(dtype)  # inside [-1, 1]: clipping never acts
    noise = random_image(10).to(dtype)
    ab = torch.from_numpy(hand_alpha_bar())

    def exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        # the eps that is exact for x0: (x - sqrt(ab_t) x0) / sqrt(1 - ab_t), written out by hand
        return ((x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()).to(dtype)

    def on_path(t: int) -> torch.Tensor:
        return (ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * noise).to(dtype)

    end = 600
    x = q_sample(schedule, x0, full(0, x0), noise)
    for t, t_next in zip(timestep_grid(0, end, stride)[:-1], timestep_grid(0, end, stride)[1:]):
        x0_hat, eps_tilde = predict_x0(schedule, x, full(t, x), exact_eps(x, t))
        x = ddim_invert_step(schedule, x0_hat, eps_tilde, full(t_next, x))
        torch.testing.assert_close(x, on_path(t_next), rtol=tol, atol=tol)  # stays on the q_sample path
    for t, t_prev in zip(timestep_grid(end, -1, stride)[:-1], timestep_grid(end, -1, stride)[1:]):
        x0_hat, eps_tilde = predict_x0(schedule, x, full(t, x), exact_eps(x, t))
        x = ddim_step(schedule, x0_hat, eps_tilde, full(t_prev, x))
    assert x.dtype == dtype
    torch.testing.assert_close(x, x0, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- DDPM


def diffusers_ddpm(schedule: NoiseSchedule, clip: bool) -> DDPMScheduler:
    reference = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_large", clip_sample=clip
    )
    reference.alphas_cumprod = schedule.alpha_bar.clone()
    reference.one = torch.tensor(1.0, dtype=F64)
    return reference


@pytest.mark.parametrize("t", [0, 1, 2, 250, 500, 998, 999])
def test_ddpm_step_and_variance_match_diffusers_fixed_large(schedule: NoiseSchedule, t: int) -> None:
    reference = diffusers_ddpm(schedule, clip=True)
    xt = random_image(11, scale=1.5)
    eps = eps_model(xt, t)
    x0_hat, _ = predict_x0(schedule, xt, full(t, xt), eps, clip=True)
    mean, variance = ddpm_posterior(schedule, xt, full(t, xt), x0_hat)
    assert variance.shape == (2, 1, 1, 1) and variance.dtype == F64
    # the same seeded noise as diffusers draws inside step()
    out = reference.step(eps, t, xt, generator=torch.Generator().manual_seed(123))
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(123), dtype=F64)
    ours = ddpm_step(schedule, xt, full(t, xt), x0_hat, noise)
    torch.testing.assert_close(out.pred_original_sample, x0_hat, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out.prev_sample, ours, rtol=1e-11, atol=1e-11)
    ab, betas = hand_alpha_bar(), np.linspace(1e-4, 0.02, T)
    if t >= 1:
        expected_variance = float(reference._get_variance(t, variance_type="fixed_large"))
        assert expected_variance == pytest.approx(betas[t], rel=1e-10)
    else:
        # guided-diffusion's fixed-large table starts with the posterior variance of index 1 (diffusers: beta_0)
        expected_variance = betas[1] * (1 - ab[0]) / (1 - ab[1])
        assert torch.equal(ours, mean)  # no noise at t = 0
    torch.testing.assert_close(variance.flatten(), torch.full((2,), expected_variance, dtype=F64), **EXACT)


def test_ddpm_posterior_mean_equals_the_paper_form_without_clipping(schedule: NoiseSchedule) -> None:
    t = torch.tensor([5, 300])
    x0 = 0.5 * torch.tanh(random_image(12))
    xt = q_sample(schedule, x0, t, random_image(13))
    eps = predict_eps_from_x0(schedule, xt, t, x0) + 0.01 * random_image(14)
    x0_hat, _ = predict_x0(schedule, xt, t, eps)
    raw_x0, _ = predict_x0(schedule, xt, t, eps, clip=False)
    assert torch.equal(x0_hat, raw_x0)  # no clipping active
    mean, _ = ddpm_posterior(schedule, xt, t, x0_hat)
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, T))[t].reshape(2, 1, 1, 1)
    ab = torch.from_numpy(hand_alpha_bar())[t].reshape(2, 1, 1, 1)
    paper = (xt - betas / (1 - ab).sqrt() * eps) / (1 - betas).sqrt()  # P2 Eq. 3
    torch.testing.assert_close(mean, paper, rtol=1e-10, atol=1e-10)


def test_ddpm_step_per_sample_timesteps_equal_single_sample_calls(schedule: NoiseSchedule) -> None:
    xt, x0_hat, noise = random_image(15), 0.5 * torch.tanh(random_image(16)), random_image(17)
    t = torch.tensor([0, 40])
    batched = ddpm_step(schedule, xt, t, x0_hat, noise)
    for i in range(2):
        single = ddpm_step(schedule, xt[i : i + 1], t[i : i + 1], x0_hat[i : i + 1], noise[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, **EXACT)
    mean, _ = ddpm_posterior(schedule, xt, t, x0_hat)
    assert torch.equal(batched[0], mean[0])  # t = 0: no noise
    assert not torch.allclose(batched[1], mean[1])


# ---------------------------------------------------------------------------------------------- grids


def test_timestep_grid_includes_both_ends() -> None:
    assert timestep_grid(0, 10, 4) == [0, 4, 8, 10]
    assert timestep_grid(0, 8, 4) == [0, 4, 8]
    assert timestep_grid(10, -1, 5) == [10, 5, 0, -1]
    assert timestep_grid(999, -1, 50)[-3:] == [99, 49, -1]
    assert timestep_grid(3, 3, 1) == [3]
    assert timestep_grid(4, 0, 1) == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="stride"):
        timestep_grid(0, 10, 0)
    with pytest.raises(ValueError, match="-1"):
        timestep_grid(-2, 10, 1)
