"""Tests of the DDIM classifier-free counterfactual (Sanchez et al. / DDIB, spec D.3): analytic models, T = 50.

The reference loop is written from the spec equations (A.3, A.4, A.6) with a numpy schedule and plain tensor
arithmetic; it does not use ``anomalydiff.diffusion``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalydiff.config import load_config
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.base import CountingEpsModel
from anomalydiff.methods.ddib import DDIB, DDIBConfig, dynamic_clip_x0
from anomalydiff.records import Batch

T = 50
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "methods"
ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # spec A.1, independent of anomalydiff
SCHEDULE = make_schedule(ScheduleConfig(num_timesteps=T))


def ab(t: int) -> float:
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


def make_batch(b: int = 2, c: int = 4, size: int = 12) -> Batch:
    gen = torch.Generator().manual_seed(2)
    return Batch(
        image=torch.rand(b, c, size, size, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
        label=torch.full((b,), UNHEALTHY),
        mask=None,
        brain=torch.ones(b, 1, size, size, dtype=torch.bool),
        subject_id=[f"p{i}" for i in range(b)],
        slice_index=torch.arange(b),
    )


class ExactModel:
    """eps exact for a known x0* (tiled over the CFG-doubled batch), ignoring y."""

    def __init__(self, x0_star: torch.Tensor) -> None:
        self.x0_star = x0_star

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = torch.tensor([ab(int(i)) for i in t], dtype=x_t.dtype).view(-1, 1, 1, 1)
        x0 = self.x0_star.repeat(x_t.shape[0] // self.x0_star.shape[0], 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


class RecordingModel:
    """A nonlinear, label-dependent per-sample model recording (t, batch size, labels) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, list[int]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert len(set(t.tolist())) == 1
        self.calls.append((int(t[0]), int(x_t.shape[0]), y.tolist()))
        return eps_fn(x_t, t, y)


def eps_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    tt = t.to(x_t.dtype).view(-1, 1, 1, 1) / T
    shift = torch.tensor([0.15, -0.1, 0.0], dtype=x_t.dtype)[y].view(-1, 1, 1, 1)  # HEALTHY, UNHEALTHY, NULL
    return 0.6 * torch.tanh(1.4 * x_t) + 0.2 * tt * x_t.pow(2) + shift * (1 + x_t)


def reference_ddib(x0: torch.Tensor, noise_level: int, w: float, convention: str) -> torch.Tensor:
    """Spec D.3 written out: null-label DDIM inversion (A.4) then CFG DDIM decoding (A.6, A.4), stride 1."""
    b = x0.shape[0]
    null, healthy = torch.full((b,), NULL_LABEL), torch.full((b,), HEALTHY)
    if convention == "code":  # L inversions 0..L-1 -> 1..L, decoding L-1..0
        encode, decode = range(noise_level), range(noise_level - 1, -1, -1)
    else:  # inversions 0..L-2 -> top L-1, decoding L-1..0
        encode, decode = range(noise_level - 1), range(noise_level - 1, -1, -1)
    x = x0.clone()
    for k in encode:
        e = eps_fn(x, torch.full((b,), k), null)
        x0h = ((x - (1 - ab(k)) ** 0.5 * e) / ab(k) ** 0.5).clamp(-1, 1)
        e = (x - ab(k) ** 0.5 * x0h) / (1 - ab(k)) ** 0.5
        x = ab(k + 1) ** 0.5 * x0h + (1 - ab(k + 1)) ** 0.5 * e
    for i in decode:
        tv = torch.full((b,), i)
        e = (1 + w) * eps_fn(x, tv, healthy) - w * eps_fn(x, tv, null)  # A.6
        x0h = ((x - (1 - ab(i)) ** 0.5 * e) / ab(i) ** 0.5).clamp(-1, 1)
        e = (x - ab(i) ** 0.5 * x0h) / (1 - ab(i)) ** 0.5
        x = ab(i - 1) ** 0.5 * x0h + (1 - ab(i - 1)) ** 0.5 * e
    return x


@pytest.mark.parametrize("convention", ["code", "clean"])
def test_matches_reference_loop(convention: str) -> None:
    batch = make_batch()
    config = DDIBConfig(noise_level=9, guidance_w=1.1, index_convention=convention, modalities=None, median_size=0)
    out = DDIB(eps_fn, SCHEDULE, config).score(batch)
    expected = reference_ddib(batch.image, 9, 1.1, convention)
    torch.testing.assert_close(out.extras["reconstruction"], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.anomaly_map, (batch.image - expected).pow(2).mean(1, keepdim=True))
    # guidance matters here: w = 0 gives another (the plain conditional) counterfactual
    plain = DDIB(eps_fn, SCHEDULE, DDIBConfig(noise_level=9, guidance_w=0.0, index_convention=convention)).score(batch)
    torch.testing.assert_close(plain.extras["reconstruction"], reference_ddib(batch.image, 9, 0.0, convention),
                               atol=1e-10, rtol=0)
    assert float((plain.extras["reconstruction"] - expected).abs().max()) > 1e-3


@pytest.mark.parametrize("convention,stride", [("code", 1), ("clean", 1), ("code", 4), ("clean", 3)])
def test_exact_model_is_a_round_trip(convention: str, stride: int) -> None:
    batch = make_batch()
    config = DDIBConfig(noise_level=20, guidance_w=1.1, index_convention=convention, step_stride=stride)
    out = DDIB(ExactModel(batch.image), SCHEDULE, config).score(batch)
    torch.testing.assert_close(out.extras["reconstruction"], batch.image, atol=1e-10, rtol=0)
    assert float(out.anomaly_map.abs().max()) < 1e-18 and out.pred_mask is None


@pytest.mark.parametrize(
    "convention,stride,noise_level,expected_encode,expected_decode",
    [
        ("code", 1, 6, [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]),
        ("clean", 1, 6, [0, 1, 2, 3, 4], [5, 4, 3, 2, 1, 0]),
        ("code", 4, 10, [0, 4, 8], [8, 4, 0]),  # grid [0, 4, 8, 10]
        ("clean", 4, 10, [0, 4, 8], [9, 8, 4, 0]),  # grid [0, 4, 8, 9]
    ],
)
def test_cost_and_one_batched_cfg_call(convention, stride, noise_level, expected_encode, expected_decode) -> None:
    batch = make_batch(b=3)
    recorder = RecordingModel()
    counting = CountingEpsModel(recorder)
    config = DDIBConfig(noise_level=noise_level, index_convention=convention, step_stride=stride)
    out = DDIB(counting, SCHEDULE, config).score(batch)
    encode_calls = recorder.calls[: len(expected_encode)]
    decode_calls = recorder.calls[len(expected_encode):]
    assert [t for t, _, _ in encode_calls] == expected_encode
    assert all(size == 3 and labels == [NULL_LABEL] * 3 for _, size, labels in encode_calls)
    assert [t for t, _, _ in decode_calls] == expected_decode
    # CFG decoding: conditional and null in ONE call of batch 2B (spec D.3 / brief)
    assert all(size == 6 and labels == [HEALTHY] * 3 + [NULL_LABEL] * 3 for _, size, labels in decode_calls)
    expected_nfe = len(expected_encode) + 2 * len(expected_decode)
    assert out.nfe == expected_nfe and counting.image_evaluations == 3 * expected_nfe


def test_paper_cost() -> None:
    """P2 BraTS (L = 450, stride 1, code): 450 inversions + 450 x 2 CFG evaluations (spec F.2)."""
    method = DDIB(eps_fn, make_schedule(ScheduleConfig()), DDIBConfig())
    assert len(method.plan.encode) == 450 and len(method.plan.decode) == 450
    assert method.plan.encode[-1] == (449, 450) and method.plan.decode[0] == (449, 448)


def test_batch_of_two_equals_two_batches_of_one() -> None:
    batch = make_batch()
    method = DDIB(eps_fn, SCHEDULE, DDIBConfig(noise_level=7, dynamic_clip=True))
    both = method.score(batch)
    for b in range(2):
        one = method.score(batch.select([b]))
        torch.testing.assert_close(one.anomaly_map[0], both.anomaly_map[b], atol=1e-12, rtol=0)
        torch.testing.assert_close(one.image_score[0], both.image_score[b], atol=1e-12, rtol=0)
    again = method.score(batch)
    torch.testing.assert_close(again.anomaly_map, both.anomaly_map, atol=0, rtol=0)


def test_dynamic_clip_by_hand() -> None:
    x = torch.tensor([[[[0.5, -3.0], [2.0, 0.25]], [[0.1, -0.2], [0.3, 0.4]]]], dtype=torch.float64)
    out = dynamic_clip_x0(x, 0.99)
    s = float(np.quantile(np.abs(x[0, 0].numpy()), 0.99))  # channel 0: s > 1 -> clamp and rescale
    expected0 = np.clip(x[0, 0].numpy(), -s, s) / s
    np.testing.assert_allclose(out[0, 0].numpy(), expected0)
    torch.testing.assert_close(out[0, 1], x[0, 1])  # channel 1: |x| <= 1, s = 1 -> unchanged
    assert float(out.abs().max()) <= 1.0


def test_presets_and_calibration() -> None:
    preset = load_config(DDIBConfig, CONFIGS / "ddib.yaml")
    assert (preset.noise_level, preset.guidance_w, preset.dynamic_clip, preset.modalities) == (450, 1.1, False, (0, 3))
    assert DDIB.uses_pixel_labels is True
    method = DDIB(eps_fn, SCHEDULE, DDIBConfig(noise_level=5))
    assert method.fit([]) is method
    saved = json.loads(json.dumps(method.calibration()))
    assert saved["native_threshold"] is None
    assert method.load_calibration(saved) is method
    with pytest.raises(ValueError, match="config"):
        DDIB(eps_fn, SCHEDULE, DDIBConfig(noise_level=5, guidance_w=2.0)).load_calibration(saved)
    with pytest.raises(ValueError, match="lower noise_level"):
        DDIB(eps_fn, SCHEDULE, DDIBConfig(noise_level=T))
