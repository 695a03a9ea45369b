"""The slice store: round trip, atomic writes, corruption and split errors."""

import numpy as np
import pytest
import torch

from anomalydiff.data.store import SliceDataset, SliceStore, SliceStoreWriter, StoreError
from anomalydiff.labels import HEALTHY, UNHEALTHY
from anomalydiff.records import collate_batch


def _subject(rng, s=3, c=2, h=8, w=8, lesion=True):
    images = rng.uniform(-1, 1, (s, c, h, w)).astype(np.float32)
    masks = np.zeros((s, h, w), bool)
    if lesion:
        masks[1, 2:4, 2:5] = True
    brain = np.ones((s, h, w), bool)
    labels = [int(m.any()) for m in masks]
    return images, masks, brain, labels


def _write(path, rng, subjects=("a", "b", "c")):
    writer = SliceStoreWriter(path, 2, 8, 8, ["flair", "t2"], info={"format": "test"})
    data = {}
    for sid in subjects:
        images, masks, brain, labels = _subject(rng)
        writer.add_subject(sid, images, masks, brain, [10, 11, 12], labels, {"shape": [8, 8, 3]})
        data[sid] = (images, masks, labels)
    writer.close({"train": list(subjects[:-1]), "val": [], "test": [subjects[-1]]})
    return data


def test_round_trip_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    data = _write(tmp_path / "store", rng)
    store = SliceStore(tmp_path / "store")
    assert store.shape == (9, 2, 8, 8)
    assert store.modalities == ["flair", "t2"]
    assert store.meta["format"] == "test"
    assert store.split_subjects("test") == ["c"]
    item = store.item(4)  # subject b, second slice
    np.testing.assert_allclose(item["image"].numpy(), data["b"][0][1], atol=1e-3)  # float16 storage
    assert item["mask"].shape == (1, 8, 8) and item["mask"].sum() == 6
    assert item["label"] == UNHEALTHY and item["slice_index"] == 11
    assert list(store.rows("train", label=HEALTHY)) == [0, 2, 3, 5]
    assert store.subjects()["a"]["shape"] == [8, 8, 3]
    batch = collate_batch([SliceDataset(store, "train")[i] for i in range(4)])
    assert batch.image.shape == (4, 2, 8, 8) and batch.mask.dtype == torch.bool
    assert batch.subject_id == ["a", "a", "a", "b"]


def test_refuses_existing_and_detects_truncation(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "store", rng)
    with pytest.raises(FileExistsError, match="--overwrite"):
        SliceStoreWriter(tmp_path / "store", 2, 8, 8, ["flair", "t2"])
    with open(tmp_path / "store" / "images.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="images.bin.*corrupt"):
        SliceStore(tmp_path / "store")


def test_interrupted_write_leaves_no_store(tmp_path):
    rng = np.random.default_rng(2)
    writer = SliceStoreWriter(tmp_path / "store", 2, 8, 8, ["flair", "t2"])
    images, masks, brain, labels = _subject(rng)
    writer.add_subject("a", images, masks, brain, [0, 1, 2], labels)
    # the process dies here: nothing at the final path, and the reader says what happened
    with pytest.raises(StoreError, match="interrupted"):
        SliceStore(tmp_path / "store")
    writer.abort()
    assert not (tmp_path / "store.partial").exists()


def test_rejects_bad_slices(tmp_path):
    rng = np.random.default_rng(3)
    writer = SliceStoreWriter(tmp_path / "store", 2, 8, 8, ["flair", "t2"])
    images, masks, brain, labels = _subject(rng)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        writer.add_subject("a", bad, masks, brain, [0, 1, 2], labels)
    with pytest.raises(ValueError, match="leave \\[-1, 1\\]"):
        writer.add_subject("a", images * 3, masks, brain, [0, 1, 2], labels)
    with pytest.raises(ValueError, match="shape"):
        writer.add_subject("a", images[:, :1], masks, brain, [0, 1, 2], labels)
    writer.add_subject("a", images, None, brain, [0, 1, 2], [0, 0, 0])
    with pytest.raises(StoreError, match="not in the store"):
        writer.close({"train": ["zz"]})
    assert not (tmp_path / "store.partial").exists() and not (tmp_path / "store").exists()


def test_empty_store_is_an_error(tmp_path):
    writer = SliceStoreWriter(tmp_path / "store", 1, 4, 4, ["t1"])
    with pytest.raises(StoreError, match="no slice"):
        writer.close({})
    assert not (tmp_path / "store").exists()
