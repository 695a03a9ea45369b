"""`anomalydiff detect`: fit one method on validation and write its anomaly maps, masks and metrics.

Example::

    anomalydiff detect --method anofpdm_ddim --models models/phantom --store runs/phantom_quick/data/store \\
        --split test --out runs/detect_anofpdm --max-slices 64 --set forward_steps=600 --set step_stride=20
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anomalydiff.cli.app import app


@app.command()
def detect(
    method: Annotated[str, typer.Option("--method", help="Method preset of configs/methods (e.g. anofpdm_ddim, "
                                        "wolleb_p1, anoddpm_simplex, ddib, cgcdm) or a preset YAML path.")],
    models: Annotated[Path, typer.Option("--models", help="Model folder with cfg/, classifier/, healthy_gaussian/, "
                                         "healthy_simplex/ run folders (or one run folder).")],
    store: Annotated[Path, typer.Option("--store", help="Prepared slice store (from `anomalydiff prepare`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for maps.npz, calibration.json, metrics.json.")],
    split: Annotated[str, typer.Option("--split", help="Split to score and evaluate (fitting always uses val).")] = "test",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a preset field, key=value "
                                                      "(repeatable), e.g. --set step_stride=10.")] = None,
    max_slices: Annotated[Optional[int], typer.Option("--max-slices", min=1, help="Distinct slices scored "
                                                      "(fixed seed); default all.")] = None,
    val_slices: Annotated[Optional[int], typer.Option("--val-slices", min=1, help="Validation slices used for "
                                                      "fitting (default 1000, spec C.1).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per batch.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the slice samples.")] = 0,
    threshold_policy: Annotated[str, typer.Option("--threshold-policy", help="For methods without a native "
                                                  "threshold: oracle_dice (pixel labels, as the paper's baselines), "
                                                  "healthy_quantile (label-free) or otsu.")] = "oracle_dice",
    balanced: Annotated[bool, typer.Option("--balanced", help="Label-balanced samples (test and validation).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Fit METHOD on validation, score a split, write anomaly maps, masks and metrics (both setups)."""
    from anomalydiff.config import ConfigError
    from anomalydiff.data.store import StoreError
    from anomalydiff.evaluation.models import build_method_from_parts, load_parts
    from anomalydiff.evaluation.runner import POLICIES, EvaluationConfig, run_method
    from anomalydiff.models.io import CheckpointError
    from anomalydiff.training.distributed import resolve_device

    if (out / "metrics.json").exists() and not overwrite:
        typer.echo(f"error: {out / 'metrics.json'} exists; choose another --out or pass --overwrite", err=True)
        raise typer.Exit(code=2)
    others = tuple(p for p in POLICIES if p not in (threshold_policy, "otsu"))
    try:
        torch_device = resolve_device(device)
        parts = load_parts(models, device=torch_device)
        built, used = build_method_from_parts(method, parts, list(set_ or []))
        config = EvaluationConfig(split=split, max_slices=max_slices, val_slices=val_slices, seed=seed,
                                  balanced=balanced, balanced_val=balanced, batch_size=batch_size,
                                  threshold_policy=threshold_policy, alternative_policies=others)
        result = run_method(built, store, config, out_dir=out, name=method, device=torch_device, progress=not quiet,
                            info={"preset": method, "overrides": list(set_ or []),
                                  "models": {p: parts.ids[p] for p in used}})
    except (ConfigError, CheckpointError, StoreError, ValueError, FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    for name, evaluation in result.evaluations.items():
        labels = "uses pixel labels" if evaluation["uses_pixel_labels"] else "no pixel labels"
        for setup, report in evaluation["reports"].items():
            typer.echo(f"{name:>16} {setup:>9}: Dice {100 * report['dice']:5.1f}  IoU {100 * report['iou']:5.1f}  "
                       f"AUPRC {100 * report['auprc']:5.1f}  ({report.counts['n_slices']} slices, {labels})")
    cost = result.cost
    typer.echo(f"NFE/slice {cost['nfe_per_slice']}, {cost['seconds_per_slice']:.3f} s/slice, peak "
               f"{cost['peak_memory_mb']:.0f} MiB; files in {out}")
