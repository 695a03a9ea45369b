"""Export a finished (or paused) training run as a committed model part: weights, config, curves, model card.

``anomalydiff train export RUN --part cfg --out models/phantom`` writes ``models/phantom/cfg/``::

    config.yaml          the run's resolved training config (exact; reproduces the run with --config)
    ema.safetensors/.json  the EMA weights (what the methods use), fp16 by default (load_model returns float32)
    loss.csv, diagnostics.csv   the run's learning curves (diagnostics only when the run wrote them)
    MODEL_CARD.md        command, config, seed, steps, wall time, machine, final loss, diagnostics, sha256
    card.json            the same facts, machine-readable

With ``--store`` the training store's preprocessing is written as ``models/phantom/preprocess.json`` (what
``anomalydiff predict`` repeats on every scan). The export checks that the exported weights give the same noise
predictions as the run's float32 EMA weights (relative error reported in the card), so an fp16 export that loses
quality is visible, not silent.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from anomalydiff.config import read_yaml
from anomalydiff.machine import describe_machine
from anomalydiff.models.io import CheckpointError, load_model, read_model_info, save_model

__all__ = ["export_run", "fp16_relative_error"]

#: part -> the ``anomalydiff train`` sub-command that makes it
_KIND_OF_PART = {"cfg": "diffusion", "classifier": "classifier", "healthy_gaussian": "diffusion", "healthy_simplex": "diffusion"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fp16_relative_error(reference: torch.nn.Module, exported: torch.nn.Module, seed: int = 0) -> float:
    """Relative L2 difference of two networks' outputs on random inputs (same architecture).

    Args:
        reference: the float32 network.
        exported: the network loaded back from the exported (e.g. fp16) file.
        seed: seed of the random probe inputs.

    Returns:
        ``||f_exported - f_reference|| / ||f_reference||`` over a batch of 4 noisy inputs at t = 100, 300, 500, 900.
    """
    config = reference.config
    channels = int(config.in_channels)
    size = int(getattr(config, "image_size", None) or 64)  # the classifier's head fixes its input side
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, channels, size, size, generator=generator)
    t = torch.tensor([100, 300, 500, 900])
    with torch.no_grad():
        if type(reference).__name__ == "NoisyClassifier":
            ref, out = reference(x, t), exported(x, t)
        else:
            y = torch.tensor([0, 1, 2, 0])
            ref, out = reference(x, t, y), exported(x, t, y)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _final_loss(losses: list[dict[str, str]], last: int = 25) -> float | None:
    values = [float(row["loss"]) for row in losses[-last:] if row.get("loss")]
    return sum(values) / len(values) if values else None


def _last_diagnostics(rows: list[dict[str, str]]) -> tuple[int | None, list[dict[str, Any]]]:
    if not rows:
        return None, []
    step = max(int(r["step"]) for r in rows)
    return step, [{"t": int(r["t"]), "metric": r["metric"], "value": float(r["value"])} for r in rows if int(r["step"]) == step]


def _sha256(path: Path) -> str:
    from anomalydiff.evaluation.models import file_sha256

    return file_sha256(path)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    part: str,
    *,
    dtype: str = "float16",
    store: str | Path | None = None,
    data_note: str = "",
) -> Path:
    """Write one model part (weights, config, curves, card) from a ``train`` run folder.

    Args:
        run_dir: the ``anomalydiff train`` run folder (``config.yaml``, ``ema.safetensors``, ``state/trainer.json``).
        out_dir: the model folder; the part goes to ``out_dir/part`` (replaced atomically).
        part: ``cfg``, ``classifier``, ``healthy_gaussian`` or ``healthy_simplex``.
        dtype: ``float16`` (half-size files) or ``float32``.
        store: the training slice store; when given, ``out_dir/preprocess.json`` is written from it.
        data_note: how the training data was made (e.g. the phantom and prepare commands), for the card.

    Returns:
        The part folder.

    Raises:
        CheckpointError: the run folder lacks its EMA weights, config or trainer state.
        ValueError: unknown part or dtype.
    """
    if part not in _KIND_OF_PART:
        raise ValueError(f"unknown part {part!r}; choose from {sorted(_KIND_OF_PART)}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    run = Path(run_dir)
    for needed in ("config.yaml", "ema.safetensors", "ema.json", "state/trainer.json"):
        if not (run / needed).exists():
            raise CheckpointError(f"{run / needed} not found: {run} is not an `anomalydiff train` run folder with a checkpoint")
    target = Path(out_dir) / part
    tmp = Path(out_dir) / f".{part}.export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # 1. weights: EMA, stored in the chosen dtype; check the exported network against the float32 one
    reference = load_model(run / "ema")
    info = read_model_info(run / "ema")
    save_model(reference, reference.config, tmp / "ema", dtype=getattr(torch, dtype), metadata=info.get("metadata", {}))
    rel_error = fp16_relative_error(reference, load_model(tmp / "ema"))
    # 2. config and curves, copied as they are
    shutil.copy2(run / "config.yaml", tmp / "config.yaml")
    for name in ("loss.csv", "diagnostics.csv", "diagnostics.png"):
        if (run / name).exists():
            shutil.copy2(run / name, tmp / name)
    # 3. the card
    trainer = json.loads((run / "state/trainer.json").read_text())
    config = read_yaml(run / "config.yaml")
    losses = _read_csv(run / "loss.csv")
    diag_step, diagnostics = _last_diagnostics(_read_csv(run / "diagnostics.csv"))
    sha = _sha256(tmp / "ema.safetensors")
    kind = _KIND_OF_PART[part]
    card = {
        "part": part,
        "model_class": info["model_class"],
        "num_parameters": info.get("num_parameters"),
        "dtype": dtype,
        "export_relative_error": rel_error,
        "sha256": sha,
        # the run may have been stopped before its planned steps: the command reproduces the exported step
        "command": f"anomalydiff train {kind} --store STORE --out RUN --config {part}/config.yaml"
        + (f" --set steps={int(trainer['step'])}" if int(trainer["step"]) != config.get("steps") else ""),
        "resume_command": f"anomalydiff train {kind} --store STORE --out RUN --resume",
        "data": data_note,
        "seed": config.get("seed"),
        "mode": config.get("mode", "classifier"),
        "steps": int(trainer["step"]),
        "target_steps": config.get("steps"),
        "batch_size": config.get("batch_size"),
        "world_size": trainer.get("world_size", 1),
        "wall_time_hours": round(float(trainer.get("wall_time", 0.0)) / 3600.0, 3),
        "machine": describe_machine(),
        "final_loss": _final_loss(losses),
        "diagnostics_step": diag_step,
        "diagnostics": diagnostics,
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2))
    (tmp / "MODEL_CARD.md").write_text(_card_markdown(card))
    # 4. replace the part folder in one move (a killed export leaves the old part whole)
    old = Path(out_dir) / f".{part}.export.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    if store is not None:
        from anomalydiff.predict.inputs import write_preprocess

        write_preprocess(store, out_dir)
    return target


def _card_markdown(card: dict[str, Any]) -> str:
    diag = "\n".join(f"| {d['t']} | {d['metric']} | {d['value']:.3f} |" for d in sorted(card["diagnostics"], key=lambda d: (d["metric"], d["t"])))
    loss = "n/a" if card["final_loss"] is None else f"{card['final_loss']:.4f}"
    steps = f"{card['steps']}" + (f" of {card['target_steps']} planned" if card["target_steps"] and card["target_steps"] != card["steps"] else "")
    return f"""# Model card: `{card['part']}` ({card['model_class']}, {card['num_parameters']:,} parameters)

| fact | value |
|---|---|
| training command | `{card['command']}` |
| resume (continues the same run) | `{card['resume_command']}` |
| training data | {card['data'] or 'see the store recorded in ../preprocess.json'} |
| mode | {card['mode']} |
| seed | {card['seed']} |
| steps | {steps} (batch {card['batch_size']}, {card['world_size']} process(es)) |
| wall time | {card['wall_time_hours']} h |
| machine | {card['machine']} |
| final loss (mean of the last 25 logged) | {loss} |
| weights | `ema.safetensors` ({card['dtype']}; EMA weights), sha256 `{card['sha256']}` |
| export check | relative output difference to the float32 EMA network: {card['export_relative_error']:.2e} |

`config.yaml` is the run's exact resolved config; `loss.csv` and `diagnostics.csv` are its learning curves.

## Diagnostics at step {card['diagnostics_step']}

| t | metric | value |
|---|---|---|
{diag}
"""
