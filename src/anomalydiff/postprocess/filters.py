"""Post-processing shared by every method (spec C.9, Appendix E of AnoFPDM): median filter and CC filter.

1. ``median_filter``: 5x5 median, stride 1, reflect padding of 2 on the continuous anomaly map, before
   thresholding (the official ``median_pool``: ``F.pad(mode="reflect")`` + ``unfold`` + ``median``).
   torch's ``"reflect"`` mirrors **without** repeating the edge pixel (``c b | a b c``); that is numpy's
   ``"reflect"`` and scipy.ndimage's ``mode="mirror"``. scipy.ndimage's ``mode="reflect"`` repeats the edge
   (``b a | a b c``, numpy's ``"symmetric"``) and differs at the border; the tests check both facts.
2. ``remove_small_components``: on the binary prediction, before Dice/IoU: label 8-connected components and
   remove those of at most 40 pixels. The official code labels a ``[1, H, W]`` array with
   ``skimage.measure.label(connectivity=3)`` and tests ``filled_area <= 40``. On a one-slice 3-D array
   ``binary_fill_holes`` cannot fill anything (every background voxel touches the array's z-border), so its
   "filled area" is the plain pixel count; ``fill_holes=False`` (default) reproduces that exactly, and
   ``fill_holes=True`` uses the 2-D filled area instead (a ring of 36 pixels around a 9-pixel hole counts 45).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anomalydiff.metrics._arrays import ArrayLike, as_bool_mask, like_input

#: Median filter size of the official post-processing (spec C.9).
MEDIAN_SIZE: int = 5
#: Components with (filled) area <= this many pixels are removed (spec C.9: ``connected_components_3d(thr=40)``).
MAX_COMPONENT_SIZE: int = 40
#: Elements per chunk of unfolded patches (bounds the median filter's temporary copy to ~128 MB at float32).
_MEDIAN_CHUNK_ELEMENTS: int = 2**25


def median_filter(maps: ArrayLike, size: int = MEDIAN_SIZE) -> ArrayLike:
    """Median filter over the last two dimensions with torch ``"reflect"`` padding (spec C.9).

    Equivalent to ``scipy.ndimage.median_filter(..., mode="mirror")`` per image (not ``mode="reflect"``).

    Args:
        maps: ``[B, 1, H, W]`` anomaly maps (any leading dimensions, or ``[H, W]``), torch or numpy.
        size: odd window size (5 in the paper); padding is ``size // 2`` on every side.

    Returns:
        Filtered maps of the same shape, in the input's framework, device and (floating) dtype; integer or
        bool inputs come back as float32.

    Raises:
        ValueError: ``size`` is even or < 1, or an image side is not larger than ``size // 2`` (reflect
            padding needs that).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median_filter size must be a positive odd number (5 in the paper), got {size}")
    x = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(maps))
    if x.ndim < 2:
        raise ValueError(f"median_filter needs maps with at least [H, W] dimensions, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if size == 1:
        out = x.clone()
    else:
        height, width = x.shape[-2:]
        pad = size // 2
        if height <= pad or width <= pad:
            raise ValueError(f"median_filter of size {size} needs H, W > {pad}, got maps of shape {tuple(x.shape)}")
        flat = x.reshape(-1, 1, height, width)
        result = torch.empty_like(flat)
        chunk = max(1, _MEDIAN_CHUNK_ELEMENTS // (height * width * size * size))
        for start in range(0, flat.shape[0], chunk):
            # 1. reflect padding of size//2 (torch "reflect" = scipy "mirror"), spec C.9
            padded = F.pad(flat[start : start + chunk], (pad, pad, pad, pad), mode="reflect")
            # 2. all size x size windows at stride 1, then their median (odd count: the exact middle value)
            windows = padded.unfold(2, size, 1).unfold(3, size, 1)
            result[start : start + chunk] = windows.reshape(*windows.shape[:4], size * size).median(dim=-1).values
        out = result.reshape(x.shape)
    if isinstance(maps, torch.Tensor):
        return out
    return out.numpy()


def remove_small_components(
    mask: ArrayLike, max_size: int = MAX_COMPONENT_SIZE, fill_holes: bool = False
) -> ArrayLike:
    """Remove 8-connected components of at most ``max_size`` pixels from each 2-D mask (spec C.9).

    Components are found within each image (never across images of a batch), with 8-connectivity, as
    ``skimage.measure.label(connectivity=3)`` on a ``[1, H, W]`` array does in the official code.

    Args:
        mask: ``[B, 1, H, W]`` binary masks (any leading dimensions, or ``[H, W]``), torch or numpy.
        max_size: components with size ``<= max_size`` are removed (40: a 40-pixel blob goes, 41 stays);
            0 keeps everything.
        fill_holes: ``False`` (default, = official code): size is the pixel count. ``True``: size is the 2-D
            hole-filled area (skimage ``area_filled`` on a 2-D label image); only the component's own pixels
            are kept, never the filled holes.

    Returns:
        Bool masks of the same shape, in the input's framework and device.
    """
    arr = as_bool_mask(mask, "mask")
    if arr.ndim < 2:
        raise ValueError(f"remove_small_components needs masks with at least [H, W] dimensions, got {arr.shape}")
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0 (40 in the paper), got {max_size}")
    flat = arr.reshape(-1, *arr.shape[-2:])
    # 1. 8-connected labels within each image: a 3x3 structure in the image plane, none across the batch
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, num = ndimage.label(flat, structure=structure)
    if num == 0 or max_size == 0:
        return like_input(arr.copy(), mask)
    # 2. size of each component: pixel count, or the 2-D hole-filled area
    if fill_holes:
        sizes = np.zeros(num + 1, dtype=np.int64)
        fill_structure = np.ones((3, 3), dtype=bool)  # skimage fills with a full-connectivity structure
        for label_id, box in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[box][0] == label_id
            sizes[label_id] = int(ndimage.binary_fill_holes(component, structure=fill_structure).sum())
    else:
        sizes = np.bincount(labels.ravel(), minlength=num + 1)
    # 3. keep components larger than max_size (background label 0 never kept)
    keep = sizes > max_size
    keep[0] = False
    return like_input(keep[labels].reshape(arr.shape), mask)
