"""Median filter vs scipy.ndimage, connected-component filter vs skimage.measure (spec C.9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label, regionprops

from anomalydiff.postprocess import median_filter, remove_small_components


def test_median_filter_equals_scipy_mirror_not_scipy_reflect() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 1, 17, 13))
    ours = median_filter(torch.from_numpy(maps))
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float64 and ours.shape == maps.shape
    # torch F.pad "reflect" (c b | a b c, edge not repeated) == scipy mode="mirror"
    mirror = ndimage.median_filter(maps, size=(1, 1, 5, 5), mode="mirror")
    np.testing.assert_array_equal(ours.numpy(), mirror)
    # scipy mode="reflect" repeats the edge pixel (b a | a b c): same interior, different border
    reflect = ndimage.median_filter(maps, size=(1, 1, 5, 5), mode="reflect")
    np.testing.assert_array_equal(ours.numpy()[..., 2:-2, 2:-2], reflect[..., 2:-2, 2:-2])
    assert not np.array_equal(ours.numpy(), reflect)
    # size 3, numpy in -> numpy out, float32 kept
    maps32 = maps.astype(np.float32)
    out3 = median_filter(maps32, size=3)
    assert isinstance(out3, np.ndarray) and out3.dtype == np.float32
    np.testing.assert_array_equal(out3, ndimage.median_filter(maps32, size=(1, 1, 3, 3), mode="mirror"))


def test_median_filter_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="odd"):
        median_filter(torch.zeros(1, 1, 8, 8), size=4)
    with pytest.raises(ValueError, match="H, W > 2"):
        median_filter(torch.zeros(1, 1, 2, 8))


def _official_cc_filter(mask: np.ndarray, threshold: int = 40, two_d: bool = False) -> np.ndarray:
    """The official evaluate.py loop: label each [1,H,W] with connectivity=3, drop filled_area <= threshold."""
    out = mask.copy()
    for b in range(mask.shape[0]):
        image = mask[b] if not two_d else mask[b, 0]
        labelled = label(image, connectivity=image.ndim)
        for region in regionprops(labelled):
            if region.area_filled <= threshold:
                out[b][(labelled == region.label).reshape(out[b].shape)] = False
    return out


def test_cc_filter_matches_skimage_on_random_blobs() -> None:
    rng = np.random.default_rng(1)
    noise = ndimage.gaussian_filter(rng.standard_normal((6, 1, 48, 48)), sigma=(0, 0, 1.5, 1.5))
    masks = noise > 0.12
    sizes = np.bincount(ndimage.label(masks[0, 0], structure=np.ones((3, 3)))[0].ravel())[1:]
    assert (sizes <= 40).any() and (sizes > 40).any()  # the example exercises both sides of the cut
    ours = remove_small_components(torch.from_numpy(masks))
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.bool
    np.testing.assert_array_equal(ours.numpy(), _official_cc_filter(masks))
    np.testing.assert_array_equal(
        remove_small_components(masks, fill_holes=True), _official_cc_filter(masks, two_d=True)
    )


def test_cc_filter_hand_cases() -> None:
    mask = np.zeros((4, 1, 20, 20), dtype=bool)
    mask[0, 0, 0:5, 0:8] = True  # 40 px: removed
    mask[1, 0, 0:1, 0:1] = True
    mask[1, 0, 0:5, 0:8] = True
    mask[1, 0, 5, 0] = True  # 41 px: kept
    mask[2, 0, 0:4, 0:5] = True  # 20 px ...
    mask[2, 0, 4:7, 5:12] = True  # ... 21 px touching only at a corner: one 8-connected component of 41
    mask[3, 0, 0:5, 0:6] = True  # 30 px in two images at the same place must not merge across the batch
    batch = np.concatenate([mask, mask[3:4]])
    out = remove_small_components(batch)
    assert not out[0].any()
    np.testing.assert_array_equal(out[1], batch[1])
    np.testing.assert_array_equal(out[2], batch[2])
    assert not out[3].any() and not out[4].any()
    assert remove_small_components(batch, max_size=0).sum() == batch.sum()
    assert mask[2].sum() == 41 and mask[1].sum() == 41


def test_cc_filter_ring_filled_area_variants() -> None:
    ring = np.zeros((1, 1, 12, 12), dtype=bool)
    ring[0, 0, 2:9, 2:9] = True
    ring[0, 0, 4:7, 4:7] = False  # 40 ring pixels around a 9-pixel hole (filled area 49)
    assert ring.sum() == 40
    official = remove_small_components(ring)  # one-slice 3-D fill fills nothing: 40 <= 40, removed
    np.testing.assert_array_equal(official, _official_cc_filter(ring))
    assert not official.any()
    filled = remove_small_components(ring, fill_holes=True)  # 2-D filled area 49 > 40: kept, hole stays open
    np.testing.assert_array_equal(filled, _official_cc_filter(ring, two_d=True))
    np.testing.assert_array_equal(filled, ring)
