"""The run folder: resolved config, logs and atomic, resumable checkpoints (safetensors + JSON; no pickle).

Layout of ``RUN/``::

    config.yaml            the resolved training config
    model.safetensors/.json    latest raw weights (+ architecture config; load with anomalydiff.models.load_model)
    ema.safetensors/.json      EMA weights: what the methods use
    state/optimizer.safetensors  AdamW moments (tensors) ...
    state/optimizer.json         ... and param groups / scalars
    state/trainer.json           step, data position, EMA update count, RNG scheme, world size, wall time
    loss.csv               step, loss, lr, steps_per_s, wall_time
    diagnostics.csv        step, wall_time, t, metric, value   (when diagnostics are on)

A checkpoint is written as one set: every file goes into ``RUN/ckpt.tmp/``, then ``ckpt.tmp/COMPLETE`` is
written, then each file is moved over its final name with ``os.replace`` and ``ckpt.tmp`` removed. A run
killed at any moment leaves either a complete old set (``ckpt.tmp`` without ``COMPLETE`` is discarded) or a
complete new set (a ``ckpt.tmp`` with ``COMPLETE`` is moved into place by :func:`recover_checkpoint` on the
next start).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anomalydiff.config import save_config
from anomalydiff.models.io import CheckpointError, save_model
from anomalydiff.training.ema import EMA

TMP_DIR = "ckpt.tmp"
COMPLETE = "COMPLETE"
LOSS_COLUMNS = ("step", "loss", "lr", "steps_per_s", "wall_time")
DIAGNOSTICS_COLUMNS = ("step", "wall_time", "t", "metric", "value")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (exists without --resume, or has nothing to resume)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def recover_checkpoint(run_dir: Path) -> None:
    """Finish or discard a checkpoint write that a killed run left in ``RUN/ckpt.tmp``."""
    tmp = run_dir / TMP_DIR
    if not tmp.exists():
        return
    if not (tmp / COMPLETE).exists():
        shutil.rmtree(tmp)  # 1. incomplete set: the previous checkpoint is still whole
        return
    # 2. complete set: move every file into place (idempotent: files already moved are gone from tmp)
    for src in sorted(tmp.rglob("*")):
        if src.is_file() and src.name != COMPLETE:
            dst = run_dir / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    shutil.rmtree(tmp)


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``RUN/`` holds a complete checkpoint (``state/trainer.json`` and the weights)."""
    return (run_dir / "state" / "trainer.json").exists() and (run_dir / "model.safetensors").exists()


def prepare_run_folder(run_dir: str | Path, resume: bool) -> Path:
    """Create ``RUN/`` for a new run, or check it is a run folder for ``--resume``.

    A ``--resume`` of a run killed before its first checkpoint starts again from step 0 in the same folder.

    Raises:
        RunFolderError: a new run into an existing non-empty folder, or ``--resume`` of a folder that is not a run.
    """
    run_dir = Path(run_dir)
    if resume:
        if run_dir.exists():
            recover_checkpoint(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise RunFolderError(
                f"--resume: {run_dir} is not a run folder (config.yaml missing); start a new run without --resume"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunFolderError(
            f"{run_dir} already exists and is not empty: pass --resume to continue that run, or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_config(run_dir: Path, config: Any) -> None:
    """Write the resolved config as ``RUN/config.yaml``."""
    save_config(config, run_dir / "config.yaml")


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "tensor_keys": sorted(tensors)}
    return tensors, json.loads(json.dumps(meta))


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> None:
    """Write model, EMA, optimizer and trainer state as one consistent set (see the module docstring).

    Args:
        run_dir: the run folder.
        model: the trained network (unwrapped from DDP).
        ema: its EMA.
        optimizer: the optimizer.
        trainer_state: JSON-able facts (``step``, data position, wall time, ...); ``ema_num_updates`` is added.
    """
    tmp = run_dir / TMP_DIR
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "state").mkdir(parents=True)
    step = int(trainer_state["step"])
    # 1. weights (raw + EMA) with their architecture configs
    save_model(model, model.config, tmp / "model", metadata={"step": step, "weights": "raw"})
    save_model(ema.shadow, ema.shadow.config, tmp / "ema", metadata={"step": step, "weights": "ema", "ema_rate": ema.rate})
    # 2. optimizer moments and trainer state
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "state" / "optimizer.safetensors"))
    (tmp / "state" / "optimizer.json").write_text(json.dumps(meta, indent=1))
    state = {**trainer_state, "ema_num_updates": ema.num_updates}
    (tmp / "state" / "trainer.json").write_text(json.dumps(state, indent=2))
    # 3. make the set durable, mark it complete, then move it into place
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    (tmp / COMPLETE).write_text(json.dumps({"step": step}))
    _fsync_file(tmp / COMPLETE)
    recover_checkpoint(run_dir)


def load_checkpoint(run_dir: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, EMA and optimizer from ``RUN/`` in place; returns the trainer state.

    Raises:
        CheckpointError: a file is missing or does not fit the network (names the file).
    """
    recover_checkpoint(run_dir)
    state_file = run_dir / "state" / "trainer.json"
    if not state_file.exists():
        raise CheckpointError(f"{state_file} not found: {run_dir} has no checkpoint to resume from")
    state = json.loads(state_file.read_text())
    for target, name in ((model, "model"), (ema.shadow, "ema")):
        path = run_dir / f"{name}.safetensors"
        if not path.exists():
            raise CheckpointError(f"{path} not found: the checkpoint in {run_dir} is incomplete")
        weights = load_file(str(path))
        try:
            target.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(
                f"mismatched checkpoint: {path} does not fit the network of this config ({str(exc)[:300]}); "
                "resume with the run's own config.yaml"
            ) from exc
    ema.num_updates = int(state["ema_num_updates"])
    opt_file = run_dir / "state" / "optimizer.safetensors"
    tensors = {k: v.to(next(model.parameters()).device) for k, v in load_file(str(opt_file)).items()}
    meta = json.loads((run_dir / "state" / "optimizer.json").read_text())
    _optimizer_from_files(optimizer, tensors, meta)
    return state


class CsvLog:
    """An append-only CSV file with fixed columns, flushed per row (so a killed run keeps its log).

    Args:
        path: the CSV file; the header is written if the file is new.
        columns: column names.
    """

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path = path
        self.columns = columns
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(columns)
            self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (keys = columns) and flush."""
        self._writer.writerow([row[c] for c in self.columns])
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def truncate_csv_after(path: Path, step: int) -> None:
    """Drop rows with ``step`` > ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    column = header.index("step")
    kept = [r for r in body if r and int(float(r[column])) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(kept)
    os.replace(tmp, path)
