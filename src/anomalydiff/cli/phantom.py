"""`anomalydiff phantom`: see the command help."""

from anomalydiff.cli.app import app  # noqa: F401
