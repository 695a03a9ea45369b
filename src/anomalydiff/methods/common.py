"""Helpers every method shares, so all of them draw noise and post-process the same way (spec D).

- per-image random generators seeded from (seed, subject, slice): a batch of 2 equals two batches of 1;
- error maps, the masked image score, Otsu masks, min-max maps, strided timestep grids;
- calibration checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Sequence

import torch

from anomalydiff.config import from_dict, to_dict
from anomalydiff.diffusion.noise import gaussian_like
from anomalydiff.postprocess import OtsuThreshold
from anomalydiff.records import Batch

# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopPlan:
    """The explicit timesteps of an encode/decode method (every index a training timestep).

    Attributes:
        start_level: timestep of the ``q_sample`` that starts the method (0 for DDIM inversion).
        encode: ``(t, t_next)`` pairs: the model is evaluated at ``t`` and the state moves to ``t_next``.
        decode: ``(t, t_prev)`` pairs: the model is evaluated at ``t`` and the state moves to ``t_prev``
            (``t_prev = -1`` returns the clean prediction).
    """

    start_level: int
    encode: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int], ...]


def image_generators(batch: Batch, seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from ``(seed, subject_id, slice_index)``.

    Drawing every stochastic quantity of an image from its own generator makes a method's output independent
    of how images are batched (a batch of 2 equals two batches of 1) and of the device (the noise is drawn on
    the CPU and moved, see :func:`anomalydiff.diffusion.noise.gaussian_like`). The seed is a SHA-256 hash, not
    Python's salted ``hash``, so it is the same in every process.

    Args:
        batch: the batch; its ``subject_id`` and ``slice_index`` identify each image.
        seed: the method's ``config.seed``.

    Returns:
        ``B`` seeded ``torch.Generator`` objects on the CPU.
    """
    generators = []
    for subject_id, slice_index in zip(batch.subject_id, batch.slice_index.tolist()):
        key = f"{int(seed)}|{subject_id}|{int(slice_index)}".encode()
        value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
        generators.append(torch.Generator(device="cpu").manual_seed(value))
    return generators


def gaussian_per_image(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise ``[B, C, H, W]``, image ``b`` drawn from ``generators[b]``.

    Args:
        like: ``[B, C, H, W]``; sets shape, dtype and device.
        generators: ``B`` generators (see :func:`image_generators`).

    Returns:
        ``[B, C, H, W]`` noise in ``like``'s dtype and device.
    """
    if len(generators) != like.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]} images; pass one each.")
    return torch.cat([gaussian_like(like[b : b + 1], generator=g) for b, g in enumerate(generators)], dim=0)


def strided_grid(top: int, step_stride: int) -> list[int]:
    """Explicit increasing grid of training timesteps ``[0, j, 2j, ..., top]`` (``top`` always included).

    Args:
        top: the last grid point (>= 0).
        step_stride: the stride ``j`` (>= 1).

    Returns:
        ``[0, j, 2j, ...]`` up to and including ``top``; when ``j`` does not divide ``top`` the last stride
        is shorter (e.g. ``strided_grid(10, 4) == [0, 4, 8, 10]``).
    """
    if top < 0 or step_stride < 1:
        raise ValueError(f"strided_grid needs top >= 0 and step_stride >= 1, got top={top}, stride={step_stride}.")
    grid = list(range(0, top + 1, step_stride))
    if grid[-1] != top:
        grid.append(top)
    return grid


def reconstruction_error_map(
    x0: torch.Tensor,
    x_hat: torch.Tensor,
    error: Literal["l1_sum", "squared_mean"],
    modalities: Sequence[int] | None = None,
    normalisation: Literal["none", "minmax"] = "none",
) -> torch.Tensor:
    """Pixel-wise reconstruction error over the chosen channels.

    ``"l1_sum"``: ``sum_c |x0_c - x_hat_c|`` (Wolleb, spec B.3 step 4). ``"squared_mean"``:
    ``(1/M) sum_m (x0_m - x_hat_m)^2`` over the M inference modalities (the AnoFPDM table's baselines,
    spec D). ``normalisation="minmax"`` first min-max normalises ``x0`` and ``x_hat`` per image over the used
    channels and pixels (Wolleb's CheXpert form); a constant image maps to 0.

    Args:
        x0: ``[B, C, H, W]`` input.
        x_hat: ``[B, C, H, W]`` reconstruction / counterfactual.
        error: ``"l1_sum"`` or ``"squared_mean"``.
        modalities: channel indices used; ``None`` = all.
        normalisation: ``"none"`` or ``"minmax"``.

    Returns:
        ``[B, 1, H, W]`` error map (0 where ``x_hat == x0``).
    """
    if x0.shape != x_hat.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape.")
    if modalities is not None:
        channels = list(modalities)
        if not channels or min(channels) < 0 or max(channels) >= x0.shape[1]:
            raise ValueError(
                f"modalities {tuple(channels)} must be channel indices of the {x0.shape[1]}-channel input; "
                "set modalities to null (all channels) or to indices that exist."
            )
        x0, x_hat = x0[:, channels], x_hat[:, channels]
    if normalisation == "minmax":
        x0, x_hat = _minmax_per_image(x0), _minmax_per_image(x_hat)
    elif normalisation != "none":
        raise ValueError(f"normalisation must be 'none' or 'minmax', got {normalisation!r}.")
    if error == "l1_sum":
        return (x0 - x_hat).abs().sum(dim=1, keepdim=True)
    if error == "squared_mean":
        return (x0 - x_hat).pow(2).mean(dim=1, keepdim=True)
    raise ValueError(f"error must be 'l1_sum' or 'squared_mean', got {error!r}.")


def _minmax_per_image(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image ``[B, ...]`` to [0, 1] (0 where the image is constant)."""
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def minmax_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map ``[B, 1, H, W]`` to [0, 1] (a constant map becomes all zeros)."""
    return _minmax_per_image(maps)


def masked_image_score(
    maps: torch.Tensor, brain: torch.Tensor | None, reduction: Literal["max", "mean"]
) -> torch.Tensor:
    """Image score = max or mean of the map inside the brain mask (the whole image where the mask is empty).

    Args:
        maps: ``[B, 1, H, W]`` anomaly maps.
        brain: ``[B, 1, H, W]`` bool foreground, or ``None`` (whole image).
        reduction: ``"max"`` or ``"mean"``.

    Returns:
        ``[B]`` scores in ``maps``' dtype.
    """
    inside = torch.ones_like(maps, dtype=torch.bool) if brain is None else brain.to(maps.device).bool()
    empty = ~inside.flatten(1).any(dim=1)
    inside = inside | empty.view(-1, 1, 1, 1)
    if reduction == "max":
        return maps.masked_fill(~inside, float("-inf")).flatten(1).max(dim=1).values
    if reduction == "mean":
        weights = inside.to(maps.dtype)
        return (maps * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)
    raise ValueError(f"image_score must be 'max' or 'mean', got {reduction!r}.")


def otsu_masks(maps: torch.Tensor) -> torch.Tensor:
    """Per-image Otsu segmentation ``1[a > tau_Otsu(a)]`` (spec B.3 step 5), via ``postprocess.OtsuThreshold``.

    Args:
        maps: ``[B, 1, H, W]`` anomaly maps.

    Returns:
        ``[B, 1, H, W]`` bool masks on ``maps``' device (empty for a constant map).
    """
    masks = OtsuThreshold().predict(maps)
    return torch.as_tensor(masks, device=maps.device).bool()


def check_calibration(name: str, config: Any, calibration: dict[str, Any]) -> None:
    """Check that a calibration dict was written by a method of this name and configuration.

    Args:
        name: the method's ``name``.
        config: the method's config dataclass.
        calibration: a dict from ``calibration()``.

    Raises:
        ValueError: the dict is from another method or another configuration.
    """
    if calibration.get("method") != name:
        raise ValueError(
            f"this calibration was written by method {calibration.get('method')!r}, not {name!r}; "
            "load the calibration JSON that sits beside this method's checkpoint."
        )
    saved = calibration.get("config")
    if saved is not None:
        rebuilt = from_dict(type(config), saved, where=f"{name} calibration config")
        if rebuilt != config:
            raise ValueError(
                f"the calibration's config {saved} differs from this {name} method's config {to_dict(config)}; "
                "build the method with the configuration the calibration was written for."
            )


def _timesteps(value: int, like: torch.Tensor) -> torch.Tensor:
    """A LongTensor ``[B]`` filled with ``value`` on ``like``'s device."""
    return torch.full((like.shape[0],), int(value), dtype=torch.long, device=like.device)


def _labels(value: int, like: torch.Tensor) -> torch.Tensor:
    """A LongTensor ``[B]`` of labels on ``like``'s device."""
    return torch.full((like.shape[0],), int(value), dtype=torch.long, device=like.device)


class NoFitCalibration:
    """``fit`` / ``calibration`` / ``load_calibration`` for methods with nothing label-based to fit.

    Their settings are the whole calibration; the threshold is either native (Otsu per image, see
    :meth:`native_threshold`) or comes from a fitted policy in ``anomalydiff.postprocess`` (spec D).
    The host class provides ``name``, ``config`` and ``uses_pixel_labels``.
    """

    name: ClassVar[str]
    config: Any
    uses_pixel_labels: bool

    def native_threshold(self) -> str | None:
        """The method's own label-free threshold, or None when a fitted policy supplies it."""
        return None

    def fit(self, val_batches: Iterable[Batch]) -> Any:
        """Nothing to fit (``val_batches`` is not iterated); returns self."""
        return self

    def calibration(self) -> dict[str, Any]:
        """``{"method", "config", "native_threshold", "uses_pixel_labels"}`` as JSON-ready values."""
        return {
            "method": self.name,
            "config": to_dict(self.config),
            "native_threshold": self.native_threshold(),
            "uses_pixel_labels": self.uses_pixel_labels,
        }

    def load_calibration(self, calibration: dict[str, Any]) -> Any:
        """Check a calibration written by :meth:`calibration` (nothing else to restore); returns self."""
        check_calibration(self.name, self.config, calibration)
        return self
