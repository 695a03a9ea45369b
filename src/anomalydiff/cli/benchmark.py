"""`anomalydiff benchmark CONFIG`: AnoFPDM's Table 1 on the built-in phantom, with costs, curve and ablations.

Example::

    anomalydiff benchmark benchmarks/phantom_quick.yaml               # committed weights in models/phantom/
    anomalydiff benchmark benchmarks/phantom_quick.yaml --train       # train the models first (hours on a CPU)
    anomalydiff benchmark benchmarks/phantom_full.yaml --seeds 3      # paper settings (600 steps, stride 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anomalydiff.cli.app import app


@app.command()
def benchmark(
    config: Annotated[Path, typer.Argument(help="Benchmark YAML, e.g. benchmarks/phantom_quick.yaml.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default runs/<config name>); "
                                                "a rerun into the same folder skips finished work.")] = None,
    train: Annotated[bool, typer.Option("--train", help="Train the model parts into OUT/models with the "
                                        "training configs of the benchmark instead of loading models.dir.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Number of method seeds (0..N-1); "
                                                 "default: the config's.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Use this prepared store instead of generating "
                                                  "the phantom (must be the one the models were trained on).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value, key=value "
                                                      "(repeatable), e.g. --set evaluation.max_slices=16.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: the "
                                                  "config's).")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Also write OUT/report.html.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run a benchmark: phantom -> store -> models -> every method (fit on val, score test) -> results + figures."""
    from anomalydiff.config import ConfigError
    from anomalydiff.data.store import StoreError
    from anomalydiff.evaluation.benchmark import load_benchmark_config, run_benchmark
    from anomalydiff.models.io import CheckpointError

    overrides = list(set_ or [])
    # the command as run, rebuilt from the parsed options (recorded in results.json)
    command = ["anomalydiff", "benchmark", str(config)]
    command += [f"--out {out}"] if out is not None else []
    command += ["--train"] if train else []
    command += [f"--seeds {seeds}"] if seeds is not None else []
    command += [f"--store {store}"] if store is not None else []
    command += [f"--set {o}" for o in set_ or []]
    command += [f"--device {device}"] if device is not None else []
    if store is not None:
        overrides.append(f"data.store={store}")
    try:
        cfg = load_benchmark_config(config, overrides)
        folder = out or Path("runs") / cfg.name
        run_benchmark(cfg, folder, train=train, seeds=seeds, device=device, progress=not quiet,
                      command=" ".join(command), config_path=config)
        if report:
            from anomalydiff.evaluation.report import write_report

            typer.echo(f"report: {write_report(folder)}")
    except (ConfigError, CheckpointError, StoreError, ValueError, FileNotFoundError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"results: {folder / 'results.md'} ({folder / 'results.json'}, {folder / 'results.csv'})")
