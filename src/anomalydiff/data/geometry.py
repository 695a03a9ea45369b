"""Geometry of prepared slices: what is recorded per subject, and how a slice map goes back to its scan.

Forward (done by :mod:`anomalydiff.data.preprocess`): file voxel grid ``[X, Y, Z]`` -> reorient to the
closest canonical (RAS+) orientation with nibabel's orientation arrays -> axial slices along the last
canonical axis, kept range ``[first, last)`` -> each slice ``[h, w]`` resized bilinearly to
``[resolution, resolution]``.

Backward (:func:`slices_to_volume`): resize each slice back to ``[h, w]`` (bilinear; boolean maps are
resized as 0/1 floats then thresholded at 0.5, exactly as labels are on the way in), re-insert into the
full canonical slice range with zeros elsewhere, undo the reorientation. The result lives on the ORIGINAL
file's voxel grid, so :func:`save_volume_nifti` writes it with the original affine and header.

2-D images (CheXpert, folder) record their original size and how they were fitted into the square
(``pad``: scaled to fit, centred, zero-padded; ``stretch``): :func:`slice_to_image` undoes that.

``subject_info`` is the per-subject JSON record stored in the slice store's ``subjects.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

SLICE_AXIS = 2  # axial slices along the last canonical (RAS) axis


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """Orientation array (nibabel) taking the file's voxel axes to the closest canonical RAS+ axes.

    Args:
        affine: ``[4, 4]`` voxel-to-world affine.

    Returns:
        ``[3, 2]`` array of (target axis, flip) per file axis, as from ``nibabel.orientations.io_orientation``.
    """
    return io_orientation(np.asarray(affine, dtype=np.float64)[:4, :4])


def to_canonical(array: np.ndarray, orientation: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Reorient a ``[X, Y, Z, ...]`` array from file order to canonical RAS+ order (same as ``as_closest_canonical``)."""
    return np.ascontiguousarray(apply_orientation(array, np.asarray(orientation, dtype=np.float64)))


def from_canonical(array: np.ndarray, orientation: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Inverse of :func:`to_canonical`: canonical RAS+ order back to the file's voxel order."""
    inverse = ornt_transform(axcodes2ornt("RAS"), np.asarray(orientation, dtype=np.float64))
    return np.ascontiguousarray(apply_orientation(array, inverse))


def resize_slices(slices: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a batch of slices (``align_corners=False``), the spec C.1 resize.

    Args:
        slices: ``[S, C, H, W]`` float tensor.
        size: target ``(H', W')``.
        antialias: low-pass before downsampling (off in the AnoFPDM code, spec C.1).

    Returns:
        ``[S, C, H', W']`` tensor (the input itself when the size does not change).
    """
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    return F.interpolate(slices, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False, antialias=antialias)


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a boolean ``[S, 1, H, W]`` mask: bilinear on 0/1 floats, then ``> 0.5`` (spec C.1 label rule)."""
    return resize_slices(mask.float(), size) > 0.5


def volume_geometry(
    affine: np.ndarray,
    file_shape: Sequence[int],
    slice_range: tuple[int, int],
    resolution: int,
) -> dict[str, Any]:
    """The geometry part of a 3-D subject's ``subject_info`` (JSON-serialisable).

    Args:
        affine: ``[4, 4]`` affine of the subject's files.
        file_shape: spatial shape ``(X, Y, Z)`` of the files (first 3 axes).
        slice_range: kept canonical slices ``[first, last)`` along :data:`SLICE_AXIS`.
        resolution: side of the stored square slices.
    """
    orientation = canonical_orientation(affine)
    canonical_shape = to_canonical(np.empty(tuple(int(s) for s in file_shape[:3]), dtype=np.uint8), orientation).shape
    return {
        "kind": "volume",
        "original_shape": [int(s) for s in file_shape[:3]],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "orientation": orientation.tolist(),
        "axcodes": list(nib.aff2axcodes(affine)),
        "canonical_shape": [int(s) for s in canonical_shape],
        "slice_axis": SLICE_AXIS,
        "slice_range": [int(slice_range[0]), int(slice_range[1])],
        "in_plane_size": [int(canonical_shape[0]), int(canonical_shape[1])],
        "resolution": [int(resolution), int(resolution)],
    }


def slices_to_volume(
    slices: np.ndarray | torch.Tensor,
    subject_info: dict[str, Any],
    slice_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Put prepared slices (or maps computed on them) back into the subject's original voxel grid.

    Args:
        slices: ``[S, H, W]`` float or bool, at the store resolution.
        subject_info: the subject's record from the store (``SliceStore.subjects()[id]``).
        slice_indices: canonical slice index of each of the ``S`` slices; default: the whole kept range
            ``slice_range`` in order. Slices not given are zero.

    Returns:
        ``[X, Y, Z]`` array on the original file's voxel grid: bool if ``slices`` is bool, else float32.
    """
    if subject_info.get("kind") != "volume":
        raise ValueError("slices_to_volume needs a 3-D subject record (kind 'volume'); use slice_to_image for 2-D images")
    array = slices.detach().cpu().numpy() if isinstance(slices, torch.Tensor) else np.asarray(slices)
    is_bool = array.dtype == bool
    first, last = subject_info["slice_range"]
    if slice_indices is None:
        slice_indices = list(range(first, last))
    if array.ndim != 3 or array.shape[0] != len(slice_indices):
        raise ValueError(f"slices must be [S,H,W] with S={len(slice_indices)} (the slice indices), got {array.shape}")
    canonical_shape = tuple(subject_info["canonical_shape"])
    for index in slice_indices:
        if not 0 <= int(index) < canonical_shape[SLICE_AXIS]:
            raise ValueError(f"slice index {index} outside the volume's {canonical_shape[SLICE_AXIS]} slices")
    # 1. inverse resize to the canonical in-plane size
    h, w = subject_info["in_plane_size"]
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None]
    restored = resize_mask(tensor > 0.5, (h, w)) if is_bool else resize_slices(tensor, (h, w))
    restored_np = restored[:, 0].numpy()
    # 2. re-insert into the full slice range (zeros elsewhere)
    canonical = np.zeros(canonical_shape, dtype=bool if is_bool else np.float32)
    for k, index in enumerate(slice_indices):
        canonical[:, :, int(index)] = restored_np[k]
    # 3. undo the reorientation
    return from_canonical(canonical, subject_info["orientation"])


def save_volume_nifti(volume: np.ndarray, subject_info: dict[str, Any], path: str | Path) -> Path:
    """Write a volume from :func:`slices_to_volume` as NIfTI with the subject's original affine (and header).

    The header of the subject's first source file is reused when that file is still readable and 3-D
    (keeping its qform/sform codes and zooms); otherwise a fresh header with the recorded affine is written.

    Args:
        volume: ``[X, Y, Z]`` on the original grid; bool is saved as uint8, anything else as float32.
        subject_info: the subject's record from the store.
        path: output file (``.nii`` or ``.nii.gz``).

    Returns:
        The written path.
    """
    path = Path(path)
    volume = np.asarray(volume)
    if tuple(volume.shape) != tuple(subject_info["original_shape"]):
        raise ValueError(f"volume shape {volume.shape} differs from the subject's {subject_info['original_shape']}")
    affine = np.asarray(subject_info["affine"], dtype=np.float64)
    data = volume.astype(np.uint8) if volume.dtype == bool else volume.astype(np.float32)
    header = None
    for source in subject_info.get("source_files", {}).values():
        try:
            reference = nib.load(str(source))
            if len(reference.shape) == 3:
                header = reference.header.copy()
        except Exception:  # noqa: BLE001  the source may have moved; a fresh header is still correct
            header = None
        break
    image = nib.Nifti1Image(data, affine, header=header)
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        image.set_qform(affine, int(header["qform_code"]) or 1)
        image.set_sform(affine, int(header["sform_code"]) or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def fit_image(original_size: Sequence[int], resolution: int, mode: str = "pad") -> dict[str, Any]:
    """How a 2-D image of ``original_size`` is placed into a ``resolution`` square.

    Args:
        original_size: ``(h, w)``.
        resolution: side of the stored square.
        mode: ``pad`` (scale so the long side fits, centre, pad; keeps anatomy proportions) or ``stretch``.

    Returns:
        ``{"original_size", "resized_size", "pad": [top, left], "resolution", "resize_mode"}``.
    """
    h, w = (int(s) for s in original_size)
    if mode == "stretch":
        new_h, new_w, top, left = resolution, resolution, 0, 0
    elif mode == "pad":
        scale = resolution / max(h, w)
        new_h, new_w = max(1, min(resolution, round(h * scale))), max(1, min(resolution, round(w * scale)))
        top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
    else:
        raise ValueError(f"resize mode {mode!r}: choose pad or stretch")
    return {
        "original_size": [h, w],
        "resized_size": [new_h, new_w],
        "pad": [top, left],
        "resolution": [resolution, resolution],
        "resize_mode": mode,
    }


def place_image(image: torch.Tensor, fit: dict[str, Any], antialias: bool = False, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize and pad a ``[C, h, w]`` image into the square described by ``fit`` (from :func:`fit_image`).

    Returns:
        ``([C, R, R] image, [R, R] bool region covered by the image)``.
    """
    new_h, new_w = fit["resized_size"]
    top, left = fit["pad"]
    size = fit["resolution"]
    resized = resize_slices(image[None].float(), (new_h, new_w), antialias)[0]
    out = torch.full((image.shape[0], *size), fill, dtype=resized.dtype)
    out[:, top : top + new_h, left : left + new_w] = resized
    region = torch.zeros(tuple(size), dtype=torch.bool)
    region[top : top + new_h, left : left + new_w] = True
    return out, region


def place_mask(mask: torch.Tensor, fit: dict[str, Any]) -> torch.Tensor:
    """Resize and pad a ``[h, w]`` bool mask like :func:`place_image` (bilinear then ``> 0.5``)."""
    new_h, new_w = fit["resized_size"]
    top, left = fit["pad"]
    out = torch.zeros(tuple(fit["resolution"]), dtype=torch.bool)
    out[top : top + new_h, left : left + new_w] = resize_mask(mask[None, None], (new_h, new_w))[0, 0]
    return out


def slice_to_image(slice_map: np.ndarray | torch.Tensor, subject_info: dict[str, Any], slice_index: int = 0) -> np.ndarray:
    """Map a stored 2-D slice (or a map computed on it) back to its source image's pixel grid.

    Args:
        slice_map: ``[H, W]`` float or bool at the store resolution.
        subject_info: the subject's record (``kind == "image"``).
        slice_index: which image of the subject (the stored ``slice_index``).

    Returns:
        ``[h, w]`` array at the original image size (bool if the input is bool, else float32).
    """
    if subject_info.get("kind") != "image":
        raise ValueError("slice_to_image needs a 2-D subject record (kind 'image'); use slices_to_volume for volumes")
    fit = subject_info["images"][slice_index]
    array = slice_map.detach().cpu().numpy() if isinstance(slice_map, torch.Tensor) else np.asarray(slice_map)
    is_bool = array.dtype == bool
    new_h, new_w = fit["resized_size"]
    top, left = fit["pad"]
    crop = torch.from_numpy(np.ascontiguousarray(array[top : top + new_h, left : left + new_w], dtype=np.float32))[None, None]
    size = fit["original_size"]
    out = resize_mask(crop > 0.5, size) if is_bool else resize_slices(crop, size)
    return out[0, 0].numpy()
