"""Data stage: discover subjects in published layouts, load and validate, preprocess (spec C.1), write
the slice store that training and evaluation stream from.

Main entry points: :func:`prepare_dataset` with a :class:`PrepareConfig`; :class:`SliceStore` /
:class:`SliceDataset` to read; :func:`slices_to_volume` / :func:`slice_to_image` to map slice results
back to the source scan's grid.
"""

from anomalydiff.data.geometry import save_volume_nifti, slice_to_image, slices_to_volume
from anomalydiff.data.layouts import FORMATS, discover
from anomalydiff.data.prepare import PrepareConfig, SkippedInputWarning, prepare_dataset
from anomalydiff.data.preprocess import UNKNOWN_LABEL, preprocess_image, preprocess_volume_subject
from anomalydiff.data.splits import read_split_files, split_subjects
from anomalydiff.data.store import SliceDataset, SliceStore, SliceStoreWriter, StoreError
from anomalydiff.data.volumes import DataInputError

__all__ = [
    "FORMATS",
    "UNKNOWN_LABEL",
    "DataInputError",
    "PrepareConfig",
    "SkippedInputWarning",
    "SliceDataset",
    "SliceStore",
    "SliceStoreWriter",
    "StoreError",
    "discover",
    "prepare_dataset",
    "preprocess_image",
    "preprocess_volume_subject",
    "read_split_files",
    "save_volume_nifti",
    "slice_to_image",
    "slices_to_volume",
    "split_subjects",
]
