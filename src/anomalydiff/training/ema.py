"""Exponential moving average of network weights (spec A.5, C.2: rate 0.9999; the EMA weights are used at test time).

After optimisation step n (n = 1, 2, ...), every parameter's shadow is updated as

    rate_n = rate                                   (warmup off, guided-diffusion ``update_ema``)
    rate_n = min(rate, (1 + n) / (10 + n))          (warmup on, diffusers ``EMAModel``)
    shadow <- rate_n * shadow + (1 - rate_n) * param

and buffers are copied. With warm-up, a short CPU run's EMA follows the network early on instead of staying
near the random initialisation (at rate 0.9999 the initial weights still weigh e^{-0.3} = 74% after 3k steps).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A shadow copy of a network whose weights track an exponential moving average.

    Args:
        model: the network being trained (unwrapped, not the DDP wrapper).
        rate: the EMA rate (decay) in [0, 1).
        warmup: use ``min(rate, (1 + n) / (10 + n))`` at update n.

    Attributes:
        shadow: the averaged network (eval mode, no gradients); save and evaluate this one.
        num_updates: updates done so far (saved in checkpoints for the warm-up and exact resume).
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = False) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate {rate} must be in [0, 1) (spec A.5 uses 0.9999)")
        self.rate = rate
        self.warmup = warmup
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_rate(self) -> float:
        """The rate the next update will use."""
        n = self.num_updates + 1
        return min(self.rate, (1 + n) / (10 + n)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- rate_n * shadow + (1 - rate_n) * param for every parameter; buffers are copied."""
        rate = self.current_rate()
        for shadow_p, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            shadow_p.lerp_(p.detach(), 1.0 - rate)
        for shadow_b, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            shadow_b.copy_(b)
        self.num_updates += 1
