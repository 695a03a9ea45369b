"""The records passed between pipeline stages.

``Batch`` carries slices from the data stage to the methods; ``MethodOutput`` carries a method's answer
to post-processing, metrics and writers. Shapes use B = batch, C = channels, H x W = slice size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class Batch:
    """A batch of 2-D slices.

    Attributes:
        image: ``[B, C, H, W]`` float, intensities in [-1, 1].
        label: ``[B]`` long, image-level label (``HEALTHY`` / ``UNHEALTHY``; -1 if unknown).
        mask: ``[B, 1, H, W]`` bool pixel ground truth, or ``None`` when the data has no pixel labels.
        brain: ``[B, 1, H, W]`` bool foreground (brain / body) mask.
        subject_id: one subject identifier per item.
        slice_index: ``[B]`` long, index of the slice in its (canonically oriented) volume; 0 for 2-D images.
    """

    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor | None
    brain: torch.Tensor
    subject_id: list[str]
    slice_index: torch.Tensor

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise ValueError(f"Batch.image must be [B,C,H,W], got shape {tuple(self.image.shape)}")
        b, _, h, w = self.image.shape
        if self.label.shape != (b,):
            raise ValueError(f"Batch.label must be [B]={b}, got {tuple(self.label.shape)}")
        for name in ("mask", "brain"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, 1, h, w):
                raise ValueError(f"Batch.{name} must be [B,1,H,W]={(b, 1, h, w)}, got {tuple(value.shape)}")
        if len(self.subject_id) != b:
            raise ValueError(f"Batch.subject_id must have {b} entries, got {len(self.subject_id)}")

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """Return a copy with all tensors on ``device``."""
        return Batch(
            image=self.image.to(device),
            label=self.label.to(device),
            mask=None if self.mask is None else self.mask.to(device),
            brain=self.brain.to(device),
            subject_id=list(self.subject_id),
            slice_index=self.slice_index.to(device),
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> "Batch":
        """Return the sub-batch of the given item indices."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(
            image=self.image[idx],
            label=self.label[idx],
            mask=None if self.mask is None else self.mask[idx],
            brain=self.brain[idx],
            subject_id=[self.subject_id[int(i)] for i in idx],
            slice_index=self.slice_index[idx],
        )


def collate_batch(items: Sequence[dict[str, Any]]) -> Batch:
    """Collate per-slice dicts (as yielded by ``SliceDataset``) into a :class:`Batch`."""
    has_mask = all(item.get("mask") is not None for item in items)
    return Batch(
        image=torch.stack([torch.as_tensor(i["image"]) for i in items]).float(),
        label=torch.as_tensor([int(i["label"]) for i in items], dtype=torch.long),
        mask=torch.stack([torch.as_tensor(i["mask"]) for i in items]).bool() if has_mask else None,
        brain=torch.stack([torch.as_tensor(i["brain"]) for i in items]).bool(),
        subject_id=[str(i["subject_id"]) for i in items],
        slice_index=torch.as_tensor([int(i["slice_index"]) for i in items], dtype=torch.long),
    )


@dataclass
class MethodOutput:
    """What a method's ``score(batch)`` returns.

    Attributes:
        anomaly_map: ``[B, 1, H, W]`` float, higher = more anomalous (before the shared post-processing
            unless the method's docstring says otherwise).
        image_score: ``[B]`` float, higher = more likely unhealthy.
        pred_mask: ``[B, 1, H, W]`` bool from the method's own label-free threshold, or ``None``.
        pred_label: ``[B]`` long healthy/unhealthy decision from the method's own gate, or ``None``.
        nfe: network evaluations spent per image (diffusion-model calls; classifier calls in ``extras``).
        extras: method-specific tensors (e.g. per-step divergences, reconstructions) for figures.
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    pred_mask: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    nfe: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
