"""AnoFPDM (spec C) on analytic eps models: references, hand examples, cost, streaming, determinism.

Independent references used here: a plain-formula forward loop written in this file (no anomalydiff.diffusion
calls), numpy's quantile, scipy.ndimage's median filter (mode "mirror" = torch "reflect"), skimage's
connected-component labelling, and hand-computed numbers.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import skimage.measure
import torch

from anomalydiff.config import load_config, to_dict
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.anofpdm import (
    AnoFPDM,
    AnoFPDMConfig,
    dynamic_threshold,
    fit_cos_threshold,
    quantile_level,
    select_guidance_w,
)
from anomalydiff.methods.base import CountingEpsModel, NotFittedError
from anomalydiff.records import Batch

T = 50  # schedule length of the tests
SIZE = 16
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"
# independent alpha_bar table (spec A.1: linear betas, cumulative product of 1 - beta)
ALPHA_BAR = torch.tensor(np.cumprod(1.0 - np.linspace(1e-4, 0.02, T)), dtype=torch.float64)


@pytest.fixture(scope="module")
def schedule():
    sched = make_schedule(ScheduleConfig(num_timesteps=T))
    assert torch.allclose(sched.alpha_bar, ALPHA_BAR, rtol=0, atol=1e-15)
    return sched


class GaussianClassEps:
    """Exact eps of data ``x0 ~ N(template, sigma_y^2 I)`` per label y (A.2 marginal, Gaussian posterior).

    ``eps(xt, t, y) = sqrt(1 - ab) (xt - sqrt(ab) template) / (ab sigma_y^2 + 1 - ab)``. A small healthy sigma
    makes the healthy guidance pull every pixel toward the template, in proportion to its deviation.
    With sigma = 0 for all labels and template = x0 the model is exact for that x0.
    """

    def __init__(self, template: torch.Tensor, sigma: dict[int, float]) -> None:
        self.template = template
        self.sigma = sigma

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ab = ALPHA_BAR.to(xt)[t].view(-1, 1, 1, 1)
        s2 = torch.tensor([self.sigma[int(v)] ** 2 for v in y], dtype=xt.dtype).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * self.template.to(xt)) / (ab * s2 + 1 - ab)


class SpikeAtZeroEps:
    """Exact for x0 = template, plus a large healthy-only offset at t = 0: the divergence peaks at step 0."""

    def __init__(self, template: torch.Tensor) -> None:
        self.base = GaussianClassEps(template, {HEALTHY: 0.0, UNHEALTHY: 0.0, NULL_LABEL: 0.0})
        self.pattern = torch.linspace(-1, 1, template.numel()).view_as(template)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spike = ((t == 0) & (y == HEALTHY)).to(xt.dtype).view(-1, 1, 1, 1)
        return self.base(xt, t, y) + 50.0 * spike * self.pattern.to(xt)


def make_template(channels: int) -> torch.Tensor:
    """A smooth brain-like image in [-1, 1]: background -1, a bright disc with channel-specific contrast."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 6.5**2).to(torch.float64)
    chans = [-1 + disc * (1.2 + 0.3 * torch.cos(xx / 3.0 + c) * torch.sin(yy / 4.0)) for c in range(channels)]
    return torch.stack(chans).to(torch.float64)


def make_batch(images: torch.Tensor, labels: list[int] | None = None, first_slice: int = 0) -> Batch:
    b = images.shape[0]
    return Batch(
        image=images,
        label=torch.tensor(labels if labels is not None else [-1] * b, dtype=torch.long),
        mask=None,
        brain=torch.ones(b, 1, SIZE, SIZE, dtype=torch.bool),
        subject_id=[f"sub{i % 3}" for i in range(b)],
        slice_index=torch.arange(first_slice, first_slice + b),
    )


def lesioned(template: torch.Tensor, rng: torch.Generator, healthy: bool, lesion: int = 7) -> torch.Tensor:
    """Template + noise, plus a bright ``lesion`` x ``lesion`` square at rows/cols from (4, 5) if unhealthy."""
    image = template + 0.02 * torch.randn(template.shape, generator=rng, dtype=torch.float64)
    if not healthy:
        image[:, 4 : 4 + lesion, 5 : 5 + lesion] += 0.7
    return image.clamp(-1, 1)


def calibrate(method: AnoFPDM, guidance_w: float, tau_cos: float = 0.99, d_star: list[float] | None = None):
    """Load a hand-made calibration (skips fit) for tests of score()."""
    num_mods = len(method.config.modalities) if method.config.modalities is not None else None
    stars = d_star if d_star is not None else [1e-3] * (num_mods or 2)
    return method.load_calibration(
        {
            "method": "anofpdm",
            "model": None,
            "config": to_dict(method.config),
            "guidance_w": guidance_w,
            "tau_cos": tau_cos,
            "d_max_star": stars,
        }
    )


def reference_forward(eps_model, x0, x_start, w, steps, ugp_mode):
    """Plain-formula DDIM forward loop (spec C.5 clean version, A.3, A.4, A.6), independent of the package."""
    xt, out = x_start, {"xt": [], "hgp": [], "ugp": []}
    labels = lambda v: torch.full((x0.shape[0],), v, dtype=torch.long)  # noqa: E731
    for i, k in enumerate(steps):
        ab = float(ALPHA_BAR[k])
        t = torch.full((x0.shape[0],), k, dtype=torch.long)
        e_h, e_n = eps_model(xt, t, labels(HEALTHY)), eps_model(xt, t, labels(NULL_LABEL))
        x0_of = lambda e: ((xt - (1 - ab) ** 0.5 * e) / ab**0.5).clamp(-1, 1)  # noqa: E731
        out["xt"].append(xt)
        out["hgp"].append(x0_of((1 + w) * e_h - w * e_n))
        out["ugp"].append(x0_of(e_h if ugp_mode == "cond" else e_n))
        if i + 1 < len(steps):
            x0_null = x0_of(e_n)
            eps_tilde = (xt - ab**0.5 * x0_null) / (1 - ab) ** 0.5
            ab_next = float(ALPHA_BAR[steps[i + 1]])
            xt = ab_next**0.5 * x0_null + (1 - ab_next) ** 0.5 * eps_tilde
    return {key: torch.stack(v, dim=1) for key, v in out.items()}


# ------------------------------------------------------------------------------------------ forward process
@pytest.mark.parametrize("ugp_mode", ["cond", "null"])
@pytest.mark.parametrize("stride", [1, 3])
def test_ddim_forward_matches_plain_formula_reference(schedule, ugp_mode, stride):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    x0 = torch.stack([lesioned(template, torch.Generator().manual_seed(i), i == 1) for i in range(2)])
    config = AnoFPDMConfig(forward_steps=40, step_stride=stride, ugp_mode=ugp_mode, keep_steps=True)
    method = calibrate(AnoFPDM(model, schedule, config), guidance_w=2.0)
    out = method.score(make_batch(x0))
    steps = list(range(0, 40, stride))
    assert out.extras["timesteps"].tolist() == steps
    # the start is one tiny q_sample at t=0 (alpha_bar[0] = 0.9999)
    x_start = out.extras["xt_steps"][:, 0]
    assert torch.allclose(x_start, x0, atol=0.05)
    ref = reference_forward(model, x0, x_start, 2.0, steps, ugp_mode)
    for key in ("xt", "hgp", "ugp"):
        assert torch.allclose(out.extras[f"{key}_steps"], ref[key], rtol=0, atol=1e-12), key
    hgp, ugp = ref["hgp"], ref["ugp"]
    # Eq. 12, 14, 16, 18 from the reference predictions
    divergence = ((hgp - ugp) ** 2).mean(dim=(3, 4))
    mse_h = ((hgp - x0[:, None]) ** 2).mean(dim=(2, 3, 4))
    mse_n = ((ugp - x0[:, None]) ** 2).mean(dim=(2, 3, 4))
    cos = (mse_h * mse_n).sum(1) / (mse_h.norm(dim=1) * mse_n.norm(dim=1))
    assert torch.allclose(out.extras["divergence"], divergence, atol=1e-14)
    assert torch.allclose(out.extras["mse_guided"], mse_h, atol=1e-14)
    assert torch.allclose(out.extras["mse_unguided"], mse_n, atol=1e-14)
    assert torch.allclose(out.extras["cos"], cos, atol=1e-12)
    assert torch.allclose(out.image_score, 1 - cos, atol=1e-12)
    assert out.nfe == 2 * len(steps)
    assert float(divergence.max()) > 1e-4  # the guidance does something in this example


def test_ddpm_states_are_fresh_marginal_samples(schedule):
    template = make_template(1)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    config = AnoFPDMConfig(forward_steps=T, encoding="ddpm", keep_steps=True, modalities=(0,))
    method = calibrate(AnoFPDM(model, schedule, config), guidance_w=2.0, d_star=[1e-3])
    x0 = template[None].clone()
    out = method.score(make_batch(x0))
    xt = out.extras["xt_steps"][0]  # [T, 1, H, W]
    ab = ALPHA_BAR.view(-1, 1, 1, 1)
    z = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise of each step (P2 Eq. 2)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    corr = torch.corrcoef(z.flatten(1))
    assert float(corr.fill_diagonal_(0).abs().max()) < 0.35  # independent draws per step, not one reused z


def test_w_zero_gives_the_conditional_prediction(schedule):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    x0 = lesioned(template, torch.Generator().manual_seed(3), healthy=False)[None]
    method = calibrate(AnoFPDM(model, schedule, AnoFPDMConfig(forward_steps=30, keep_steps=True)), guidance_w=0.0)
    out = method.score(make_batch(x0))
    xt = out.extras["xt_steps"]
    for i, k in enumerate(out.extras["timesteps"].tolist()):
        ab = float(ALPHA_BAR[k])
        e_h = model(xt[:, i], torch.tensor([k]), torch.tensor([HEALTHY]))
        expected = ((xt[:, i] - (1 - ab) ** 0.5 * e_h) / ab**0.5).clamp(-1, 1)
        assert torch.allclose(out.extras["hgp_steps"][:, i], expected, atol=1e-13)
    # code-UGP is the w = 0 conditional prediction, so the divergence vanishes exactly
    assert torch.equal(out.extras["hgp_steps"], out.extras["ugp_steps"])
    assert float(out.extras["divergence"].abs().max()) == 0.0


def test_label_blind_model_has_no_divergence_and_the_map_is_the_unguided_error(schedule):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.3, UNHEALTHY: 0.3, NULL_LABEL: 0.3})
    x0 = lesioned(template, torch.Generator().manual_seed(4), healthy=False)[None]
    for ugp_mode in ("cond", "null"):
        config = AnoFPDMConfig(forward_steps=30, keep_steps=True, ugp_mode=ugp_mode)
        out = calibrate(AnoFPDM(model, schedule, config), guidance_w=2.0).score(make_batch(x0))
        hgp, ugp = out.extras["hgp_steps"], out.extras["ugp_steps"]
        assert torch.allclose(hgp, ugp, atol=1e-12)  # HGP = UGP
        assert float(out.extras["divergence"].max()) < 1e-24  # D_t = 0 (up to rounding)
        assert torch.allclose(out.extras["mse_guided"], out.extras["mse_unguided"], rtol=1e-10)
        assert torch.allclose(out.extras["cos"], torch.ones(1, dtype=torch.float64), atol=1e-12)
        # the AAM is the mean unguided error over [0, t_e) (or the first one if t_e = 0)
        unguided_error = (ugp - x0[:, None]) ** 2  # [1, T'', M, H, W]
        for m in range(2):
            end = int(out.extras["end_step"][0, m])
            expected = unguided_error[0, :end, m].mean(0) if end > 0 else unguided_error[0, 0, m]
            assert torch.allclose(out.extras["aam"][0, m], expected, atol=1e-12)


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_exact_model_of_a_healthy_image_gives_a_zero_map(schedule, encoding):
    x0 = make_template(2)[None]
    model = GaussianClassEps(x0[0], {HEALTHY: 0.0, UNHEALTHY: 0.0, NULL_LABEL: 0.0})
    config = AnoFPDMConfig(forward_steps=T, encoding=encoding)
    out = calibrate(AnoFPDM(model, schedule, config), guidance_w=2.0).score(make_batch(x0))
    assert float(out.anomaly_map.abs().max()) < 1e-20
    assert float(out.extras["aam"].abs().max()) < 1e-20
    assert float(out.extras["mse_guided"].max()) < 1e-20
    assert torch.allclose(out.extras["hgp_at_end"], x0, atol=1e-10)


def test_streamed_aam_single_sam_and_end_step_equal_the_explicit_computation(schedule):
    template = make_template(4)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    gen = torch.Generator().manual_seed(5)
    x0 = torch.stack([lesioned(template, gen, healthy=h) for h in (False, True, False)])
    for single_sam in (False, True):
        config = AnoFPDMConfig(forward_steps=45, step_stride=2, modalities=(0, 3), keep_steps=True,
                               single_sam=single_sam)
        out = calibrate(AnoFPDM(model, schedule, config), guidance_w=1.5, d_star=[0.01, 0.02]).score(make_batch(x0))
        sam = (out.extras["hgp_steps"] - x0[:, None][:, :, [0, 3]]) ** 2  # [B, T'', M, H, W]
        index = out.extras["divergence"].argmax(dim=1)  # [B, M], first maximum (Eq. 21)
        assert torch.equal(out.extras["end_step"], out.extras["timesteps"][index])
        assert torch.allclose(out.extras["d_max"], out.extras["divergence"].max(dim=1).values)
        for b in range(3):
            for m in range(2):
                k = int(index[b, m])
                assert k > 0
                expected = sam[b, k - 1, m] if single_sam else sam[b, :k, m].mean(0)  # C.9 / Eq. 20 [0, k*)
                assert torch.allclose(out.extras["aam"][b, m], expected, atol=1e-13)
                assert torch.equal(out.extras["hgp_at_end"][b, m], out.extras["hgp_steps"][b, k, m])


@pytest.mark.parametrize("single_sam", [False, True])
def test_no_nan_when_the_end_step_is_zero(schedule, single_sam):
    template = make_template(2)
    x0 = template[None].clone()
    config = AnoFPDMConfig(forward_steps=20, keep_steps=True, single_sam=single_sam)
    out = calibrate(AnoFPDM(SpikeAtZeroEps(template), schedule, config), guidance_w=2.0).score(make_batch(x0))
    assert out.extras["end_step"].tolist() == [[0, 0]]
    for value in (out.anomaly_map, out.extras["aam"], out.extras["threshold"], out.image_score):
        assert bool(torch.isfinite(value).all())
    first_sam = (out.extras["hgp_steps"][:, 0] - x0) ** 2
    assert torch.allclose(out.extras["aam"], first_sam)  # the documented fallback: the first SAM
    assert float(first_sam.max()) > 0.1


# ------------------------------------------------------------------------------------------ Algorithm 1
def test_quantile_level_hand_values():
    ratio = torch.tensor([0.0, 0.29, 0.5, 1.0, 1.7, 0.57], dtype=torch.float32)
    q = quantile_level(ratio)
    # j = trunc(round(r, 2) * 100): 0, 28 (0.29*100 = 28.999..., truncated), 50, 100, 100 (clipped), 56
    expected = [0.98, 0.98 - 0.28 * 0.08, 0.94, 0.90, 0.90, 0.98 - 0.56 * 0.08]
    assert torch.allclose(q, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_algorithm1_against_a_hand_computed_example():
    size, rng = 32, np.random.default_rng(0)
    aam0 = rng.random((size, size)) ** 2 * 0.3
    aam0[4:12, 6:14] = 0.5 + 0.01 * np.arange(8)[None, :]  # lesion block, 64 px
    aam0[18:25:3, 1:30:3] = 0.9  # 30 isolated salt pixels: in the unfiltered top 4.24 %, removed by the median
    aam1 = rng.random((size, size)) * 0.2
    aam1[4:13, 5:14] = 0.4  # 81 px
    aam = torch.tensor(np.stack([aam0, aam1])[None])  # [1, 2, H, W]
    d_star = torch.tensor([0.05, 0.02], dtype=torch.float64)
    d_max = torch.tensor([[0.0145, 0.04]], dtype=torch.float64)  # ratios 0.29 -> j = 28, 2.0 -> clipped to 1
    result = dynamic_threshold(aam, d_max, d_star, (0.90, 0.98), 101, median_size=5, min_component=40)
    q_hand = [0.9576, 0.90]  # 0.98 - 0.28 * 0.08 and q_l
    assert np.allclose(result["quantile"].numpy()[0], q_hand, atol=1e-12)
    # tau_m on the UNFILTERED per-modality maps (numpy linear quantile), averaged over modalities
    tau_m = [np.quantile(aam0.ravel(), q_hand[0]), np.quantile(aam1.ravel(), q_hand[1])]
    tau = float(np.mean(tau_m))
    assert result["threshold"].item() == pytest.approx(tau, abs=1e-12)
    mean_map = (aam0 + aam1) / 2
    filtered = scipy.ndimage.median_filter(mean_map, size=5, mode="mirror")
    # the example discriminates: the quantile of the filtered maps, or of the averaged map, is another threshold
    filtered_m = [scipy.ndimage.median_filter(a, size=5, mode="mirror") for a in (aam0, aam1)]
    assert abs(np.mean([np.quantile(f.ravel(), q) for f, q in zip(filtered_m, q_hand)]) - tau) > 0.02
    assert abs(np.quantile(mean_map.ravel(), np.mean(q_hand)) - tau) > 0.02
    assert np.allclose(result["anomaly_map"].numpy()[0, 0], filtered, atol=1e-12)
    raw = (filtered >= tau) & (filtered > 0)
    labels = skimage.measure.label(raw, connectivity=2)
    keep = np.isin(labels, [r.label for r in skimage.measure.regionprops(labels) if r.area > 40])
    assert np.array_equal(result["mask"].numpy()[0, 0], keep)
    assert keep[4:12, 6:14].mean() > 0.7 and not keep[16:, :].any()  # the lesion is found, the salt is not


# ------------------------------------------------------------------------------------------ C.6 selection
def test_tau_cos_against_a_hand_example():
    healthy = np.linspace(0.95, 1.0, 11)  # spacing 0.005
    unhealthy = np.array([0.90, 0.951, 0.99])
    scores = np.concatenate([healthy, unhealthy])
    labels = np.array([HEALTHY] * 11 + [UNHEALTHY] * 3)
    tau, accuracy, n_errors = fit_cos_threshold(scores, labels, (0.005, 0.095, 100))
    # tau_q = 0.95 + 10 q 0.005 for q < 0.1. Healthy 0.95 is always below tau (1 error); unhealthy 0.951 is
    # above tau while q < 0.02 (then 3 errors) and 0.99 always is (1 error). The first q >= 0.02 on
    # linspace(0.005, 0.095, 100) is index 17: q = 0.005 + 17 * 0.09 / 99.
    q17 = 0.005 + 17 * 0.09 / 99
    assert tau == pytest.approx(0.95 + 10 * q17 * 0.005, abs=1e-12)
    assert n_errors == 2
    assert accuracy == pytest.approx(1 - 2 / 14)


def test_guidance_selection_against_a_hand_table():
    ws = [1.0, 1.2, 1.5, 1.8, 2.0, 3.0, 5.0]
    acc = [0.90, 0.93, 0.95, 0.945, 0.942, 0.90, 0.941]  # peak 0.95 -> 99 % = 0.9405
    assert select_guidance_w(ws, acc, 0.99, "global") == 5.0  # largest w with acc >= 0.9405
    assert select_guidance_w(ws, acc, 0.99, "incremental") == 2.0  # the scan stops at w = 3
    assert select_guidance_w(ws, acc, 1.0, "global") == 1.5
    assert select_guidance_w([1.0], [0.5], 0.99) == 1.0


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_batch_of_two_equals_two_batches_of_one(schedule, encoding):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    gen = torch.Generator().manual_seed(6)
    x0 = torch.stack([lesioned(template, gen, healthy=h) for h in (False, True)])
    method = calibrate(AnoFPDM(model, schedule, AnoFPDMConfig(forward_steps=30, encoding=encoding)), 2.0, 0.999)
    both = method.score(make_batch(x0))
    singles = [method.score(make_batch(x0).select([i])) for i in range(2)]
    for key in ("anomaly_map", "image_score", "pred_mask", "pred_label"):
        joined = torch.cat([getattr(s, key) for s in singles])
        assert torch.allclose(getattr(both, key).double(), joined.double(), atol=1e-13), key
    for key in ("divergence", "aam", "end_step", "mask_ungated"):
        joined = torch.cat([s.extras[key] for s in singles])
        assert torch.allclose(both.extras[key].double(), joined.double(), atol=1e-13), key


def test_same_seed_same_output_and_the_seed_matters(schedule):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    x0 = lesioned(template, torch.Generator().manual_seed(7), healthy=False)[None]
    outs = []
    for seed in (0, 0, 1):
        config = AnoFPDMConfig(forward_steps=30, encoding="ddpm", seed=seed)
        outs.append(calibrate(AnoFPDM(model, schedule, config), 2.0).score(make_batch(x0)))
    assert torch.equal(outs[0].anomaly_map, outs[1].anomaly_map)
    assert torch.equal(outs[0].extras["divergence"], outs[1].extras["divergence"])
    assert not torch.allclose(outs[0].extras["divergence"], outs[2].extras["divergence"])


# ------------------------------------------------------------------------------------------ cost & memory
def test_two_evaluations_per_step_in_one_batched_call(schedule):
    template = make_template(2)
    inner = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    calls: list[tuple[int, list[int], list[int]]] = []

    def recording(xt, t, y):
        calls.append((xt.shape[0], t.tolist(), y.tolist()))
        return inner(xt, t, y)

    counting = CountingEpsModel(recording)
    x0 = torch.stack([lesioned(template, torch.Generator().manual_seed(i), i == 0) for i in range(3)])
    for encoding in ("ddim", "ddpm"):
        calls.clear()
        counting.reset()
        config = AnoFPDMConfig(forward_steps=40, step_stride=3, encoding=encoding)
        out = calibrate(AnoFPDM(counting, schedule, config), 2.0).score(make_batch(x0))
        steps = list(range(0, 40, 3))
        assert len(calls) == len(steps)  # one batched call per evaluated step
        assert counting.image_evaluations == 2 * 3 * len(steps)  # exactly 2 NFE per step per image
        assert out.nfe == 2 * len(steps)
        for (n, t, y), k in zip(calls, steps):
            assert n == 6 and t == [k] * 6
            assert y == [HEALTHY] * 3 + [NULL_LABEL] * 3  # conditional and null together


def _map_bytes(height: int, width: int) -> int:
    """Bytes held by live tensors whose last two dims are an image (the per-step maps we must not hoard)."""
    gc.collect()
    return sum(
        obj.numel() * obj.element_size()
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor) and obj.ndim >= 2 and tuple(obj.shape[-2:]) == (height, width)
    )


def test_memory_does_not_grow_with_the_number_of_steps_unless_keep_steps(schedule):
    template = make_template(2)
    inner = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    x0 = torch.stack([lesioned(template, torch.Generator().manual_seed(i), i == 0) for i in range(2)])

    def growth(forward_steps: int, keep_steps: bool) -> int:
        peak = {"bytes": 0}

        def census(xt, t, y):  # measured inside the last network call, when the loop state is largest
            if int(t[0]) == forward_steps - 1:
                peak["bytes"] = _map_bytes(SIZE, SIZE)
            return inner(xt, t, y)

        config = AnoFPDMConfig(forward_steps=forward_steps, keep_steps=keep_steps)
        method = calibrate(AnoFPDM(census, schedule, config), 2.0)
        batch = make_batch(x0)
        before = _map_bytes(SIZE, SIZE)
        method.score(batch)
        return peak["bytes"] - before

    assert growth(6, False) == growth(36, False) > 0
    assert growth(36, True) > growth(6, True) + 30 * 2 * 2 * SIZE * SIZE * 8  # kept maps do grow


# ------------------------------------------------------------------------------------------ fit
def test_fit_grid_from_one_pass_equals_separate_passes_per_w(schedule):
    template = make_template(4)
    model = GaussianClassEps(template, {HEALTHY: 0.1, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    gen = torch.Generator().manual_seed(8)
    x0 = torch.stack([lesioned(template, gen, healthy=h) for h in (False, True, False)])
    for encoding, ugp_mode in (("ddim", "cond"), ("ddpm", "null")):
        config = AnoFPDMConfig(forward_steps=30, encoding=encoding, ugp_mode=ugp_mode, modalities=(0, 3))
        method = AnoFPDM(model, schedule, config)
        ws = [0.0, 1.0, 2.0, 7.5]
        grid = method.guidance_grid_statistics(make_batch(x0), ws)
        for i, w in enumerate(ws):
            single = calibrate(AnoFPDM(model, schedule, config), w, d_star=[0.01, 0.01]).score(make_batch(x0))
            assert torch.allclose(grid["cos"][i], single.extras["cos"], atol=1e-12)
            assert torch.allclose(grid["d_max"][i], single.extras["d_max"], atol=1e-14)
            assert torch.allclose(grid["divergence"][i], single.extras["divergence"], atol=1e-14)
            assert torch.allclose(grid["mse_guided"][i], single.extras["mse_guided"], atol=1e-14)
            assert torch.allclose(grid["mse_unguided"], single.extras["mse_unguided"], atol=1e-14)


def test_fit_calibration_round_trip_and_label_free_scoring(schedule, tmp_path):
    template = make_template(2)
    model = GaussianClassEps(template, {HEALTHY: 0.05, UNHEALTHY: 0.6, NULL_LABEL: 0.6})
    gen = torch.Generator().manual_seed(9)
    healthy = [True] * 6 + [False] * 4
    images = torch.stack([lesioned(template, gen, healthy=h, lesion=5) for h in healthy])  # 25 px lesions
    labels = [HEALTHY if h else UNHEALTHY for h in healthy]
    val = [make_batch(images[:5], labels[:5]), make_batch(images[5:], labels[5:], first_slice=5)]
    # 16x16 images: the per-image quantile keeps at most ~26 px, so the CC limit is lowered from 40 to 10
    config = AnoFPDMConfig(forward_steps=30, w_grid=(0.5, 1.0, 2.0), min_component=10)
    method = AnoFPDM(model, schedule, config, model_id="analytic-gaussian")
    with pytest.raises(NotFittedError):
        method.score(val[0])
    method.fit(val)
    assert set(method.accuracy_by_w_) == {0.5, 1.0, 2.0}
    assert method.guidance_w_ == select_guidance_w([0.5, 1.0, 2.0], [method.accuracy_by_w_[w] for w in (0.5, 1, 2)])
    # the fitted values equal what score() computes at the chosen w (C.6, C.8)
    outs = [method.score(b) for b in val]
    cos = torch.cat([o.extras["cos"] for o in outs])
    d_max = torch.cat([o.extras["d_max"] for o in outs])
    tau, accuracy, _ = fit_cos_threshold(cos, torch.tensor(labels))
    assert method.tau_cos_ == pytest.approx(tau, abs=1e-12)
    assert method.accuracy_by_w_[method.guidance_w_] == pytest.approx(accuracy)
    unhealthy = torch.tensor(labels) == UNHEALTHY
    assert np.allclose(method.d_max_star_, d_max[unhealthy].max(0).values.numpy(), atol=1e-14)
    # the lesion drives the divergence: unhealthy images score higher and their map peaks in the lesion
    assert float(d_max[unhealthy].min()) > float(d_max[~unhealthy].max())
    lesion_out = outs[1]
    peak = lesion_out.anomaly_map[-1, 0].argmax()
    assert 4 <= int(peak) // SIZE < 9 and 5 <= int(peak) % SIZE < 10
    found = lesion_out.extras["mask_ungated"][-1, 0]
    assert int(found[4:9, 5:10].sum()) >= 10 and int(found.sum()) == int(found[4:9, 5:10].sum())
    gate = lesion_out.pred_label.bool()[:, None, None, None]
    assert torch.equal(lesion_out.pred_mask, lesion_out.extras["mask_ungated"] & gate)  # mixed-setup mask
    # JSON round trip; scoring needs no labels and no masks
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(method.calibration()))
    restored = AnoFPDM(model, schedule, config, model_id="analytic-gaussian").load_calibration(
        json.loads(path.read_text())
    )
    unlabelled = make_batch(images[5:], None, first_slice=5)
    again = restored.score(unlabelled)
    assert torch.equal(again.anomaly_map, outs[1].anomaly_map)
    assert torch.equal(again.pred_mask, outs[1].pred_mask)
    figures = method.with_config(keep_steps=True).score(unlabelled)  # same calibration, per-step maps kept
    assert torch.equal(figures.anomaly_map, outs[1].anomaly_map) and figures.extras["hgp_steps"].shape[1] == 30
    with pytest.raises(ValueError, match="forward_steps"):
        AnoFPDM(model, schedule, AnoFPDMConfig(forward_steps=20)).load_calibration(method.calibration())
    with pytest.raises(ValueError, match="model"):
        AnoFPDM(model, schedule, config, model_id="other").load_calibration(method.calibration())
    with pytest.raises(ValueError, match="image labels"):
        AnoFPDM(model, schedule, config).fit([unlabelled])


@pytest.mark.parametrize(
    "name, encoding, single_sam",
    [("anofpdm_ddim", "ddim", False), ("anofpdm_ddpm", "ddpm", False),
     ("anofpdm_ddim_te", "ddim", True), ("anofpdm_ddpm_te", "ddpm", True)],
)
def test_method_config_files_load(name, encoding, single_sam):
    config = load_config(AnoFPDMConfig, CONFIG_DIR / f"{name}.yaml")
    assert (config.encoding, config.single_sam) == (encoding, single_sam)
    assert config.forward_steps == 600 and config.ugp_mode == "cond" and config.modalities == (0, 3)
