"""Image-level labels, defined once and imported everywhere.

``NULL_LABEL`` is the reserved label value that means "no condition" for classifier-free guidance
(spec A.6: the null condition is the all-zero class embedding; our class-conditional network maps this
index to a frozen zero embedding row, which is exactly that).
"""

HEALTHY: int = 0
UNHEALTHY: int = 1
NULL_LABEL: int = 2
NUM_CLASSES: int = 2
