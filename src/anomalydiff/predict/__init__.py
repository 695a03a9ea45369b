"""predict stage: users' scans in, anomaly maps and masks out, in the scan's own space.

- ``inputs``: the model's preprocessing record (``preprocess.json`` / ``store.json``), finding subjects in every
  input form (BraTS / ATLAS / MSD / named NIfTI files / folders / 2-D images / CheXpert), loading and checking them.
- ``predictor``: :class:`Predictor` (``from_model_dir``, ``fit``, ``predict_array``, ``predict_path``).
- ``writer``: the output folder (BIDS-derivatives names, atomic per-subject folders, ``predictions.csv``).
- ``distributed``: the many-subject loop, sharded over ``torchrun`` ranks, resumable.

Example::

    from anomalydiff.predict import Predictor

    predictor = Predictor.from_model_dir("models/phantom", method="anofpdm_ddim")
    rows = predictor.predict_path("/data/BraTS2021_00042", "predictions/")
"""

from anomalydiff.predict.inputs import (
    InputWarning,
    LoadedSubject,
    PredictSubject,
    PreprocessRecord,
    discover_inputs,
    load_subject,
    read_preprocess,
    write_preprocess,
)
from anomalydiff.predict.predictor import (
    PredictConfig,
    Prediction,
    Predictor,
    read_calibration,
)
from anomalydiff.predict.writer import OutputExistsError

__all__ = [
    "InputWarning",
    "LoadedSubject",
    "OutputExistsError",
    "PredictConfig",
    "PredictSubject",
    "Prediction",
    "Predictor",
    "PreprocessRecord",
    "discover_inputs",
    "load_subject",
    "read_calibration",
    "read_preprocess",
    "write_preprocess",
]
