"""Running predict over many subjects: sharded across processes or nodes, resumable, gathered into one CSV.

The same command runs on one process or under ``torchrun --nproc_per_node N`` (``--nnodes M`` for several
machines): rank ``r`` of ``W`` takes subjects ``r, r + W, r + 2W, ...`` of the input list (every rank discovers
the same sorted list), writes their files, and the per-subject rows are gathered to rank 0 with
``all_gather_object`` (gloo on CPU), which writes ``predictions.csv`` in input order after every rank is
through. Results do not depend on the number of processes: every subject is scored alone, AnoFPDM's noise is
seeded per slice from (seed, subject, slice), and batching does not change results.

Rank 0 alone checks and sets up the output folder and, when the model has no calibration, fits one (reusing
``OUT/calibration.json`` of an interrupted run of the same model and method); the calibration is broadcast, so
ranks on other nodes need no shared file system for it. Example (2 CPU processes on one machine)::

    torchrun --standalone --nproc_per_node 2 -m anomalydiff.cli predict --model MODELS --method anofpdm \\
        --input /data/BraTS2021 --out predictions/
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from anomalydiff.data.volumes import DataInputError
from anomalydiff.predict.inputs import (
    PredictSubject,
    _global_brain_mask,
    discover_inputs,
    load_subject,
)
from anomalydiff.predict.writer import (
    atomic_write_json,
    finish_run,
    is_done,
    open_output,
    read_done_row,
    write_subject,
)
from anomalydiff.training.distributed import DistInfo, init_distributed

__all__ = ["broadcast_object", "current_dist_info", "gather_rows", "run_prediction", "shard"]

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items rank ``rank`` of ``world_size`` takes: ``items[rank::world_size]``.

    Args:
        items: the full list (the same, in the same order, on every rank).
        rank: this process's rank.
        world_size: number of processes.

    Returns:
        This rank's share (round-robin, so shares differ in size by at most one).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(items[rank::world_size])


def current_dist_info(device: torch.device | str = "cpu") -> DistInfo:
    """This process's rank, joining the torchrun process group (gloo on CPU) when ``WORLD_SIZE`` > 1.

    Args:
        device: the device of this rank (``auto`` / ``cpu`` / ``cuda`` or a torch device).

    Returns:
        :class:`~anomalydiff.training.distributed.DistInfo`.
    """
    name = str(device) if isinstance(device, torch.device) else device
    if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
        name = "cuda"
    return init_distributed(name)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (the object itself when not distributed)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(rows: list[dict[str, Any]], error: str | None, info: DistInfo) -> tuple[list[dict[str, Any]], list[str]]:
    """Every rank's rows and error messages, on every rank (``all_gather_object``; lists when not distributed).

    Args:
        rows: this rank's ``predictions.csv`` rows.
        error: this rank's error message, or None.
        info: this process's rank.

    Returns:
        ``(all rows, all error messages)``.
    """
    if not info.distributed:
        return list(rows), [error] if error else []
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, (rows, error))
    all_rows = [row for part_rows, _ in gathered for row in part_rows]
    errors = [message for _, message in gathered if message]
    return all_rows, errors


def _on_main(info: DistInfo, fn: Any) -> Any:
    """Run ``fn`` on rank 0, broadcast its result; if it raises, every rank raises (no rank hangs)."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
    if not info.distributed:
        if error is not None:
            raise error
        return result
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    result, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def _calibration_for(predictor: Any, out: Path, calibration_store: str | Path | None, overwrite: bool) -> dict[str, Any]:
    """Rank 0: reuse ``OUT/calibration.json`` of an interrupted run of this model and method, else fit."""
    from anomalydiff.config import ConfigError
    from anomalydiff.models.io import CheckpointError
    from anomalydiff.predict.predictor import fit_predictor_if_needed, read_calibration

    previous = out / "calibration.json"
    if previous.is_file() and not overwrite and calibration_store is not None:
        try:
            predictor.load_calibration(read_calibration(previous))
            fit = predictor.calibration_.get("fit") or {}
            if Path(str(fit.get("store", ""))).resolve() == Path(calibration_store).resolve():
                return predictor.calibration_record()
        except (ConfigError, CheckpointError, ValueError, KeyError, OSError) as exc:
            warnings.warn(f"{previous} is not reusable ({exc}); fitting afresh", UserWarning, stacklevel=2)
        predictor.calibration_ = None
    fit_predictor_if_needed(predictor, calibration_store)
    return predictor.calibration_record()


def run_prediction(
    predictor: Any,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    fmt: str | None = None,
    subject_id: str | None = None,
    skip_bad: bool = False,
    overlay: bool = True,
    calibration_store: str | Path | None = None,
    info: DistInfo | None = None,
    record: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Predict on every subject of ``inputs`` into ``out`` (this rank's share; see the module docstring).

    Args:
        predictor: a :class:`~anomalydiff.predict.predictor.Predictor`.
        inputs: ``--input`` values (see :func:`~anomalydiff.predict.inputs.discover_inputs`).
        out: output folder (layout: :mod:`anomalydiff.predict.writer`).
        overwrite: redo subjects / replace another run's outputs.
        resume: continue a finished run of the same settings (predict inputs not done yet).
        progress: progress bar (rank 0).
        fmt: force an input layout.
        subject_id: output name of a single subject given as files.
        skip_bad: a subject that fails to load gets an ``error`` row (and is retried by a rerun) instead of
            stopping the run.
        overlay: write PNG panels.
        calibration_store: store to fit on (rank 0) when the predictor has no calibration.
        info: this process's rank (default: from the torchrun environment).
        record: extra facts for ``predict.json`` (e.g. the command line, sources).

    Returns:
        All subjects' rows in input order (on every rank).

    Raises:
        OutputExistsError: ``out`` holds results this run may not replace.
        DataInputError: a subject cannot be loaded (without ``skip_bad``).
        NotFittedError: no calibration and no ``calibration_store``.
        RuntimeError: another rank failed (its message is included).
    """
    info = info or current_dist_info(predictor.device)
    out = Path(out)
    # 1. calibration (rank 0 fits or reuses; everyone loads the same one)
    if not predictor.is_calibrated:
        calibration = _on_main(info, lambda: _calibration_for(predictor, out, calibration_store, overwrite))
        if not info.is_main:
            predictor.load_calibration(calibration)
    fingerprint = predictor.fingerprint()
    facts = {"world_size": info.world_size, "command": " ".join(sys.argv),
             "preprocess_source": predictor.record.source,
             "calibration_source": (predictor.calibration_ or {}).get("source") or "fitted",
             **(record or {})}

    # 2. the output folder (rank 0), then the calibration beside the results
    def setup() -> str:
        mode = open_output(out, fingerprint, overwrite=overwrite, resume=resume, record=facts)
        atomic_write_json(out / "calibration.json", predictor.calibration_record())
        return mode

    mode = _on_main(info, setup)
    redo = mode == "overwrite"
    # 3. the subjects (identical list on every rank), this rank's share
    subjects: list[PredictSubject] = discover_inputs(inputs, predictor.record, fmt, subject_id)
    mine = shard(subjects, info.rank, info.world_size)
    brain = _global_brain_mask(predictor.record)
    rows: list[dict[str, Any]] = []
    error: str | None = None
    failure: BaseException | None = None
    bar = tqdm(mine, desc=f"predict {predictor.preset}", unit="subject", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    try:
        for subject in bar:
            bar.set_postfix_str(subject.subject_id, refresh=False)
            if not redo and is_done(out, subject.subject_id):
                rows.append(read_done_row(out, subject.subject_id))  # 3a. finished before: skip
                continue
            try:
                loaded = load_subject(subject, predictor.record, brain)
            except DataInputError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipped subject {subject.subject_id}: {exc}", UserWarning, stacklevel=2)
                rows.append({"subject_id": subject.subject_id, "input": subject.source, "kind": subject.kind,
                             "error": str(exc)})
                continue
            prediction = predictor.predict_loaded(loaded)
            prediction.summary["rank"] = info.rank  # which process wrote it (summary JSON only)
            rows.append(write_subject(out, prediction, overlay=overlay))  # 3b. atomic, done marker last
    except BaseException as exc:
        failure = exc
        error = f"rank {info.rank}: {type(exc).__name__}: {exc}"
        if not info.distributed:
            raise
    finally:
        bar.close()
    # 4. gather every rank's rows; rank 0 writes predictions.csv in input order
    all_rows, errors = gather_rows(rows, error, info)
    if failure is not None:
        raise failure
    if errors:
        raise RuntimeError("prediction failed on another rank: " + "; ".join(errors))
    order = {s.subject_id: i for i, s in enumerate(subjects)}
    all_rows.sort(key=lambda row: order.get(str(row.get("subject_id")), len(order)))
    _on_main(info, lambda: finish_run(out, all_rows))
    return all_rows


def read_rows(out: str | Path) -> list[dict[str, str]]:
    """``predictions.csv`` of a finished run as dicts (strings).

    Args:
        out: the output folder.

    Returns:
        The rows.
    """
    import csv

    with open(Path(out) / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))

