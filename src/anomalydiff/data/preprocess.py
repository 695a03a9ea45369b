"""Preprocessing of one subject into store-ready slices (method-spec C.1; Wolleb B.2 for 2-D images).

3-D (BraTS / MSD / ATLAS), per subject, in this order:

1. reorient every volume to the closest canonical RAS+ orientation (nibabel orientation arrays);
   axial slices are along the last canonical axis, a slice is ``[R-axis, A-axis]``;
2. optional skull stripping with a supplied brain mask (ATLAS T1w may include the skull);
3. per modality: divide by the ``percentile``-th (99th) percentile of the positive voxels (spec C.1);
4. slices kept: the contiguous range from the first to the last slice whose mean-over-modalities
   intensity, summed over the slice, exceeds ``slice_threshold`` (0.5) (spec C.1), or an explicit range;
5. bilinear resize of each slice to ``resolution`` (``align_corners=False``, no antialias: spec C.1);
   the lesion mask is resized bilinearly as 0/1 and binarised ``> 0.5``; all lesion labels merged;
6. intensities to [-1, 1]: ``anofpdm`` = per slice and per channel min-max to [0, 1], then ``2x - 1``
   (the AnoFPDM loader, spec C.1; a constant channel maps to -1); ``volume`` = keep the per-volume scale
   of step 3: clip to [0, 1] (the brightest 1% of foreground saturates) then ``2x - 1``, so intensities
   are comparable between slices of a subject;
7. image label = 1 if the resized mask has any positive pixel, else 0 (-1 when there is no seg);
   brain mask = any modality non-zero (or the supplied brain mask), resized, ``> 0.5``.

2-D (CheXpert / folder): grayscale (or RGB) image fitted into the square (``pad`` keeps proportions,
``stretch`` does not), then per image and per channel min-max over the image region to [-1, 1] (Wolleb:
min-max per image); the padding is -1 and lies outside the "brain" (body) mask, which covers the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from nibabel.orientations import apply_orientation

from anomalydiff.data.geometry import canonical_orientation, fit_image, place_image, place_mask, resize_mask, resize_slices
from anomalydiff.data.volumes import DataInputError
from anomalydiff.labels import HEALTHY, UNHEALTHY

UNKNOWN_LABEL = -1  # image label of slices whose subject has no segmentation


@dataclass
class PreparedSlices:
    """One subject's slices, ready for :meth:`SliceStoreWriter.add_subject`.

    Attributes:
        images: ``[S, C, R, R]`` float32 in [-1, 1].
        masks: ``[S, R, R]`` bool lesion masks, or ``None`` without a seg.
        brain: ``[S, R, R]`` bool foreground.
        slice_indices: ``S`` canonical slice indices (0 for single 2-D images).
        labels: ``S`` image labels (HEALTHY / UNHEALTHY, or -1 when unknown).
        info: geometry and provenance for ``subject_info`` (slice range, scales, ...).
    """

    images: np.ndarray
    masks: np.ndarray | None
    brain: np.ndarray
    slice_indices: list[int]
    labels: list[int]
    info: dict[str, Any]


def foreground_percentile(volume: np.ndarray, percentile: float = 99.0) -> float:
    """The ``percentile``-th percentile of the positive voxels of ``volume`` (spec C.1, linear interpolation).

    Returns:
        The scale; raises ``ValueError`` if no voxel is positive.
    """
    positive = volume[volume > 0]
    if positive.size == 0:
        raise ValueError("no positive voxel to normalise by")
    return float(np.percentile(positive.astype(np.float64), percentile))


def brain_slice_range(normalised: np.ndarray, threshold: float = 0.5) -> tuple[int, int]:
    """Contiguous range of slices containing brain (spec C.1).

    Args:
        normalised: ``[C, X, Y, Z]`` canonical volumes after percentile scaling.
        threshold: a slice holds brain if the sum over the slice of the mean over modalities exceeds this.

    Returns:
        ``(first, last)`` with ``last`` exclusive; raises ``ValueError`` if no slice passes.
    """
    # sum over the slice of the mean over modalities == mean over modalities of the per-slice sums
    per_slice = normalised.sum(axis=(1, 2), dtype=np.float64).mean(axis=0)
    above = np.flatnonzero(per_slice > threshold)
    if above.size == 0:
        raise ValueError(f"no slice has brain (mean-over-modalities intensity sum > {threshold})")
    return int(above[0]), int(above[-1]) + 1


def to_unit_range(slices: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Map scaled slices ``[S, C, H, W]`` to [-1, 1] (step 6 of the module docstring).

    Args:
        slices: percentile-scaled, resized slices.
        normalisation: ``anofpdm`` (per slice per channel min-max) or ``volume`` (clip to [0, 1]).
    """
    if normalisation == "anofpdm":
        low = slices.amin(dim=(-2, -1), keepdim=True)
        high = slices.amax(dim=(-2, -1), keepdim=True)
        span = high - low
        unit = torch.where(span > 0, (slices - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(slices))
    elif normalisation == "volume":
        unit = slices.clamp(0.0, 1.0)
    else:
        raise ValueError(f"normalisation {normalisation!r}: choose anofpdm or volume")
    return (2.0 * unit - 1.0).clamp(-1.0, 1.0)


def preprocess_volume_subject(
    volumes: Mapping[str, np.ndarray],
    affine: np.ndarray,
    seg: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
    *,
    resolution: int = 128,
    normalisation: str = "anofpdm",
    percentile: float = 99.0,
    slice_range: tuple[int, int] | None = None,
    slice_threshold: float = 0.5,
    antialias: bool = False,
    lesion_labels: Sequence[int] | None = None,
    skull_strip: bool = True,
    sources: Mapping[str, str] | None = None,
) -> PreparedSlices:
    """Preprocess one 3-D subject (module docstring steps 1-7).

    Args:
        volumes: modality name -> ``[X, Y, Z]`` array in file voxel order, in the channel order wanted.
        affine: ``[4, 4]`` affine shared by all volumes.
        seg: ``[X, Y, Z]`` segmentation (labels) or ``None``.
        brain_mask: ``[X, Y, Z]`` brain mask (non-zero = brain) or ``None``.
        resolution: side of the output slices (spec C.1: 128).
        normalisation: ``anofpdm`` or ``volume``.
        percentile: foreground percentile used as the per-volume scale (spec C.1: 99).
        slice_range: explicit canonical ``[first, last)`` instead of the brain rule.
        slice_threshold: brain-rule threshold (spec C.1: 0.5).
        antialias: low-pass when downsampling (spec C.1: off).
        lesion_labels: seg labels counted as anomaly; ``None`` = every positive label (spec C.1 merges all).
        skull_strip: zero the voxels outside ``brain_mask`` (when one is given).
        sources: modality name -> file, used to name the file in errors.

    Returns:
        :class:`PreparedSlices` (``info`` has ``slice_range`` and per-modality ``scales``).
    """
    sources = dict(sources or {})
    names = list(volumes)
    # 1. reorient to canonical RAS+
    orientation = canonical_orientation(affine)
    first_volume = apply_orientation(np.asarray(volumes[names[0]]), orientation)
    canonical = np.empty((len(names), *first_volume.shape), dtype=np.float32)  # one copy per modality, no re-stacking
    canonical[0] = first_volume
    for c, name in enumerate(names[1:], start=1):
        canonical[c] = apply_orientation(np.asarray(volumes[name]), orientation)
    brain_canonical = None if brain_mask is None else apply_orientation(np.asarray(brain_mask) != 0, orientation)
    # 2. optional skull stripping
    if brain_canonical is not None and skull_strip:
        canonical *= brain_canonical[None]
    # 7a. brain = any modality non-zero, unless a brain mask is supplied
    foreground = brain_canonical if brain_canonical is not None else np.any(canonical != 0, axis=0)
    # 3. per-modality 99th percentile of the positive voxels
    scales = {}
    for c, name in enumerate(names):
        try:
            scales[name] = foreground_percentile(canonical[c], percentile)
        except ValueError as exc:
            raise DataInputError(sources.get(name, name), f"modality {name}: {exc}; the volume has no usable signal") from exc
        canonical[c] /= scales[name]
    # 4. slices containing brain (or an explicit range)
    depth = canonical.shape[-1]
    if slice_range is not None:
        first, last = int(slice_range[0]), min(int(slice_range[1]), depth)
        if not 0 <= first < last:
            raise DataInputError(sources.get(names[0], names[0]), f"slice range {slice_range} is empty for a volume with {depth} axial slices")
    else:
        try:
            first, last = brain_slice_range(canonical, slice_threshold)
        except ValueError as exc:
            raise DataInputError(sources.get(names[0], names[0]), f"{exc}; the volume looks empty (or pass --slice-range)") from exc
    # 5. bilinear resize: [S, C, h, w] with S = slices along the last canonical axis
    kept = torch.from_numpy(np.ascontiguousarray(np.moveaxis(canonical[..., first:last], -1, 0)))
    size = (resolution, resolution)
    images = resize_slices(kept, size, antialias)
    # 6. to [-1, 1]
    images = to_unit_range(images, normalisation)
    brain_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(foreground[..., first:last], -1, 0)))[:, None]
    brain = resize_mask(brain_t, size)[:, 0].numpy()
    masks = None
    labels = [UNKNOWN_LABEL] * images.shape[0]
    if seg is not None:
        seg_canonical = apply_orientation(np.asarray(seg), orientation)[..., first:last]
        integer_seg = np.rint(seg_canonical)  # labels were checked to be integers (to 1e-3) on load
        lesion = integer_seg > 0 if lesion_labels is None else np.isin(integer_seg, list(lesion_labels))
        # 5b/7. labels merged, resized bilinearly and binarised > 0.5; image label = any positive pixel
        lesion_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lesion, -1, 0)))[:, None]
        masks = resize_mask(lesion_t, size)[:, 0].numpy()
        labels = [UNHEALTHY if m.any() else HEALTHY for m in masks]
    return PreparedSlices(
        images=images.numpy().astype(np.float32),
        masks=masks,
        brain=brain,
        slice_indices=list(range(first, last)),
        labels=labels,
        info={"slice_range": [first, last], "scales": scales},
    )


def preprocess_image(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    resolution: int = 128,
    resize_mode: str = "pad",
    antialias: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Preprocess one 2-D image (Wolleb B.2: per-image min-max; here to [-1, 1]).

    Args:
        image: ``[C, h, w]`` raw intensities.
        mask: ``[h, w]`` bool pixel mask or ``None``.
        resolution: side of the output square.
        resize_mode: ``pad`` or ``stretch`` (see :func:`anomalydiff.data.geometry.fit_image`).
        antialias: low-pass when downsampling.

    Returns:
        ``(image [C, R, R] in [-1, 1], mask [R, R] bool or None, body [R, R] bool, fit)`` where ``fit``
        records the original size and placement (for :func:`anomalydiff.data.geometry.slice_to_image`).
    """
    fit = fit_image(image.shape[-2:], resolution, resize_mode)
    placed, region = place_image(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), fit, antialias)
    # per image and per channel min-max over the image region, then 2x - 1; padding is -1
    inside = placed[:, region]
    low = inside.amin(dim=1)[:, None, None]
    high = inside.amax(dim=1)[:, None, None]
    span = torch.where(high > low, high - low, torch.ones_like(high))
    unit = torch.where(region[None], ((placed - low) / span).clamp(0.0, 1.0), torch.zeros_like(placed))
    out_mask = None if mask is None else place_mask(torch.from_numpy(np.asarray(mask, dtype=bool)), fit).numpy()
    return (2.0 * unit - 1.0).numpy().astype(np.float32), out_mask, region.numpy(), fit
