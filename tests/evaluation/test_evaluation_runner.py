"""run_method end to end for every method, checked against independent computations (numpy, scipy, sklearn)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score

from anomalydiff.data.store import SliceStore
from anomalydiff.evaluation import EvaluationConfig, build_method_from_parts, load_parts, load_result, run_method, sample_rows
from anomalydiff.evaluation.runner import iter_batches
from anomalydiff.labels import HEALTHY, UNHEALTHY

from evaluation_helpers import TINY_OVERRIDES

CONFIG = EvaluationConfig(max_slices=10, val_slices=8, balanced_val=True, batch_size=10)


@pytest.fixture(scope="module")
def parts(model_dir: Path):  # noqa: ANN201
    return load_parts(model_dir)


def _dice(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-slice Dice with delta = 1e-6 (spec C.10), written out with numpy."""
    inter = (pred & gt).reshape(len(pred), -1).sum(1)
    return (2 * inter + 1e-6) / (pred.reshape(len(pred), -1).sum(1) + gt.reshape(len(gt), -1).sum(1) + 1e-6)


def test_sample_rows_distinct_reproducible_balanced(tiny_store: Path) -> None:
    store = SliceStore(tiny_store)
    test_rows = set(store.rows("test").tolist())
    first = sample_rows(store, "test", 10, seed=3)
    assert len(set(first.tolist())) == 10 and set(first.tolist()) <= test_rows
    np.testing.assert_array_equal(first, sample_rows(store, "test", 10, seed=3))
    assert not np.array_equal(first, sample_rows(store, "test", 10, seed=4))
    balanced = sample_rows(store, "test", 6, seed=0, balanced=True)
    labels = [store.slices[int(r)].label for r in balanced]
    assert labels.count(HEALTHY) == labels.count(UNHEALTHY) == 3
    everything = sample_rows(store, "val", None, seed=0)
    assert sorted(everything.tolist()) == sorted(store.rows("val").tolist())
    with pytest.raises(ValueError, match="no slice"):
        sample_rows(_EmptySplit(store), "test", 5, 0)


class _EmptySplit:
    """A store whose splits are empty (sample_rows must say so)."""

    def __init__(self, store: SliceStore) -> None:
        self.path = store.path

    def rows(self, split: str) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize(
    ("preset", "native", "uses_pixel_labels"),
    [
        ("anofpdm_ddim", True, False),
        ("wolleb_p1", True, False),
        ("wolleb_p2", False, True),
        ("anoddpm_simplex", False, True),
        ("ddib", False, True),
        ("cgcdm", True, False),
    ],
)
def test_run_method_end_to_end(
    preset: str, native: bool, uses_pixel_labels: bool, parts, tiny_store: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    method, _ = build_method_from_parts(preset, parts, TINY_OVERRIDES[preset])
    seen: list[str] = []
    fit = method.fit

    def spying_fit(batches):  # noqa: ANN001, ANN202 - records which subjects fitting sees
        def recorded():  # noqa: ANN202
            for batch in batches:
                seen.extend(batch.subject_id)
                yield batch

        return fit(recorded())

    method.fit = spying_fit
    result = run_method(method, tiny_store, CONFIG, out_dir=tmp_path, name=preset, progress=False)
    store = SliceStore(tiny_store)
    val_subjects, test_subjects = set(store.split_subjects("val")), set(store.split_subjects("test"))

    # fitting never sees the scored split (AnoFPDM's fit iterates; policies are fitted on val maps)
    assert set(seen) <= val_subjects
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert set(calibration["val_rows"]) <= set(store.rows("val").tolist())
    if not native:
        assert set(result.policies) == {"oracle_dice", "healthy_quantile"}
        assert result.evaluations["healthy_quantile"]["policy"]["uses_pixel_labels"] is False
    assert result.primary == ("native" if native else "oracle_dice")
    assert result.uses_pixel_labels() is uses_pixel_labels
    assert result.cost["nfe_per_slice"] > 0 and result.cost["seconds_per_slice"] > 0
    assert result.cost["peak_memory_mb"] > 10

    # files
    maps = np.load(tmp_path / "maps.npz")
    assert maps["anomaly_map"].dtype == np.float16 and maps["anomaly_map"].shape == (10, 1, 32, 32)
    assert set(maps["subject_id"].tolist()) <= test_subjects and len(set(maps["row"].tolist())) == 10
    loaded = load_result(tmp_path)
    assert loaded.primary == result.primary and loaded.reports()["mixed"].values == pytest.approx(
        result.reports()["mixed"].values, nan_ok=True
    )

    # every mask went through the CC filter: no 8-connected component of <= 40 pixels
    for mask in maps["pred_mask"][:, 0]:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert all((labelled == k).sum() > 40 for k in range(1, count + 1))

    # metrics recomputed independently from the written files (numpy Dice, sklearn AUPRC)
    gt, label = maps["gt_mask"], maps["label"]
    reports = result.reports()
    np.testing.assert_allclose(reports["mixed"]["dice"], _dice(maps["pred_mask_gated"], gt).mean(), rtol=1e-9)
    unhealthy = label == UNHEALTHY
    np.testing.assert_allclose(reports["unhealthy"]["dice"], _dice(maps["pred_mask"][unhealthy], gt[unhealthy]).mean(),
                               rtol=1e-9)
    images = np.stack([np.asarray(store.images[int(r)], dtype=np.float32) for r in maps["row"]])
    foreground = images.mean(axis=1, keepdims=True) > -0.95
    scores = maps["anomaly_map"].astype(np.float32)
    expected_ap = average_precision_score(gt[foreground], scores[foreground])
    assert reports["mixed"]["auprc"] == pytest.approx(expected_ap, abs=0.02)
    if maps["pred_label"].min() >= 0:  # gated method: healthy-gated slices have empty mixed masks
        assert not maps["pred_mask_gated"][maps["pred_label"] == HEALTHY].any()


def test_shared_median_filter_where_the_method_has_none(parts, tiny_store: Path) -> None:  # noqa: ANN001
    """wolleb_p1 has no filter of its own: the runner applies the 5x5 median (scipy mode='mirror' = torch reflect)."""
    method, _ = build_method_from_parts("wolleb_p1", parts, TINY_OVERRIDES["wolleb_p1"])
    config = EvaluationConfig(max_slices=6, val_slices=4, batch_size=6)
    result = run_method(method, tiny_store, config, progress=False)
    store = SliceStore(tiny_store)
    rows = sample_rows(store, "test", 6, seed=0)
    batch = next(iter_batches(store, rows, 6))
    raw = method.score(batch).anomaly_map.numpy()
    expected = ndimage.median_filter(raw, size=(1, 1, 5, 5), mode="mirror")
    with torch.no_grad():
        from anomalydiff.evaluation.runner import score_slices

        scored = score_slices(method, store, rows, config, progress=False)
    np.testing.assert_allclose(scored.anomaly_map, expected, rtol=1e-6, atol=1e-7)
    # and its Otsu mask follows the filtered map: recompute with skimage on the filtered maps
    from skimage.filters import threshold_otsu

    for image_map, mask in zip(scored.anomaly_map[:, 0], scored.native_mask[:, 0]):
        otsu = image_map > threshold_otsu(image_map.reshape(-1))
        labelled, count = ndimage.label(otsu, structure=np.ones((3, 3)))
        kept = np.isin(labelled, [k for k in range(1, count + 1) if (labelled == k).sum() > 40])
        np.testing.assert_array_equal(mask, kept)
    assert result.primary == "native"


def test_loaded_calibration_skips_fit(parts, tiny_store: Path) -> None:  # noqa: ANN001
    first, _ = build_method_from_parts("anofpdm_ddim", parts, TINY_OVERRIDES["anofpdm_ddim"])
    config = EvaluationConfig(max_slices=2, val_slices=6, balanced_val=True, batch_size=6)
    a = run_method(first, tiny_store, config, progress=False)
    second, _ = build_method_from_parts("anofpdm_ddim", parts, [*TINY_OVERRIDES["anofpdm_ddim"], "single_sam=true"])
    second.fit = None  # must not be called
    b = run_method(second, tiny_store, config, calibration=a.calibration, progress=False)
    assert b.cost["fit"] == "loaded" and b.calibration["guidance_w"] == a.calibration["guidance_w"]
    assert a.calibration["model"] == parts.parts["cfg"].model_id


def test_policy_needing_pixel_labels_is_refused_without_them(parts, tmp_path: Path) -> None:  # noqa: ANN001
    from anomalydiff.data.store import SliceStoreWriter

    writer = SliceStoreWriter(tmp_path / "nomask", 4, 32, 32, ["flair", "t1", "t1ce", "t2"])
    rng = np.random.default_rng(0)
    for s in range(3):
        images = rng.uniform(-0.5, 0.5, (4, 4, 32, 32)).astype(np.float32)
        writer.add_subject(f"s{s}", images, None, np.ones((4, 32, 32), bool), range(4), [0, 1, 0, 1])
    store = writer.close({"train": ["s0"], "val": ["s1"], "test": ["s2"]})
    method, _ = build_method_from_parts("anoddpm_gauss", parts, TINY_OVERRIDES["anoddpm_gauss"])
    with pytest.raises(ValueError, match="needs pixel labels"):
        run_method(method, store, EvaluationConfig(batch_size=4), progress=False)
