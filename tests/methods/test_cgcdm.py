"""Tests of CG-CDM (Hu et al. 2023, spec D.4) with an analytic embedding model and a linear classifier, T = 50.

The reference loop is written from the spec equations (A.2, A.3, A.4, A.7, D.4) with a numpy schedule and a
hand-differentiated classifier; it shares only the per-image q_sample noise draw with the method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from anomalydiff.config import load_config
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.cgcdm import CGCDM, CGCDMConfig, keep_largest_component
from anomalydiff.methods.common import gaussian_per_image, image_generators
from anomalydiff.records import Batch

T = 50
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "methods"
ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # spec A.1, independent of anomalydiff
SCHEDULE = make_schedule(ScheduleConfig(num_timesteps=T))
C, SIZE = 2, 12


def ab(t: int) -> float:
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


def make_batch(b: int = 2) -> Batch:
    gen = torch.Generator().manual_seed(3)
    return Batch(
        image=torch.rand(b, C, SIZE, SIZE, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
        label=torch.full((b,), UNHEALTHY),
        mask=None,
        brain=torch.ones(b, 1, SIZE, SIZE, dtype=torch.bool),
        subject_id=[f"s{i}" for i in range(b)],
        slice_index=torch.arange(b) + 10,
    )


class EmbeddingModel:
    """Analytic class-embedding model: eps = 0.6 tanh(1.4 x) + (e . v) * pattern * (1 + x) + 0.1 t/T x^2.

    ``class_embedding`` is a table lookup with the null row zero; ``__call__`` = forward_embedding(class_embedding(y)).
    """

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.table = torch.tensor([[0.3, -0.2, 0.5], [-0.4, 0.6, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
        self.direction = torch.tensor([1.0, 0.5, -0.8], dtype=torch.float64)
        self.pattern = torch.rand(C, SIZE, SIZE, generator=gen, dtype=torch.float64)
        self.calls: list[tuple[int, int]] = []

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        return self.table[y]

    def forward_embedding(self, x_t: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        assert len(set(t.tolist())) == 1
        self.calls.append((int(t[0]), int(x_t.shape[0])))
        coupling = (class_emb @ self.direction).view(-1, 1, 1, 1)
        tt = t.to(x_t.dtype).view(-1, 1, 1, 1) / T
        return 0.6 * torch.tanh(1.4 * x_t) + coupling * self.pattern * (1 + x_t) + 0.1 * tt * x_t.pow(2)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding(x_t, t, self.class_embedding(y))


class LinearClassifier:
    """logits_k = (1 + t/T) <W_k, x>, with the hand gradient of log softmax."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(5)
        self.weights = torch.randn(2, C, SIZE, SIZE, generator=gen, dtype=torch.float64) * 0.05
        self.images_seen = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.images_seen += int(x_t.shape[0])
        return (1 + t.to(x_t.dtype).view(-1, 1) / T) * torch.einsum("bchw,kchw->bk", x_t, self.weights)

    def hand_grad(self, x_t: torch.Tensor, t: int, y: int) -> torch.Tensor:
        scale = 1 + t / T
        p = torch.softmax(scale * torch.einsum("bchw,kchw->bk", x_t, self.weights), dim=1)
        return scale * (self.weights[y].unsqueeze(0) - torch.einsum("bk,kchw->bchw", p, self.weights))


def reference_delta(batch: Batch, model: EmbeddingModel, clf: LinearClassifier, cfg: CGCDMConfig) -> torch.Tensor:
    """Spec D.4 steps 1-3 written out: two guided DDIM chains, Delta = sum of state differences."""
    x0 = batch.image
    b = x0.shape[0]
    noise = gaussian_per_image(x0, image_generators(batch, cfg.seed))
    x_t0 = ab(cfg.noise_level) ** 0.5 * x0 + (1 - ab(cfg.noise_level)) ** 0.5 * noise
    e_u = model.table[UNHEALTHY].expand(b, -1)
    e_h = model.table[HEALTHY].expand(b, -1)
    embeddings = {"A": e_u, "B": cfg.alpha * e_u + (1 - cfg.alpha) * e_h}
    states = {"A": x_t0.clone(), "B": x_t0.clone()}
    delta = torch.zeros_like(x0)
    for t in range(cfg.noise_level - 1, cfg.noise_level - 1 - cfg.num_steps, -1):
        for chain in ("A", "B"):
            x = states[chain]
            e = model.forward_embedding(x, torch.full((b,), t), embeddings[chain])
            x0h = ((x - (1 - ab(t)) ** 0.5 * e) / ab(t) ** 0.5).clamp(-1, 1)  # A.3
            e = (x - ab(t) ** 0.5 * x0h) / (1 - ab(t)) ** 0.5
            e = e - cfg.classifier_scale * (1 - ab(t)) ** 0.5 * clf.hand_grad(x, t, cfg.guidance_label)  # A.7
            x0h = (x - (1 - ab(t)) ** 0.5 * e) / ab(t) ** 0.5
            states[chain] = ab(t - 1) ** 0.5 * x0h + (1 - ab(t - 1)) ** 0.5 * e  # A.4
        delta = delta + states["A"] - states["B"]
    return delta


def test_matches_reference_loop() -> None:
    batch = make_batch()
    cfg = CGCDMConfig(noise_level=20, num_steps=5, classifier_scale=3.0, alpha=0.8, seed=4)
    out = CGCDM(EmbeddingModel(), LinearClassifier(), SCHEDULE, cfg).score(batch)
    expected = reference_delta(batch, EmbeddingModel(), LinearClassifier(), cfg)
    assert float(expected.abs().max()) > 1e-4
    torch.testing.assert_close(out.extras["difference"], expected, atol=1e-12, rtol=0)
    # map = minmax(|sum_c Delta_c|) per image; Otsu per image (spec D.4 step 4)
    magnitude = expected.sum(1).abs().numpy()
    for b in range(2):
        m = magnitude[b]
        normalised = (m - m.min()) / (m.max() - m.min())
        np.testing.assert_allclose(out.anomaly_map[b, 0].numpy(), normalised, atol=1e-12)
        np.testing.assert_array_equal(out.pred_mask[b, 0].numpy(), normalised > threshold_otsu(normalised))
        assert float(out.image_score[b]) == pytest.approx(float(m.max()))


def test_equal_embeddings_give_zero_map_and_empty_mask() -> None:
    batch = make_batch()
    out = CGCDM(EmbeddingModel(), LinearClassifier(), SCHEDULE, CGCDMConfig(noise_level=20, num_steps=4,
                alpha=1.0)).score(batch)
    assert float(out.extras["difference"].abs().max()) < 1e-12
    assert float(out.anomaly_map.abs().max()) == 0.0 and not bool(out.pred_mask.any())


def test_cost_two_chains_per_step_in_one_call() -> None:
    batch = make_batch(b=3)
    model, clf = EmbeddingModel(), LinearClassifier()
    out = CGCDM(model, clf, SCHEDULE, CGCDMConfig(noise_level=40, num_steps=10)).score(batch)
    assert model.calls == [(t, 6) for t in range(39, 29, -1)]  # t0-1 .. t0-10, chains A and B batched
    assert out.nfe == 20  # 2 chains x 10 steps
    assert clf.images_seen == 3 * 20 and out.extras["classifier_evaluations"] == 20


def test_batch_of_two_equals_two_batches_of_one_and_seed() -> None:
    batch = make_batch()
    method = CGCDM(EmbeddingModel(), LinearClassifier(), SCHEDULE, CGCDMConfig(noise_level=20, num_steps=3, seed=8))
    both = method.score(batch)
    for b in range(2):
        one = method.score(batch.select([b]))
        torch.testing.assert_close(one.extras["difference"][0], both.extras["difference"][b], atol=1e-12, rtol=0)
        # min-max normalisation divides by a small range: allow round-off of the batched matmul
        torch.testing.assert_close(one.anomaly_map[0], both.anomaly_map[b], atol=1e-9, rtol=0)
    torch.testing.assert_close(method.score(batch).anomaly_map, both.anomaly_map, atol=0, rtol=0)
    other = CGCDM(EmbeddingModel(), LinearClassifier(), SCHEDULE, CGCDMConfig(noise_level=20, num_steps=3, seed=9))
    assert float((other.score(batch).extras["difference"] - both.extras["difference"]).abs().max()) > 1e-6


def test_keep_largest_component_by_hand() -> None:
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0, 0] = True  # 1 pixel
    mask[0, 0, 3:5, 3:6] = True  # 6 pixels
    mask[0, 0, 2, 2] = True  # touches the 6-pixel blob diagonally: 8-connected -> 7 pixels
    out = keep_largest_component(mask)
    expected = mask[0, 0].clone()
    expected[0, 0] = False
    assert torch.equal(out[0, 0], expected)
    assert not bool(out[1].any())


def test_plain_eps_model_is_refused_and_presets_load() -> None:
    with pytest.raises(TypeError, match="forward_embedding"):
        CGCDM(lambda x, t, y: x, LinearClassifier(), SCHEDULE, CGCDMConfig(noise_level=20, num_steps=2))
    preset = load_config(CGCDMConfig, CONFIGS / "cgcdm.yaml")
    assert (preset.noise_level, preset.num_steps, preset.classifier_scale, preset.alpha) == (400, 10, 10.0, 0.95)
    assert (preset.chain_label, preset.reference_label) == (UNHEALTHY, HEALTHY)
    assert CGCDM.uses_pixel_labels is False
    method = CGCDM(EmbeddingModel(), LinearClassifier(), SCHEDULE, CGCDMConfig(noise_level=20, num_steps=2))
    saved = json.loads(json.dumps(method.calibration()))
    assert saved["native_threshold"] == "otsu_per_image"
    assert method.fit([]).load_calibration(saved) is method
    with pytest.raises(ValueError, match="below num_steps"):
        CGCDMConfig(noise_level=3, num_steps=5)
    assert EmbeddingModel().class_embedding(torch.tensor([NULL_LABEL])).abs().sum() == 0


def test_class_conditional_unet_provides_the_embedding_interface() -> None:
    from anomalydiff.methods.cgcdm import EmbeddingEpsModel
    from anomalydiff.models import ClassConditionalUNet, UNetConfig

    unet = ClassConditionalUNet(UNetConfig(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                                           num_head_channels=(8, 8), norm_num_groups=4, in_channels=2))
    assert isinstance(unet, EmbeddingEpsModel)
    assert isinstance(EmbeddingModel(), EmbeddingEpsModel)
