"""`anomalydiff demo`: the main job on the built-in phantom with the committed models (no download).

Example::

    anomalydiff demo --out demo_run                       # phantom -> store -> fit, score, evaluate -> predict -> report
    anomalydiff demo --out demo_run --overwrite           # replace an earlier demo in demo_run/
    anomalydiff demo --out demo_run --models runs/phantom_quick/models --subjects 10 --seed 7
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomalydiff.cli.app import app

EPILOG = (
    "Example: anomalydiff demo --out demo_run\n\n"
    "Stages: write a BraTS-layout phantom of unseen subjects (seed 2024), prepare it with the models' own "
    "preprocessing (MODELS/preprocess.json) into validation and test subjects, fit AnoFPDM and Wolleb on validation "
    "(image labels only), score and evaluate a test sample (mixed and unhealthy-only setups), predict on a held-out "
    "subject's NIfTI files, and write OUT/report.html and OUT/demo.json. About 5 minutes on 2 CPU cores."
)


@app.command("demo", epilog=EPILOG)
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder (new or empty; an earlier demo with "
                                      "--overwrite).")] = Path("demo_run"),
    models: Annotated[Path, typer.Option("--models", help="Model folder with cfg/, classifier/ and "
                                         "preprocess.json (the committed phantom models by default).")] = Path("models/phantom"),
    subjects: Annotated[int, typer.Option("--subjects", min=2, help="Phantom subjects, split into validation "
                                          "and test.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Phantom seed (training used 0, the benchmark 1000).")] = 2024,
    device: Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars (stage lines are still printed).")] = False,
) -> None:
    """Run the whole pipeline on the built-in phantom and write an HTML report (no download)."""
    from anomalydiff.config import ConfigError
    from anomalydiff.data.store import StoreError
    from anomalydiff.data.volumes import DataInputError
    from anomalydiff.evaluation.demo import run_demo
    from anomalydiff.methods.base import NotFittedError
    from anomalydiff.models.io import CheckpointError

    command = (f"anomalydiff demo --out {out} --models {models} --subjects {subjects} --seed {seed} --device {device}"
               + (" --overwrite" if overwrite else ""))
    try:
        report = run_demo(out, models=models, subjects=subjects, seed=seed, device=device, overwrite=overwrite,
                          progress=not quiet, command=command)
    except (ConfigError, CheckpointError, StoreError, DataInputError, NotFittedError, FileExistsError,
            FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"demo finished: {out / 'demo.json'}")
    typer.echo(f"report: {report}")
