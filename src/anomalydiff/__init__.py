"""anomalydiff: weakly-supervised anomaly detection and segmentation in medical images with diffusion models.

Pipeline stages, one folder each (top to bottom = data flow):
``data`` -> ``diffusion`` -> ``models`` -> ``training`` -> ``methods`` -> ``postprocess`` -> ``metrics``
-> ``evaluation`` -> ``predict``; ``cli`` is the thin command-line layer.
"""

import os

# Spin-waiting OpenMP threads slow torch 5-30x on a small machine whose cores other processes share
# (measured on 2 cores); passive waiting costs nothing measurable when the machine is idle. Must be set
# before torch loads OpenMP; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.records import Batch, MethodOutput

__version__ = "0.1.0"
__all__ = ["HEALTHY", "UNHEALTHY", "NULL_LABEL", "Batch", "MethodOutput", "__version__"]
