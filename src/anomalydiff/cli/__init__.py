"""Command-line interface: thin wrappers that parse, load config and call the library.

One module per command (group); each registers itself on :data:`anomalydiff.cli.app.app`.
"""

from anomalydiff.cli.app import app
from anomalydiff.cli import benchmark, demo, detect, phantom, predict, prepare, report, train  # noqa: F401  (register commands)


def main() -> None:
    """Entry point of the ``anomalydiff`` console script."""
    app()


__all__ = ["app", "main"]
