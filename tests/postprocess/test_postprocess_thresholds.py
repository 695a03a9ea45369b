"""Threshold policies: Otsu vs skimage and hand cases, healthy-quantile FPR, oracle Dice grid search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.postprocess import (
    FixedThreshold,
    HealthyQuantileThreshold,
    OracleDiceThreshold,
    OtsuThreshold,
    PolicyNotFittedError,
    ThresholdPolicy,
    median_filter,
    otsu_threshold,
    segment,
)


def test_otsu_hand_case_and_skimage() -> None:
    two_level = np.full((10, 10), 0.2)
    two_level[:4] = 0.9  # 40 % bright pixels
    tau = otsu_threshold(torch.from_numpy(two_level)[None])
    assert 0.2 <= tau < 0.9
    np.testing.assert_array_equal(OtsuThreshold().predict(two_level[None, None])[0, 0], two_level > 0.5)
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.7, 0.1, 324)]).reshape(32, 32)
    assert otsu_threshold(bimodal) == pytest.approx(threshold_otsu(bimodal), abs=0)
    assert not OtsuThreshold().predict(np.full((1, 1, 4, 4), 0.3)).any()  # constant map: nothing above


def test_otsu_policy_is_per_image_and_label_free() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((1, 1, 16, 16)) ** 3
    maps = torch.from_numpy(np.concatenate([image, 10 * image]))  # same map at two scales
    policy = OtsuThreshold().fit(maps, None)
    assert isinstance(policy, ThresholdPolicy) and policy.uses_pixel_labels is False and policy.threshold_ is None
    taus = policy.thresholds(maps)
    assert taus[1] == pytest.approx(10 * taus[0], rel=1e-9)
    masks = policy.predict(maps)
    assert isinstance(masks, torch.Tensor) and masks.dtype == torch.bool
    torch.testing.assert_close(masks[0], masks[1])


def _healthy_maps(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    maps = median_filter(rng.exponential(0.1, size=(count, 1, 32, 32)))
    brain = np.zeros(maps.shape, dtype=bool)
    brain[:, :, 4:28, 6:26] = True
    maps[~brain] = 50.0  # bright background must not move a brain-pixel quantile
    return maps, brain


def test_healthy_quantile_fpr_holds_on_held_out_healthy_maps() -> None:
    rng = np.random.default_rng(2)
    maps, brain = _healthy_maps(rng, 60)
    labels = np.full(60, HEALTHY)
    labels[:10] = UNHEALTHY
    maps[:10] += 5.0  # unhealthy validation slices must be ignored (label-free: image labels only)
    policy = HealthyQuantileThreshold(fpr=0.01).fit(maps, brain, labels=labels)
    assert policy.uses_pixel_labels is False and policy.n_pixels_ == 50 * 24 * 20
    # same threshold when the unhealthy slices are dropped: they did not count
    alone = HealthyQuantileThreshold(fpr=0.01).fit(maps[10:], brain[10:], labels=labels[10:])
    assert alone.threshold_ == policy.threshold_
    held_out, held_brain = _healthy_maps(rng, 60)
    fpr = float(policy.predict(held_out)[held_brain].mean())
    assert 0.007 <= fpr <= 0.013, fpr
    policy_5 = HealthyQuantileThreshold(fpr=0.05).fit(maps, brain, labels=labels)
    fpr_5 = float(policy_5.predict(held_out)[held_brain].mean())
    assert 0.043 <= fpr_5 <= 0.057, fpr_5
    with pytest.raises(ValueError, match="labels"):
        HealthyQuantileThreshold().fit(maps, brain)
    with pytest.raises(PolicyNotFittedError, match="call fit"):
        HealthyQuantileThreshold().predict(maps)


def _oracle_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One lesion slice and one healthy slice whose best threshold is known (0.36, Dice 1).

    Lesion slice: noise < 0.25, a 64-px lesion at 0.455, a 30-px spot at 0.6 (removed by the CC filter).
    Healthy slice: noise < 0.25 and a 56-px region at 0.355 that must stay below the threshold.
    """
    rng = np.random.default_rng(3)
    maps = rng.uniform(0.0, 0.25, size=(2, 1, 32, 32))
    gt = np.zeros(maps.shape, dtype=bool)
    gt[0, 0, 4:12, 4:12] = True
    maps[0][gt[0]] = 0.455
    maps[0, 0, 20:25, 20:26] = 0.6
    maps[1, 0, 10:17, 10:18] = 0.355
    return maps, gt, np.array([UNHEALTHY, HEALTHY])


def test_oracle_finds_the_known_best_threshold() -> None:
    maps, gt, labels = _oracle_example()
    policy = OracleDiceThreshold().fit(maps, None, masks=gt)
    assert policy.uses_pixel_labels is True
    assert policy.threshold_ == pytest.approx(0.36)  # smallest grid value above the healthy region's 0.355
    assert policy.best_dice_ == pytest.approx(1.0)
    np.testing.assert_array_equal(segment(maps, policy), gt)
    assert not np.array_equal(policy.predict(maps), gt)  # the spot is only gone after the CC filter
    # the CC filter inside the search matters: without it the spot stays (lesion slice Dice 2*64/(64+94))
    no_cc = OracleDiceThreshold(max_component_size=0).fit(maps, None, masks=gt)
    assert no_cc.best_dice_ == pytest.approx((128 / 158 + 1) / 2, abs=1e-6)
    # unhealthy-only tuning ignores the healthy slice, so the first threshold above the noise already wins
    unhealthy_only = OracleDiceThreshold(setup="unhealthy").fit(maps, None, masks=gt, labels=labels)
    assert unhealthy_only.threshold_ == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pixel labels"):
        OracleDiceThreshold().fit(maps, None)
    with pytest.raises(PolicyNotFittedError):
        OracleDiceThreshold().predict(maps)


def test_oracle_relative_grid_follows_the_map_scale() -> None:
    maps, gt, _ = _oracle_example()
    scaled = torch.from_numpy(maps * 10.0)
    policy = OracleDiceThreshold(grid=np.linspace(0.0, 1.0, 201), relative=True).fit(scaled, None, masks=gt)
    assert policy.best_dice_ == pytest.approx(1.0)
    assert 3.55 < policy.threshold_ <= 4.55
    masks = segment(scaled, policy)
    assert isinstance(masks, torch.Tensor)
    np.testing.assert_array_equal(masks.numpy(), gt)


def test_fixed_threshold_states_label_use() -> None:
    policy = FixedThreshold(0.3, uses_pixel_labels=True).fit(np.zeros((1, 1, 2, 2)))
    assert policy.uses_pixel_labels is True and policy.to_dict()["threshold"] == 0.3
    expected = [[[[False, True], [True, False]]]]
    np.testing.assert_array_equal(policy.predict(np.array([[[[0.2, 0.3], [0.4, 0.1]]]])), expected)
