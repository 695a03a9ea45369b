"""Tests of Wolleb et al. 2022 (spec B, D.2) with analytic models: no training, float64, T = 50.

The reference loops below are written from the spec equations (A.3, A.4, A.7, B.3) with plain tensor
arithmetic and a numpy alpha_bar table; they do not use ``anomalydiff.diffusion``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from anomalydiff.config import load_config
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.base import CountingEpsModel
from anomalydiff.methods.wolleb import (
    Wolleb,
    WollebConfig,
    gaussian_per_image,
    image_generators,
    masked_image_score,
    otsu_masks,
    reconstruction_error_map,
    strided_grid,
)
from anomalydiff.records import Batch

T = 50
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "methods"
ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # spec A.1, independent of anomalydiff


def ab(t: int) -> float:
    """alpha_bar at code index t; 1 at t = -1."""
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


def make_batch(b: int = 2, c: int = 4, size: int = 16, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    image = (torch.rand(b, c, size, size, generator=gen, dtype=torch.float64) * 1.6 - 0.8)
    brain = torch.zeros(b, 1, size, size, dtype=torch.bool)
    brain[:, :, 2:-2, 2:-2] = True
    return Batch(
        image=image,
        label=torch.full((b,), UNHEALTHY),
        mask=None,
        brain=brain,
        subject_id=[f"subject{i}" for i in range(b)],
        slice_index=torch.arange(b) * 3 + 5,
    )


class ExactModel:
    """eps that is exact for a known x0*: (x_t - sqrt(ab_t) x0*) / sqrt(1 - ab_t); ignores y."""

    def __init__(self, x0_star: torch.Tensor) -> None:
        self.x0_star = x0_star

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = torch.tensor([ab(int(i)) for i in t], dtype=x_t.dtype).view(-1, 1, 1, 1)
        x0 = self.x0_star.repeat(x_t.shape[0] // self.x0_star.shape[0], 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def nonlinear_eps(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-sample, label- and time-dependent analytic noise model."""
    tt = t.to(x_t.dtype).view(-1, 1, 1, 1) / T
    yy = y.to(x_t.dtype).view(-1, 1, 1, 1)
    return 0.6 * torch.tanh(1.5 * x_t) + 0.2 * tt * x_t.pow(2) + 0.05 * (yy - 0.5)


class LinearClassifier:
    """logits_k = (1 + t/T) <W_k, x>; its log-softmax gradient is (1 + t/T)(W_y - sum_k p_k W_k)."""

    def __init__(self, channels: int = 4, size: int = 16) -> None:
        gen = torch.Generator().manual_seed(123)
        self.weights = torch.randn(2, channels, size, size, generator=gen, dtype=torch.float64) * 0.5
        self.images_seen = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.images_seen += int(x_t.shape[0])
        scale = 1 + t.to(x_t.dtype).view(-1, 1) / T
        return scale * torch.einsum("bchw,kchw->bk", x_t, self.weights.to(x_t))

    def hand_grad(self, x_t: torch.Tensor, t: int, y: int) -> torch.Tensor:
        scale = 1 + t / T
        logits = scale * torch.einsum("bchw,kchw->bk", x_t, self.weights)
        p = torch.softmax(logits, dim=1)
        mixed = torch.einsum("bk,kchw->bchw", p, self.weights)
        return scale * (self.weights[y].unsqueeze(0) - mixed)


def clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1)


def reference_wolleb(
    batch: Batch, classifier: LinearClassifier, noise_level: int, scale: float, convention: str, seed: int
) -> torch.Tensor:
    """Spec B.3 (DDIM inversion + guided DDIM decoding) written out from the equations, stride 1."""
    x0 = batch.image
    noise = gaussian_per_image(x0, image_generators(batch, seed))
    x = ab(0) ** 0.5 * x0 + (1 - ab(0)) ** 0.5 * noise  # B.3.1 q_sample at 0
    h = HEALTHY
    if convention == "code":  # B.3 code detail: encode k = 1..L-1 -> k+1, decode L-2..0
        encode = [(k, k + 1) for k in range(1, noise_level)]
        decode = list(range(noise_level - 2, -1, -1))
    else:  # paper form: encode 0..L-2 -> k+1 (top L-1), decode L-1..0
        encode = [(k, k + 1) for k in range(0, noise_level - 1)]
        decode = list(range(noise_level - 1, -1, -1))
    y = torch.full((x0.shape[0],), h)
    for k, k_next in encode:
        e = nonlinear_eps(x, torch.full((x0.shape[0],), k), y)
        x0h = clip((x - (1 - ab(k)) ** 0.5 * e) / ab(k) ** 0.5)  # A.3
        e = (x - ab(k) ** 0.5 * x0h) / (1 - ab(k)) ** 0.5
        x = ab(k_next) ** 0.5 * x0h + (1 - ab(k_next)) ** 0.5 * e  # A.4 inversion
    for i in decode:
        e = nonlinear_eps(x, torch.full((x0.shape[0],), i), y)
        x0h = clip((x - (1 - ab(i)) ** 0.5 * e) / ab(i) ** 0.5)
        e = (x - ab(i) ** 0.5 * x0h) / (1 - ab(i)) ** 0.5
        e = e - scale * (1 - ab(i)) ** 0.5 * classifier.hand_grad(x, i, h)  # A.7
        x0h = (x - (1 - ab(i)) ** 0.5 * e) / ab(i) ** 0.5  # not clipped again
        x = ab(i - 1) ** 0.5 * x0h + (1 - ab(i - 1)) ** 0.5 * e  # A.4 decoding
    return x


def reference_wolleb_ddpm(batch: Batch, classifier: LinearClassifier, noise_level: int, scale: float, seed: int):
    """Spec B.3 DDPM variant, code convention: q_sample to L-1, ancestral steps L-2..0, guided mean (A.7)."""
    x0 = batch.image
    gens = image_generators(batch, seed)
    betas = np.linspace(1e-4, 0.02, T)
    x = ab(noise_level - 1) ** 0.5 * x0 + (1 - ab(noise_level - 1)) ** 0.5 * gaussian_per_image(x0, gens)
    y = torch.full((x0.shape[0],), HEALTHY)
    for i in range(noise_level - 2, -1, -1):
        e = nonlinear_eps(x, torch.full((x0.shape[0],), i), y)
        x0h = clip((x - (1 - ab(i)) ** 0.5 * e) / ab(i) ** 0.5)
        beta, abar, abar_prev = betas[i], ab(i), ab(i - 1)
        mean = beta * abar_prev**0.5 / (1 - abar) * x0h + (1 - abar_prev) * (1 - beta) ** 0.5 / (1 - abar) * x
        # fixed-large variance, first entry = posterior variance at index 1 (A.4)
        var = beta if i > 0 else betas[1] * (1 - ab(0)) / (1 - ab(1))
        mean = mean + scale * var * classifier.hand_grad(x, i, HEALTHY)
        x = mean + var**0.5 * gaussian_per_image(x, gens) if i > 0 else mean
    return x


SCHEDULE = make_schedule(ScheduleConfig(num_timesteps=T))


@pytest.mark.parametrize(
    "encoding,sampler,convention,stride",
    [
        ("ddim", "ddim", "code", 1),
        ("ddim", "ddim", "clean", 1),
        ("ddim", "ddim", "code", 3),
        ("ddim", "ddim", "clean", 4),
        ("q_sample", "ddim", "code", 1),
        ("q_sample", "ddim", "clean", 2),
        ("q_sample", "ddpm", "code", 1),
        ("q_sample", "ddpm", "clean", 1),
    ],
)
def test_zero_scale_is_exact_round_trip(encoding: str, sampler: str, convention: str, stride: int) -> None:
    batch = make_batch()
    config = WollebConfig(
        noise_level=20, classifier_scale=0.0, encoding=encoding, sampler=sampler,
        index_convention=convention, step_stride=stride,
    )
    classifier = LinearClassifier()
    out = Wolleb(ExactModel(batch.image), classifier, SCHEDULE, config).score(batch)
    torch.testing.assert_close(out.extras["reconstruction"], batch.image, atol=1e-10, rtol=0)
    assert float(out.anomaly_map.abs().max()) < 1e-9  # zero up to round-off (Otsu is scale-invariant)
    assert classifier.images_seen == 0 and out.extras["classifier_evaluations"] == 0


@pytest.mark.parametrize("convention", ["code", "clean"])
def test_matches_reference_loop(convention: str) -> None:
    batch = make_batch()
    classifier = LinearClassifier()
    # s = 30 pushes the guided x0 out of [-1, 1] at some steps: the test also checks it is not re-clipped (A.7)
    config = WollebConfig(noise_level=12, classifier_scale=30.0, index_convention=convention, seed=4)
    out = Wolleb(nonlinear_eps, classifier, SCHEDULE, config).score(batch)
    expected = reference_wolleb(batch, classifier, 12, 30.0, convention, seed=4)
    torch.testing.assert_close(out.extras["reconstruction"], expected, atol=1e-10, rtol=0)
    # guidance must have changed something, else the comparison proves little
    plain = Wolleb(nonlinear_eps, classifier, SCHEDULE, WollebConfig(noise_level=12, classifier_scale=0.0,
                   index_convention=convention, seed=4)).score(batch)
    assert float((plain.extras["reconstruction"] - expected).abs().max()) > 1e-3
    # P1 map: sum over channels of |x - x_hat|, no filter (B.3.4)
    torch.testing.assert_close(out.anomaly_map, (batch.image - expected).abs().sum(1, keepdim=True))


def test_ddpm_variant_matches_reference_loop() -> None:
    batch = make_batch()
    classifier = LinearClassifier()
    config = WollebConfig(noise_level=10, classifier_scale=30.0, encoding="q_sample", sampler="ddpm", seed=9)
    out = Wolleb(nonlinear_eps, classifier, SCHEDULE, config).score(batch)
    expected = reference_wolleb_ddpm(batch, classifier, 10, 30.0, seed=9)
    torch.testing.assert_close(out.extras["reconstruction"], expected, atol=1e-10, rtol=0)


def test_otsu_mask_matches_skimage() -> None:
    batch = make_batch()
    out = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, WollebConfig(noise_level=10, classifier_scale=3.0)).score(
        batch
    )
    for b in range(2):
        amap = out.anomaly_map[b, 0].numpy()
        expected = amap > threshold_otsu(amap)
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(out.pred_mask[b, 0].numpy(), expected)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"encoding": "q_sample", "threshold": "policy", "map_error": "squared_mean", "modalities": (0, 3),
         "median_size": 5},
        {"encoding": "q_sample", "sampler": "ddpm"},
        {"step_stride": 3, "index_convention": "clean"},
    ],
)
def test_batch_of_two_equals_two_batches_of_one(changes: dict) -> None:
    batch = make_batch()
    config = WollebConfig(noise_level=10, classifier_scale=3.0, seed=2, **changes)
    method = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, config)
    both = method.score(batch)
    for b in range(2):
        one = method.score(batch.select([b]))
        torch.testing.assert_close(one.anomaly_map[0], both.anomaly_map[b], atol=1e-12, rtol=0)
        torch.testing.assert_close(
            one.extras["reconstruction"][0], both.extras["reconstruction"][b], atol=1e-12, rtol=0
        )
        torch.testing.assert_close(one.image_score[0], both.image_score[b], atol=1e-12, rtol=0)


def test_same_seed_same_output_other_seed_differs() -> None:
    batch = make_batch()
    config = WollebConfig(noise_level=10, classifier_scale=3.0, encoding="q_sample", sampler="ddpm", seed=5)
    first = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, config).score(batch)
    again = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, config).score(batch)
    torch.testing.assert_close(first.anomaly_map, again.anomaly_map, atol=0, rtol=0)
    other = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, WollebConfig(
        noise_level=10, classifier_scale=3.0, encoding="q_sample", sampler="ddpm", seed=6)).score(batch)
    assert float((other.anomaly_map - first.anomaly_map).abs().max()) > 1e-3


class RecordingModel:
    """Counts and records the timesteps and labels of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert len(set(t.tolist())) == 1
        self.calls.append((int(t[0]), tuple(sorted(set(y.tolist())))))
        return nonlinear_eps(x_t, t, y)


@pytest.mark.parametrize(
    "convention,stride,noise_level,encoding,expected_encode,expected_decode",
    [
        # spec B.3 code detail / E.16: L-1 inversions at 1..L-1, L-1 decoding steps at L-2..0
        ("code", 1, 10, "ddim", list(range(1, 10)), list(range(8, -1, -1))),
        # paper form: inversions 0..L-2 (top level L-1), decoding L-1..0
        ("clean", 1, 10, "ddim", list(range(0, 9)), list(range(9, -1, -1))),
        # strided, grid [0, 4, 8, 12, 16, 20] in grid-position space
        ("code", 4, 20, "ddim", [4, 8, 12, 16], [12, 8, 4, 0]),
        # strided, grid [0, 4, 8, 12, 16, 19]
        ("clean", 4, 20, "ddim", [0, 4, 8, 12, 16], [19, 16, 12, 8, 4, 0]),
        # P2 re-run: q_sample to L-1, the decoding loop of the code (L-2..0)
        ("code", 1, 10, "q_sample", [], list(range(8, -1, -1))),
        ("clean", 1, 10, "q_sample", [], list(range(9, -1, -1))),
    ],
)
def test_cost_and_timesteps(convention, stride, noise_level, encoding, expected_encode, expected_decode) -> None:
    batch = make_batch(b=3)
    recorder = RecordingModel()
    counting = CountingEpsModel(recorder)
    classifier = LinearClassifier()
    config = WollebConfig(
        noise_level=noise_level, classifier_scale=5.0, index_convention=convention, step_stride=stride,
        encoding=encoding,
    )
    out = Wolleb(counting, classifier, SCHEDULE, config).score(batch)
    steps = expected_encode + expected_decode
    assert [t for t, _ in recorder.calls] == steps
    assert all(labels == (HEALTHY,) for _, labels in recorder.calls)  # model conditioned on y = h (B.3)
    assert counting.image_evaluations == len(steps) * 3
    assert out.nfe == len(steps)
    assert classifier.images_seen == len(expected_decode) * 3  # one classifier gradient per decoding step
    assert out.extras["classifier_evaluations"] == len(expected_decode)


def test_paper_cost_counts() -> None:
    """P1 at L = 500 (code): 2 (L - 1) = 998 UNet evaluations and 499 classifier passes (spec B.3 cost)."""
    method = Wolleb(nonlinear_eps, LinearClassifier(), make_schedule(ScheduleConfig()), WollebConfig())
    assert len(method.plan.encode) + len(method.plan.decode) == 998
    assert len(method.plan.decode) == 499
    assert method.plan.encode[-1] == (499, 500) and method.plan.decode[0] == (498, 497)


def test_error_map_forms_by_hand() -> None:
    x0 = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    x_hat = x0.clone()
    x_hat[0, 0, 0, 0] = 0.5
    x_hat[0, 1, 0, 0] = -0.25
    x_hat[0, 3, 1, 1] = 1.0
    l1 = reconstruction_error_map(x0, x_hat, "l1_sum")
    torch.testing.assert_close(l1[0, 0], torch.tensor([[0.75, 0.0], [0.0, 1.0]], dtype=torch.float64))
    sq = reconstruction_error_map(x0, x_hat, "squared_mean", modalities=(0, 3))
    torch.testing.assert_close(sq[0, 0], torch.tensor([[0.125, 0.0], [0.0, 0.5]], dtype=torch.float64))
    for error in ("l1_sum", "squared_mean"):
        for norm in ("none", "minmax"):
            same = reconstruction_error_map(x_hat, x_hat.clone(), error, (0, 3), norm)
            assert float(same.abs().max()) == 0.0
    # CheXpert form: min-max each image first; x and 2x + 1 are identical after min-max
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=torch.float64)
    assert float(reconstruction_error_map(x, 2 * x + 1, "l1_sum", normalisation="minmax").abs().max()) == 0.0
    torch.testing.assert_close(
        reconstruction_error_map(x, torch.zeros_like(x), "l1_sum", normalisation="minmax")[0, 0],
        torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="modalities"):
        reconstruction_error_map(x0, x_hat, "l1_sum", modalities=(4,))


def test_otsu_of_an_exactly_zero_map_is_empty() -> None:
    assert not bool(otsu_masks(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).any())


def test_masked_image_score_by_hand() -> None:
    maps = torch.tensor([[[[9.0, 1.0], [2.0, 4.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    brain = torch.tensor([[[[False, True], [True, True]]], [[[False, False], [False, False]]]])
    torch.testing.assert_close(masked_image_score(maps, brain, "max"), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(masked_image_score(maps, brain, "mean"), torch.tensor([7.0 / 3.0, 2.5]))


def test_strided_grid() -> None:
    assert strided_grid(10, 4) == [0, 4, 8, 10]
    assert strided_grid(8, 4) == [0, 4, 8]
    assert strided_grid(5, 1) == [0, 1, 2, 3, 4, 5]


def test_image_generators_depend_on_identity_only() -> None:
    batch = make_batch(b=2)
    a = [torch.randn(3, generator=g) for g in image_generators(batch, 0)]
    b = [torch.randn(3, generator=g) for g in image_generators(batch.select([1, 0]), 0)]
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], a[1])


def test_presets_load_and_p2_uses_pixel_labels() -> None:
    p1 = load_config(WollebConfig, CONFIGS / "wolleb_p1.yaml")
    assert (p1.noise_level, p1.classifier_scale, p1.step_stride) == (500, 100.0, 1)
    assert (p1.encoding, p1.sampler) == ("ddim", "ddim")
    assert (p1.map_error, p1.threshold, p1.median_size) == ("l1_sum", "otsu", 0)
    p2 = load_config(WollebConfig, CONFIGS / "wolleb_p2.yaml")
    assert (p2.noise_level, p2.classifier_scale, p2.encoding, p2.modalities) == (200, 1000.0, "q_sample", (0, 3))
    assert (p2.map_error, p2.threshold, p2.median_size, p2.tuned_with_pixel_labels) == (
        "squared_mean", "policy", 5, True)
    ddpm = load_config(WollebConfig, CONFIGS / "wolleb_ddpm.yaml")
    assert (ddpm.encoding, ddpm.sampler, ddpm.noise_level) == ("q_sample", "ddpm", 500)
    assert Wolleb.uses_pixel_labels is False
    assert Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, WollebConfig(noise_level=5)).uses_pixel_labels is False

    # the P2 preset, shortened to fit T = 50: squared error over (0, 3), 5x5 median filter, no native mask
    short = load_config(WollebConfig, CONFIGS / "wolleb_p2.yaml", ["noise_level=8", "classifier_scale=2"])
    method = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, short)
    assert method.uses_pixel_labels is True
    batch = make_batch()
    out = method.score(batch)
    assert out.pred_mask is None and out.nfe == 7
    error = (batch.image - out.extras["reconstruction"])[:, [0, 3]].pow(2).mean(1).numpy()
    expected = np.stack([ndimage.median_filter(e, size=5, mode="mirror") for e in error])[:, None]
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected, atol=1e-12)


def test_calibration_round_trip() -> None:
    config = WollebConfig(noise_level=8)
    method = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, config)
    assert method.fit([]) is method
    saved = json.loads(json.dumps(method.calibration()))
    assert saved["native_threshold"] == "otsu_per_image" and saved["uses_pixel_labels"] is False
    assert method.load_calibration(saved) is method
    other = Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, WollebConfig(noise_level=9))
    with pytest.raises(ValueError, match="config"):
        other.load_calibration(saved)
    with pytest.raises(ValueError, match="method"):
        method.load_calibration({**saved, "method": "ddib"})


def test_config_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="step_stride=1"):
        WollebConfig(encoding="q_sample", sampler="ddpm", step_stride=2)
    with pytest.raises(ValueError, match="encoding='q_sample'"):
        WollebConfig(sampler="ddpm")
    with pytest.raises(ValueError, match="model_label"):
        WollebConfig(model_label=7)
    with pytest.raises(ValueError, match="lower noise_level"):
        Wolleb(nonlinear_eps, LinearClassifier(), SCHEDULE, WollebConfig(noise_level=50))
    assert WollebConfig(model_label=NULL_LABEL).model_label == NULL_LABEL


def test_runs_with_the_real_tiny_networks() -> None:
    """Integration: an (untrained) ClassConditionalUNet and NoisyClassifier are valid parts (float32)."""
    from anomalydiff.models import ClassConditionalUNet, ClassifierConfig, NoisyClassifier, UNetConfig

    torch.manual_seed(0)
    tiny = dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=(8, 8),
                norm_num_groups=4, in_channels=4)
    unet = ClassConditionalUNet(UNetConfig(**tiny)).eval()
    classifier = NoisyClassifier(ClassifierConfig(**tiny, image_size=16)).eval()
    batch = make_batch(b=1)
    batch = Batch(batch.image.float(), batch.label, None, batch.brain, batch.subject_id, batch.slice_index)
    out = Wolleb(unet, classifier, SCHEDULE, WollebConfig(noise_level=3, classifier_scale=10.0)).score(batch)
    assert out.anomaly_map.shape == (1, 1, 16, 16) and out.anomaly_map.dtype == torch.float32
    assert bool(torch.isfinite(out.anomaly_map).all()) and out.nfe == 4
    assert out.extras["classifier_evaluations"] == 2
