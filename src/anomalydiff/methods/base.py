"""The small interface every anomaly-detection method implements, and the parts it is built from.

A method is built from explicit parts (``AnoFPDM(eps_model, schedule, config)``), learns what it calibrates
in ``fit(val_batches)`` from image-level labels only (unless its ``uses_pixel_labels`` says otherwise),
and answers ``score(batch) -> MethodOutput`` without computing metrics, plotting or printing.

The noise model is any callable ``eps_model(x_t, t, y) -> eps``: ``x_t`` ``[B,C,H,W]``, ``t`` ``[B]`` long
*training* timesteps (0..T-1; a respaced or strided index never reaches a model), ``y`` ``[B]`` long labels
with ``NULL_LABEL`` meaning "unconditional". A trained network is one such callable, an analytic function
another. The noisy classifier is any callable ``classifier(x_t, t) -> logits [B, 2]``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Protocol, runtime_checkable

import torch

from anomalydiff.records import Batch, MethodOutput

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit`` (or before loading a calibration)."""


@runtime_checkable
class AnomalyMethod(Protocol):
    """What every method in ``anomalydiff.methods`` provides."""

    name: ClassVar[str]
    #: True when ``fit`` needs pixel labels (the cross column of the AnoFPDM Table 1).
    uses_pixel_labels: ClassVar[bool]

    def fit(self, val_batches: Iterable[Batch]) -> "AnomalyMethod":
        """Calibrate on validation batches; returns self."""
        ...

    def score(self, batch: Batch) -> MethodOutput:
        """Anomaly map, image score and (where the method has one) its own mask and decision."""
        ...

    def calibration(self) -> dict[str, Any]:
        """The fitted values as a JSON-serialisable dict (saved beside the checkpoint)."""
        ...

    def load_calibration(self, calibration: dict[str, Any]) -> "AnomalyMethod":
        """Restore fitted values written by :meth:`calibration`; returns self."""
        ...


class CountingEpsModel:
    """Wraps an ``eps_model`` and counts network evaluations per image (one call on B images = 1 NFE each).

    A single batched call that evaluates the conditional and the null prediction together (batch 2B for B
    images) counts as 2 NFE per image, matching how the papers count.
    """

    def __init__(self, eps_model: EpsModel) -> None:
        self.eps_model = eps_model
        self.image_evaluations = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.image_evaluations += int(x_t.shape[0])
        return self.eps_model(x_t, t, y)

    def reset(self) -> None:
        self.image_evaluations = 0
