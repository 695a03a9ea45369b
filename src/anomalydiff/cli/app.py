"""The typer application object, shared by the command modules of this package."""

import typer

app = typer.Typer(
    name="anomalydiff",
    help="Weakly-supervised anomaly detection and segmentation in medical images with diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
