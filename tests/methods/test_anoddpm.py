"""Tests of AnoDDPM (spec D.1) with analytic models: no training, float64, T = 50.

The reference loop is written from the spec equations (A.2, A.3, A.4) with a numpy schedule; it shares with
the method only the per-image noise draws (same generators, same order), not the diffusion math.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalydiff.config import load_config
from anomalydiff.diffusion.noise import SimplexConfig, simplex_noise
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import NULL_LABEL, UNHEALTHY
from anomalydiff.methods.anoddpm import AnoDDPM, AnoDDPMConfig
from anomalydiff.methods.base import CountingEpsModel
from anomalydiff.methods.common import gaussian_per_image, image_generators
from anomalydiff.records import Batch

T = 50
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "methods"
BETAS = np.linspace(1e-4, 0.02, T)
ALPHA_BAR = np.cumprod(1.0 - BETAS)  # spec A.1, independent of anomalydiff
SCHEDULE = make_schedule(ScheduleConfig(num_timesteps=T))


def ab(t: int) -> float:
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


def make_batch(b: int = 2, c: int = 4, size: int = 8) -> Batch:
    gen = torch.Generator().manual_seed(1)
    brain = torch.zeros(b, 1, size, size, dtype=torch.bool)
    brain[:, :, 2:-2, 2:-2] = True
    return Batch(
        image=torch.rand(b, c, size, size, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
        label=torch.full((b,), UNHEALTHY),
        mask=None,
        brain=brain,
        subject_id=[f"case{i}" for i in range(b)],
        slice_index=torch.arange(b) + 40,
    )


class ExactModel:
    """eps exact for a known x0*, ignoring y."""

    def __init__(self, x0_star: torch.Tensor) -> None:
        self.x0_star = x0_star

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = torch.tensor([ab(int(i)) for i in t], dtype=x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.x0_star) / (1 - abar).sqrt()


class RecordingModel:
    """A nonlinear per-sample analytic model that records (t, labels) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((int(t[0]), tuple(sorted(set(y.tolist())))))
        tt = t.to(x_t.dtype).view(-1, 1, 1, 1) / T
        return 0.7 * torch.tanh(1.3 * x_t) + 0.3 * tt * x_t.pow(3)


def reference_anoddpm(batch: Batch, model, noise_level: int, noise: str, convention: str, seed: int) -> torch.Tensor:
    """Spec D.1: x_lambda by A.2, DDPM steps (A.4 posterior mean, fixed-large variance) down to 0."""
    x0 = batch.image
    gens = image_generators(batch, seed)

    def draw(like: torch.Tensor, t: int) -> torch.Tensor:
        if noise == "gaussian":
            return gaussian_per_image(like, gens)
        return torch.cat([
            simplex_noise((1, *like.shape[1:]), torch.tensor([t]), SimplexConfig(), generator=g, dtype=like.dtype)
            for g in gens
        ])

    start = noise_level if convention == "code" else noise_level - 1
    x = ab(start) ** 0.5 * x0 + (1 - ab(start)) ** 0.5 * draw(x0, start)
    for t in range(noise_level - 1, -1, -1):
        e = model(x, torch.full((x.shape[0],), t), torch.full((x.shape[0],), NULL_LABEL))
        x0h = ((x - (1 - ab(t)) ** 0.5 * e) / ab(t) ** 0.5).clamp(-1, 1)
        beta = BETAS[t]
        mean = beta * ab(t - 1) ** 0.5 / (1 - ab(t)) * x0h + (1 - ab(t - 1)) * (1 - beta) ** 0.5 / (1 - ab(t)) * x
        x = mean + beta**0.5 * draw(x, t) if t > 0 else mean
    return x


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
@pytest.mark.parametrize("convention", ["code", "clean"])
def test_matches_reference_loop(noise: str, convention: str) -> None:
    batch = make_batch()
    config = AnoDDPMConfig(noise=noise, noise_level=8, index_convention=convention, seed=3, median_size=0,
                           modalities=None)
    model = RecordingModel()
    out = AnoDDPM(model, SCHEDULE, config).score(batch)
    expected = reference_anoddpm(batch, RecordingModel(), 8, noise, convention, seed=3)
    torch.testing.assert_close(out.extras["reconstruction"], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.anomaly_map, (batch.image - expected).pow(2).mean(1, keepdim=True))
    # the other noise family gives another reconstruction (the noise family really is used)
    other = "simplex" if noise == "gaussian" else "gaussian"
    assert float((reference_anoddpm(batch, RecordingModel(), 8, other, convention, 3) - expected).abs().max()) > 1e-3


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_exact_model_gives_zero_map(noise: str) -> None:
    batch = make_batch()
    out = AnoDDPM(ExactModel(batch.image), SCHEDULE, AnoDDPMConfig(noise=noise, noise_level=12)).score(batch)
    torch.testing.assert_close(out.extras["reconstruction"], batch.image, atol=1e-10, rtol=0)
    assert float(out.anomaly_map.abs().max()) < 1e-18
    assert out.pred_mask is None


@pytest.mark.parametrize("convention,start", [("code", 10), ("clean", 9)])
def test_nfe_is_number_of_reverse_steps(convention: str, start: int) -> None:
    batch = make_batch(b=3)
    recorder = RecordingModel()
    counting = CountingEpsModel(recorder)
    method = AnoDDPM(counting, SCHEDULE, AnoDDPMConfig(noise="gaussian", noise_level=10, index_convention=convention))
    out = method.score(batch)
    assert method.start_level == start
    assert [t for t, _ in recorder.calls] == list(range(9, -1, -1))
    assert all(labels == (NULL_LABEL,) for _, labels in recorder.calls)  # unconditional: y = NULL_LABEL
    assert out.nfe == 10 and counting.image_evaluations == 30


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_batch_of_two_equals_two_batches_of_one(noise: str) -> None:
    batch = make_batch()
    method = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise=noise, noise_level=6, seed=11))
    both = method.score(batch)
    for b in range(2):
        one = method.score(batch.select([b]))
        torch.testing.assert_close(one.anomaly_map[0], both.anomaly_map[b], atol=1e-12, rtol=0)
        torch.testing.assert_close(one.image_score[0], both.image_score[b], atol=1e-12, rtol=0)


def test_same_seed_same_output_other_seed_differs() -> None:
    batch = make_batch()
    first = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=6, seed=1)).score(batch)
    again = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=6, seed=1)).score(batch)
    other = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=6, seed=2)).score(batch)
    torch.testing.assert_close(first.anomaly_map, again.anomaly_map, atol=0, rtol=0)
    assert float((first.anomaly_map - other.anomaly_map).abs().max()) > 1e-4


def test_map_is_median_filtered_mean_over_modalities() -> None:
    batch = make_batch()
    out = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=6)).score(batch)
    error = (batch.image - out.extras["reconstruction"])[:, [0, 3]].pow(2).mean(1).numpy()
    expected = np.stack([ndimage.median_filter(np.ascontiguousarray(e), size=5, mode="mirror") for e in error])
    np.testing.assert_allclose(out.anomaly_map[:, 0].numpy(), expected, atol=1e-14)
    inside = [out.anomaly_map[b, 0][batch.brain[b, 0]].max() for b in range(2)]
    torch.testing.assert_close(out.image_score, torch.stack(inside))


def test_presets_and_calibration() -> None:
    gauss = load_config(AnoDDPMConfig, CONFIGS / "anoddpm_gauss.yaml")
    simplex = load_config(AnoDDPMConfig, CONFIGS / "anoddpm_simplex.yaml")
    assert (gauss.noise, gauss.noise_level, gauss.modalities, gauss.median_size) == ("gaussian", 300, (0, 3), 5)
    assert (simplex.noise, simplex.noise_level) == ("simplex", 200)
    assert simplex.simplex == SimplexConfig(octaves=6, persistence=0.8, frequency=64.0)
    assert AnoDDPM.uses_pixel_labels is True
    method = AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=5))
    assert method.fit([]) is method
    saved = json.loads(json.dumps(method.calibration()))
    assert saved["native_threshold"] is None and saved["uses_pixel_labels"] is True
    assert method.load_calibration(saved) is method
    with pytest.raises(ValueError, match="config"):
        AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=6)).load_calibration(saved)


def test_noise_level_beyond_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="lower noise_level"):
        AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=T))
    AnoDDPM(RecordingModel(), SCHEDULE, AnoDDPMConfig(noise_level=T, index_convention="clean"))
