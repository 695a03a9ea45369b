"""Noise schedules against diffusers / MONAI and the spec A.1 reference values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from monai.networks.schedulers import DDPMScheduler as MonaiDDPMScheduler

from anomalydiff.config import ConfigError, from_dict
from anomalydiff.diffusion import NoiseSchedule, ScheduleConfig, make_schedule, schedule_from_betas

#: float32 has a 24-bit mantissa: a float64 value and its float32 neighbour differ by < 6e-8 relative.
FLOAT32_RTOL = 2.5e-7


@pytest.mark.parametrize("num_timesteps", [20, 1000])
def test_linear_betas_are_float64_linspace_and_match_diffusers_and_monai(num_timesteps: int) -> None:
    schedule = make_schedule(ScheduleConfig(name="linear", num_timesteps=num_timesteps))
    assert schedule.betas.dtype == torch.float64
    np.testing.assert_array_equal(schedule.betas.numpy(), np.linspace(1e-4, 0.02, num_timesteps))
    # diffusers and MONAI build the same schedule in float32
    reference = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear").betas
    torch.testing.assert_close(schedule.betas.float(), reference, rtol=FLOAT32_RTOL, atol=0.0)
    monai_betas = MonaiDDPMScheduler(num_train_timesteps=num_timesteps, schedule="linear_beta").betas
    torch.testing.assert_close(schedule.betas.float(), monai_betas, rtol=FLOAT32_RTOL, atol=0.0)
    # alpha_bar vs diffusers' float32 cumprod (its rounding grows along the product)
    torch.testing.assert_close(
        schedule.alpha_bar, DDPMScheduler(num_train_timesteps=num_timesteps).alphas_cumprod.double(), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("num_timesteps", [20, 50, 1000])
def test_cosine_betas_match_diffusers_squaredcos_cap_v2(num_timesteps: int) -> None:
    schedule = make_schedule(ScheduleConfig(name="cosine", num_timesteps=num_timesteps))
    reference = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="squaredcos_cap_v2").betas
    # diffusers computes the same float64 values and rounds them to float32
    assert torch.equal(schedule.betas.float(), reference)
    # the last beta is capped at 0.999 (Nichol & Dhariwal)
    assert schedule.betas[-1].item() == 0.999
    assert bool((schedule.betas[:-1] < 0.999).all())


def test_cosine_betas_match_the_nichol_dhariwal_formula_by_hand() -> None:
    num_timesteps, offset = 50, 0.008
    u = np.arange(num_timesteps + 1) / num_timesteps
    f = np.cos((u + offset) / (1 + offset) * np.pi / 2) ** 2
    expected = np.minimum(1 - f[1:] / f[:-1], 0.999)
    schedule = make_schedule(ScheduleConfig(name="cosine", num_timesteps=num_timesteps))
    np.testing.assert_allclose(schedule.betas.numpy(), expected, rtol=1e-13, atol=0)


# spec A.1: code index i -> (alpha_bar, sqrt(alpha_bar), B = (1 - alpha_bar) / sqrt(alpha_bar)), as printed
SPEC_A1_REFERENCE = {
    0: ("0.9999", "0.99995", "1e-4"),
    99: ("0.8970", "0.947", "0.109"),
    199: ("0.659", "0.812", "0.42"),
    299: ("0.396", "0.630", "0.96"),
    399: ("0.195", "0.442", "1.82"),
    499: ("0.0786", "0.280", "3.29"),
    599: ("0.0259", "0.161", "6.06"),
    999: ("4e-5", "0.0064", "157"),
}


def _half_last_digit(printed: str) -> float:
    """Rounding tolerance of a printed number: half a unit of its last significant digit."""
    mantissa, _, exponent = printed.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


@pytest.mark.parametrize("index", sorted(SPEC_A1_REFERENCE))
def test_linear_schedule_matches_spec_a1_reference_values(index: int) -> None:
    schedule = make_schedule(ScheduleConfig())
    alpha_bar = schedule.alpha_bar[index].item()
    computed = (alpha_bar, alpha_bar**0.5, (1 - alpha_bar) / alpha_bar**0.5)
    for value, printed in zip(computed, SPEC_A1_REFERENCE[index]):
        assert abs(value - float(printed)) <= _half_last_digit(printed) * (1 + 1e-9), (index, value, printed)


def test_tables_are_consistent_and_alpha_bar_prev_starts_at_one() -> None:
    schedule = make_schedule(ScheduleConfig(num_timesteps=30))
    assert schedule.num_timesteps == 30
    for table in (schedule.betas, schedule.alphas, schedule.alpha_bar, schedule.alpha_bar_prev):
        assert table.dtype == torch.float64 and table.shape == (30,)
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.alpha_bar, torch.cumprod(1 - schedule.betas, 0), rtol=0, atol=0)
    assert schedule.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bar[:-1])


def test_alpha_bar_at_shapes_dtype_and_clean_index() -> None:
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    values = schedule.alpha_bar_at(torch.tensor([-1, 0, 49]), like)
    assert values.shape == (3, 1, 1, 1) and values.dtype == torch.float32 and values.device == like.device
    assert values[0].item() == 1.0
    assert values[1].item() == pytest.approx(schedule.alpha_bar[0].item(), rel=1e-7)
    assert values[2].item() == pytest.approx(schedule.alpha_bar[49].item(), rel=1e-7)
    # float64 like keeps full precision; an int or a 0-dim t is broadcast to the batch
    like64 = like.double()
    assert torch.equal(schedule.alpha_bar_at(7, like64).flatten(), schedule.alpha_bar[[7, 7, 7]])
    assert torch.equal(schedule.alpha_bar_at(torch.tensor(7), like64).flatten(), schedule.alpha_bar[[7, 7, 7]])
    # rank follows like (3-D volumes [B, C, D, H, W] work too)
    assert schedule.alpha_bar_at(torch.tensor([1, 2]), torch.zeros(2, 1, 2, 2, 2)).shape == (2, 1, 1, 1, 1)


@pytest.mark.parametrize(
    "t, message",
    [
        (torch.tensor([0, 50, 1]), "accepts"),
        (torch.tensor([-2, 0, 1]), "accepts"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (torch.tensor([0, 1]), "one timestep per sample"),
        (1.5, "LongTensor"),
    ],
)
def test_alpha_bar_at_rejects_bad_timesteps_with_a_fix(t: object, message: str) -> None:
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    with pytest.raises(ValueError, match=message):
        schedule.alpha_bar_at(t, torch.zeros(3, 1, 2, 2))  # type: ignore[arg-type]


def test_schedule_config_is_frozen_validated_and_loads_from_a_dict() -> None:
    config = ScheduleConfig()
    assert (config.name, config.num_timesteps, config.beta_start, config.beta_end) == ("linear", 1000, 1e-4, 0.02)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_timesteps = 10  # type: ignore[misc]
    with pytest.raises(ValueError, match="beta_start"):
        ScheduleConfig(beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match="num_timesteps"):
        ScheduleConfig(num_timesteps=1)
    loaded = from_dict(ScheduleConfig, {"name": "cosine", "num_timesteps": 20})
    assert loaded == ScheduleConfig(name="cosine", num_timesteps=20)
    with pytest.raises(ConfigError):
        from_dict(ScheduleConfig, {"name": "quadratic"})


def test_schedule_from_betas_rejects_invalid_betas() -> None:
    assert isinstance(schedule_from_betas(torch.tensor([0.1, 0.2])), NoiseSchedule)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        schedule_from_betas(np.array([0.1, 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        schedule_from_betas(np.array([0.1]))
