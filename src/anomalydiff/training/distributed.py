"""Device choice, DistributedDataParallel set-up and the seeded, sharded, resumable data order.

The same command runs on one process or under ``torchrun --nproc_per_node N``: when torchrun's
``WORLD_SIZE`` > 1, :func:`init_distributed` joins the process group (gloo on CPU, nccl on GPU), each rank
reads its own shard of every global batch, gradients are averaged by DDP, and only rank 0 logs and writes
checkpoints.

Randomness is a pure function of (seed, rank, step): the data order of epoch e is a permutation seeded by
(seed, e), and the per-step generator (t, noise, label dropout, dropout layers) is seeded by
(seed, rank, step). Resuming at step n therefore needs no saved RNG state to continue exactly as an
uninterrupted run would, on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine (selects the GPU).
        device: the torch device of this process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``--device auto|cpu|cuda|cuda:N`` into a torch device (auto = cuda if available).

    Args:
        name: the requested device.
        local_rank: GPU index for ``auto`` / ``cuda`` under torchrun.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one, and pick this rank's device.

    Args:
        device_name: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group (no-op when not distributed)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.distributed:
        dist.barrier()


def run_on_main(info: DistInfo, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; if it raises, every rank raises (so no rank waits forever at a barrier).

    Args:
        info: this process's rank.
        fn: the rank-0 work (e.g. creating the run folder).
    """
    error: Exception | None = None
    if info.is_main:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
    if info.distributed:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise RuntimeError(f"rank 0 failed: {message[0]}")
    if error is not None:
        raise error


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """The mean of a scalar over all ranks (the value itself when not distributed)."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def replica_max_abs_diff(model: nn.Module, info: DistInfo) -> float:
    """Largest |w_rank - w_rank0| over all parameters and ranks (0.0 when replicas are in sync).

    Rank 0's flattened parameters are broadcast and compared on every rank; the maximum is all-reduced.
    """
    if not info.distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy SeedSequence; distinct keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ShardedBatchSampler:
    """Seeded, infinite, resumable batches of dataset positions, sharded over DDP ranks.

    Epoch e visits ``permutation(num_items; seed, e)`` in global batches of ``global_batch`` items (the
    last incomplete batch of an epoch is dropped, as ``drop_last``); rank r takes items
    ``[r * b, (r + 1) * b)`` of each global batch, b = global_batch / world_size. The batch of step n
    depends only on n, so resuming needs only the step.

    Args:
        num_items: dataset length.
        global_batch: batch size summed over ranks (must be divisible by ``world_size``).
        seed: data-order seed.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch_size={global_batch} is not divisible by the {world_size} DDP ranks; change batch_size")
        if num_items < global_batch:
            raise ValueError(
                f"the training set has {num_items} slices, fewer than batch_size={global_batch}; lower batch_size"
            )
        self.num_items = num_items
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.batches_per_epoch = num_items // global_batch
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the first item of the global batch in that epoch's permutation) of ``step``."""
        return step // self.batches_per_epoch, (step % self.batches_per_epoch) * self.global_batch

    def indices(self, step: int) -> np.ndarray:
        """Dataset positions ``[b]`` this rank reads at ``step`` (0-based)."""
        epoch, start = self.position(step)
        if epoch != self._epoch:
            rng = np.random.default_rng(derive_seed(self.seed, epoch))
            self._perm = rng.permutation(self.num_items)
            self._epoch = epoch
        begin = start + self.rank * self.per_rank
        return self._perm[begin : begin + self.per_rank]
