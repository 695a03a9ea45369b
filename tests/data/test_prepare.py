"""Preprocessing numbers (spec C.1) against an independent re-computation, splits, options, and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fake_trees as ft
from anomalydiff.cli import app
from anomalydiff.data import PrepareConfig, SliceDataset, SliceStore, prepare_dataset, split_subjects
from anomalydiff.data import prepare as prepare_module
from anomalydiff.data.splits import read_split_files
from anomalydiff.records import collate_batch

MODALITIES = ("flair", "t1", "t1ce", "t2")


def block_mean(x: np.ndarray) -> np.ndarray:
    """2x2 block mean over the first two axes (what a bilinear 2x downsample with align_corners=False is)."""
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, *x.shape[2:]).mean(axis=(1, 3))


def reference_subject(case_dir: Path, case: str, normalisation: str = "anofpdm") -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Spec C.1 for one BraTS 2021 case at resolution 12, written independently: nibabel's as_closest_canonical,
    torch.quantile, the AnoFPDM slice rule (argmax / flip), 2x2 block means, numpy min-max."""
    channels = []
    for name in MODALITIES:
        image = nib.as_closest_canonical(nib.load(str(case_dir / f"{case}_{name}.nii.gz")))
        volume = torch.from_numpy(image.get_fdata())
        p99 = torch.quantile(volume[volume > 0], 0.99)
        channels.append(volume / p99)
    stacked = torch.stack(channels)
    above = (stacked.mean(dim=0).sum(dim=0).sum(dim=0) > 0.5).int()
    first = int(above.argmax())
    last = int(stacked.shape[-1] - above.flip(dims=[0]).argmax())
    kept = stacked[..., first:last].numpy()  # [C, X, Y, S]
    small = np.stack([block_mean(c) for c in kept])  # [C, 12, 12, S]
    small = np.moveaxis(small, -1, 0)  # [S, C, 12, 12]
    if normalisation == "anofpdm":
        low = small.min(axis=(2, 3), keepdims=True)
        high = small.max(axis=(2, 3), keepdims=True)
        unit = (small - low) / (high - low)
    else:
        unit = np.clip(small, 0, 1)
    seg = nib.as_closest_canonical(nib.load(str(case_dir / f"{case}_seg.nii.gz"))).get_fdata()[..., first:last]
    mask = np.moveaxis(block_mean((seg > 0).astype(np.float64)) > 0.5, -1, 0)
    brain = np.moveaxis(block_mean((kept != 0).any(axis=0).astype(np.float64)) > 0.5, -1, 0)
    return 2 * unit - 1, mask, brain, (first, last)


@pytest.mark.parametrize("normalisation", ["anofpdm", "volume"])
def test_preprocessing_matches_spec_c1_reference(tmp_path, normalisation):
    root = ft.write_brats2021(tmp_path / "b21", count=2)
    store = SliceStore(prepare_dataset(PrepareConfig(format="brats2021", resolution=12, normalisation=normalisation), root, tmp_path / "s", progress=False))
    case = "BraTS2021_00001"
    images, mask, brain, (first, last) = reference_subject(root / case, case, normalisation)
    rows = [s.row for s in store.slices if s.subject_id == case]
    assert [store.slices[r].slice_index for r in rows] == list(range(first, last)) == list(range(*ft.BRAIN_SLICES))
    np.testing.assert_allclose(np.asarray(store.images[rows], dtype=np.float64), images, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(np.asarray(store.masks[rows], dtype=bool), mask)
    np.testing.assert_array_equal(np.asarray(store.brain[rows], dtype=bool), brain)
    assert [store.slices[r].label for r in rows] == [int(m.any()) for m in mask]
    assert store.subjects()[case]["slice_range"] == [first, last]


def test_options_slice_range_modalities_lesion_labels(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=2)
    config = PrepareConfig(format="brats2021", resolution=8, slice_range=(3, 7), modalities=("t2", "FLAIR"), lesion_labels=(4,))
    store = SliceStore(prepare_dataset(config, root, tmp_path / "s", progress=False))
    assert store.modalities == ["t2", "flair"] and store.shape == (8, 2, 8, 8)
    assert sorted({s.slice_index for s in store.slices}) == [3, 4, 5, 6]
    meta = json.loads((store.path / "store.json").read_text())
    assert meta["prepare_config"]["lesion_labels"] == [4] and meta["format"] == "brats2021"
    # only label 4 (the middle shell) counts: fewer lesion pixels than with all labels merged
    merged = SliceStore(prepare_dataset(PrepareConfig(format="brats2021", resolution=8, slice_range=(3, 7)), root, tmp_path / "m", progress=False))
    assert 0 < np.asarray(store.masks[:]).sum() < np.asarray(merged.masks[:]).sum()


def test_store_streams_into_batches(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    path = prepare_dataset(PrepareConfig(format="brats2021", resolution=16), root, tmp_path / "s", progress=False)
    dataset = SliceDataset(path)
    batch = collate_batch([dataset[i] for i in range(4)])
    assert batch.image.shape == (4, 4, 16, 16) and batch.mask.shape == (4, 1, 16, 16)
    assert batch.image.min() >= -1 and batch.image.max() <= 1


def test_prepare_streams_one_subject_at_a_time(tmp_path, monkeypatch):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    events: list[str] = []
    original_load = prepare_module.load_volume_subject
    original_add = prepare_module.SliceStoreWriter.add_subject

    def load(subject, *args, **kwargs):
        events.append(f"load {subject.subject_id}")
        return original_load(subject, *args, **kwargs)

    def add(self, subject_id, images, *args, **kwargs):
        events.append(f"add {subject_id} {images.shape[0]}")
        return original_add(self, subject_id, images, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "load_volume_subject", load)
    monkeypatch.setattr(prepare_module.SliceStoreWriter, "add_subject", add)
    prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, tmp_path / "s", progress=False)
    assert events == [e for k in range(3) for e in (f"load BraTS2021_0000{k}", f"add BraTS2021_0000{k} 8")]


def test_split_rule_matches_anofpdm_code():
    ids = [f"BraTS2021_{k:05d}" for k in range(1251)]
    splits = split_subjects(reversed(ids))  # input order does not matter
    assert [len(splits[k]) for k in ("train", "val", "test")] == [938, 62, 251]  # spec C.1
    reference = sorted(ids)
    random.seed(10)
    random.shuffle(reference)
    assert splits["train"] == reference[:938] and splits["val"] == reference[938:1000] and splits["test"] == reference[1000:]
    assert split_subjects(ids, seed=11) != splits
    counted = split_subjects(ids[:1254 - 3] + ["a", "b", "c"], counts=(939, 63, 252))
    assert [len(counted[k]) for k in ("train", "val", "test")] == [939, 63, 252]
    with pytest.raises(ValueError, match="sum"):
        split_subjects(ids, counts=(939, 63, 252))
    with_unlabelled = split_subjects(["a", "b", "c", "d"], fractions=(0.5, 0.25, 0.25), unlabelled=["d"])
    assert "d" in with_unlabelled["test"] and "d" not in with_unlabelled["train"] + with_unlabelled["val"]


def test_split_files_reuse_and_seed(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    config = PrepareConfig(format="brats2021", resolution=8, split_fractions=(0.34, 0.33, 0.33))
    first = SliceStore(prepare_dataset(config, root, tmp_path / "a", progress=False))
    again = SliceStore(prepare_dataset(config, root, tmp_path / "b", progress=False))
    assert all(first.split_subjects(k) == again.split_subjects(k) for k in ("train", "val", "test"))
    reused = SliceStore(
        prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, tmp_path / "c", progress=False, split_files=first.path / "splits")
    )
    assert all(first.split_subjects(k) == reused.split_subjects(k) for k in ("train", "val", "test"))
    with pytest.warns(UserWarning, match="not in this store"):
        read_split_files(first.path / "splits", ["BraTS2021_00000", "BraTS2021_00001"])


def test_overwrite_and_max_subjects(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    out = tmp_path / "s"
    prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, out, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(PrepareConfig(format="brats2021", resolution=8), root, out, progress=False)
    prepare_dataset(PrepareConfig(format="brats2021", resolution=8, max_subjects=2), root, out, overwrite=True, progress=False)
    assert len(SliceStore(out).subjects()) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="--format"):
        PrepareConfig().channel_names()
    with pytest.raises(ValueError, match="not one of them"):
        PrepareConfig(format="atlas", modalities=("flair",)).channel_names()
    with pytest.raises(ValueError, match="format"):
        PrepareConfig(format="brats2019")
    assert PrepareConfig(format="msd").channel_names() == MODALITIES
    assert PrepareConfig(format="folder", image_mode="RGB").channel_names() == ("red", "green", "blue")


def invoke(runner: CliRunner, args: list[str], **kwargs):
    """Run ``anomalydiff prepare ...`` (typer collapses an app with one command, so the name is then left out)."""
    is_group = len(app.registered_commands) + len(app.registered_groups) > 1 or app.registered_callback is not None
    return runner.invoke(app, (["prepare"] if is_group else []) + args, **kwargs)


def test_cli_prepare(tmp_path):
    root = ft.write_brats2021(tmp_path / "b21", count=3)
    runner = CliRunner()
    out = tmp_path / "store"
    result = invoke(
        runner,
        ["--format", "brats2021", "--root", str(root), "--out", str(out), "--modalities", "flair,t2",
         "--resolution", "8", "--slice-range", "4:8", "--split-seed", "3", "--set", "normalisation=volume", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = SliceStore(out)
    assert store.modalities == ["flair", "t2"] and store.shape == (12, 2, 8, 8)
    meta = json.loads((out / "store.json").read_text())
    assert meta["prepare_config"]["normalisation"] == "volume" and meta["prepare_config"]["split_seed"] == 3

    config_file = tmp_path / "prep.yaml"
    config_file.write_text("format: brats2021\nresolution: 8\nunknown_key: 1\n")
    bad = invoke(runner, ["--root", str(root), "--out", str(tmp_path / "x"), "--config", str(config_file)])
    assert bad.exit_code == 2 and "unknown_key" in bad.output
    no_format = invoke(runner, ["--root", str(root), "--out", str(tmp_path / "y")])
    assert no_format.exit_code == 2 and "--format" in no_format.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    helptext = invoke(runner, ["--help"], terminal_width=200)
    assert "anomalydiff prepare --format brats2021" in helptext.output
