"""Loading and validating the files of a dataset: NIfTI volumes (3-D and MSD 4-D) and 2-D images.

Every check here ends in a :class:`DataInputError` that names the offending file and says what is wrong
and what to do. ``anomalydiff prepare --skip-bad`` turns these errors into a warning plus a row in the
store's ``skipped.csv``; nothing else is ever caught silently.

Checks (data.md "Bad input"): file missing, truncated / corrupt file (any reader failure), NaN / inf
voxels, an empty or all-zero volume / constant image, shape or affine mismatch between the modalities of
one subject, a segmentation with labels outside the expected set, a 4-D file with the wrong channel count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


class DataInputError(ValueError):
    """An input file is missing, unreadable or inconsistent.

    Attributes:
        source: the file (or folder) at fault, as a string.
        reason: what is wrong and what to do.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class Volume:
    """A loaded NIfTI volume: voxel data and the geometry of its file.

    Attributes:
        path: the file it was read from.
        data: ``[X, Y, Z]`` (or ``[X, Y, Z, K]`` for 4-D files) float32 voxel values in file order.
        affine: ``[4, 4]`` voxel-to-world affine of the file.
        header: the file's NIfTI header (kept to write results back with the same header).
    """

    def __init__(self, path: Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> None:
        self.path = path
        self.data = data
        self.affine = affine
        self.header = header

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)


def load_nifti(path: str | Path, ndim: int = 3, allow_zero: bool = False) -> Volume:
    """Read a NIfTI file fully into memory and validate it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        ndim: expected number of dimensions (3, or 4 for MSD images). A 3-D file with a trailing singleton
            4th axis is accepted as 3-D.
        allow_zero: accept an all-zero volume (segmentations and lesion masks may be empty).

    Returns:
        The :class:`Volume` with float32 data (``scl_slope`` / ``scl_inter`` applied).

    Raises:
        DataInputError: missing, truncated or corrupt file, wrong dimensionality, empty, all-zero (unless
            ``allow_zero``), or NaN / inf voxels. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataInputError(path, "file not found; check --root and that the dataset was fully extracted")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001  any reader failure means the file cannot be used
        raise DataInputError(
            path,
            f"cannot be read as NIfTI ({type(exc).__name__}: {exc}); the file is truncated or corrupt: "
            "re-download or re-extract it (or pass --skip-bad to leave this subject out)",
        ) from exc
    if data.ndim == 4 and ndim == 3 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataInputError(path, f"expected a {ndim}-D volume, got shape {data.shape}")
    if data.size == 0:
        raise DataInputError(path, f"the volume is empty (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise DataInputError(
            path, f"{bad} voxel(s) are NaN or inf; fix or re-export the file (or pass --skip-bad)"
        )
    if not allow_zero and not np.any(data):
        raise DataInputError(path, "the volume is all zero; the file is blank: re-export it (or pass --skip-bad)")
    return Volume(path, data, np.asarray(image.affine, dtype=np.float64), image.header)


def check_same_grid(reference: Volume, other: Volume, affine_tolerance: float = 1e-3) -> None:
    """Raise unless ``other`` has the voxel grid of ``reference`` (same 3-D shape and affine).

    Args:
        reference, other: volumes of one subject (modalities, seg, brain mask).
        affine_tolerance: largest absolute difference allowed between affine entries (mm).
    """
    if reference.shape[:3] != other.shape[:3]:
        raise DataInputError(
            other.path,
            f"shape {other.shape[:3]} does not match {reference.shape[:3]} of {reference.path}; "
            "all files of a subject must share one voxel grid (resample them, or pass --skip-bad)",
        )
    if not np.allclose(reference.affine, other.affine, rtol=0.0, atol=affine_tolerance):
        diff = float(np.abs(reference.affine - other.affine).max())
        raise DataInputError(
            other.path,
            f"affine differs from that of {reference.path} by up to {diff:.4g} (tolerance {affine_tolerance}); "
            "the files are not on the same grid: resample them, or raise affine_tolerance if the difference "
            "is only header rounding",
        )


def check_labels(seg: Volume, allowed: Collection[int]) -> None:
    """Raise unless the segmentation ``seg`` holds only integer values from ``allowed``."""
    integers = np.rint(seg.data)
    if not np.array_equal(seg.data, integers) and not np.allclose(seg.data, integers, rtol=0.0, atol=1e-3):
        odd = np.unique(seg.data[np.abs(seg.data - integers) > 1e-3])
        raise DataInputError(seg.path, f"segmentation has non-integer values {odd[:8].tolist()}; expected labels {sorted(allowed)}")
    low, high = int(integers.min()), int(integers.max())
    if high - low < 1_000_000:  # bincount is ~10x faster than np.unique (a sort) on a BraTS volume
        present = np.flatnonzero(np.bincount(integers.astype(np.int64).ravel() - low, minlength=1)) + low
    else:
        present = np.unique(integers)
    unexpected = sorted(set(int(v) for v in present) - set(int(a) for a in allowed))
    if unexpected:
        raise DataInputError(
            seg.path,
            f"unexpected segmentation label(s) {unexpected}; this format uses {sorted(allowed)}. "
            "Check --format (e.g. BraTS 2023 uses label 3, BraTS 2020/2021 use 4) or pass --skip-bad",
        )


def load_image(path: str | Path, mode: str = "L") -> np.ndarray:
    """Read a 2-D image (PNG / JPEG / BMP / TIFF via Pillow, or a 2-D / [H,W,C] ``.npy`` array).

    Args:
        path: the image file.
        mode: ``"L"`` (grayscale, 1 channel) or ``"RGB"`` (3 channels).

    Returns:
        ``[C, H, W]`` float32 array, raw intensities (not normalised).

    Raises:
        DataInputError: missing, unreadable or truncated file, NaN / inf values, or a constant image.
    """
    path = Path(path)
    channels = 1 if mode == "L" else 3
    if not path.is_file():
        raise DataInputError(path, "image file not found; check --root and the CSV / folder layout")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False).astype(np.float32)
            if array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
                array = np.moveaxis(array, -1, 0)
            if array.ndim == 2:
                array = array[None]
            if array.ndim != 3:
                raise ValueError(f"expected a 2-D image array, got shape {array.shape}")
            if array.shape[0] != channels:
                array = array.mean(axis=0, keepdims=True) if channels == 1 else np.repeat(array[:1], 3, axis=0)
        else:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image.convert(mode), dtype=np.float32)
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataInputError(
            path, f"cannot be read as an image ({type(exc).__name__}: {exc}); the file is truncated or corrupt: "
            "re-download it (or pass --skip-bad)",
        ) from exc
    if array.size == 0:
        raise DataInputError(path, f"the image is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise DataInputError(path, "the image has NaN or inf values; fix the file (or pass --skip-bad)")
    if float(array.max()) == float(array.min()):
        raise DataInputError(path, f"the image is constant ({float(array.min())}); it carries no content (pass --skip-bad to leave it out)")
    return array


def load_mask_image(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a 2-D pixel mask (any non-zero pixel is lesion) and check it matches the image size.

    Args:
        path: mask file (image or ``.npy``).
        shape: ``(H, W)`` of the image it belongs to.

    Returns:
        ``[H, W]`` bool mask.
    """
    path = Path(path)
    if not path.is_file():
        raise DataInputError(path, "mask file not found")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataInputError(path, f"cannot be read as a mask image ({type(exc).__name__}: {exc})") from exc
    array = np.squeeze(np.asarray(array))
    if array.shape != tuple(shape):
        raise DataInputError(path, f"mask has shape {array.shape}, its image has {tuple(shape)}; masks must match their image pixel for pixel")
    if not np.isfinite(array.astype(np.float64)).all():
        raise DataInputError(path, "the mask has NaN or inf values")
    return array != 0
