"""``python -m anomalydiff.cli`` (also what ``torchrun -m anomalydiff.cli`` runs)."""

from anomalydiff.cli import main

main()
