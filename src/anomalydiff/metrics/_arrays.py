"""Small array helpers shared by ``metrics`` and ``postprocess``: accept torch or numpy, answer in kind.

Metrics and post-processing run on CPU in numpy (scipy / scikit-learn / scikit-image are the references);
these helpers move a tensor there and, where a function returns an array of the input's shape, back to
the input's framework and device.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a numpy array (a detached CPU copy for tensors, a view for arrays)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def like_input(result: np.ndarray, reference: ArrayLike) -> ArrayLike:
    """Return ``result`` as a tensor on ``reference``'s device if ``reference`` is a tensor, else as is."""
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(reference.device)
    return result


def as_float_scores(x: ArrayLike) -> np.ndarray:
    """Scores as a floating numpy array, keeping float32 (half the memory and a faster sort than float64)."""
    arr = to_numpy(x)
    return arr if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize >= 4 else arr.astype(np.float64)


def as_bool_mask(x: ArrayLike, name: str) -> np.ndarray:
    """Return a binary mask as a numpy bool array.

    Bool and integer arrays are taken as "non-zero = foreground". A float array is accepted only if every
    value is 0 or 1, so a continuous anomaly map passed by mistake fails loudly instead of being
    binarised silently.

    Raises:
        ValueError: ``x`` is a float array with values other than 0 and 1.
    """
    arr = to_numpy(x)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(
                f"{name} must be a binary mask (bool, or 0/1 values), got float values in "
                f"[{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]; threshold the anomaly map first "
                "(anomalydiff.postprocess threshold policies)."
            )
    return arr != 0


def per_sample(arr: np.ndarray, name: str) -> np.ndarray:
    """Reshape ``[B, ...]`` to ``[B, N]`` (one row per sample).

    Raises:
        ValueError: ``arr`` has no batch dimension.
    """
    if arr.ndim < 2:
        raise ValueError(f"{name} must be batched with shape [B, ...] (e.g. [B,1,H,W]), got {arr.shape}")
    return arr.reshape(arr.shape[0], -1)


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise a ``ValueError`` naming both arguments if their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")
