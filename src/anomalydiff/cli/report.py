"""`anomalydiff report RUN_DIR`: a self-contained HTML page (tables, plots, example panels) of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomalydiff.cli.app import app


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A benchmark folder (results.json) or a detect folder "
                                            "(metrics.json).")],
) -> None:
    """Write RUN_DIR/report.html with every figure embedded (PNGs also in RUN_DIR/figures/)."""
    from anomalydiff.evaluation.report import write_report

    try:
        path = write_report(run_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"report: {path}")
