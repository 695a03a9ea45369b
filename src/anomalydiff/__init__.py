"""anomalydiff: weakly-supervised anomaly detection and segmentation in medical images with diffusion models.

Pipeline stages, one folder each (top to bottom = data flow):
``data`` -> ``diffusion`` -> ``models`` -> ``training`` -> ``methods`` -> ``postprocess`` -> ``metrics``
-> ``evaluation`` -> ``predict``; ``cli`` is the thin command-line layer.
"""

from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.records import Batch, MethodOutput

__version__ = "0.1.0"
__all__ = ["HEALTHY", "UNHEALTHY", "NULL_LABEL", "Batch", "MethodOutput", "__version__"]
