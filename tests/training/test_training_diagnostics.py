"""Diagnostics on analytic models with known answers, and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from anomalydiff.data.store import SliceStore
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import NULL_LABEL
from anomalydiff.training.diagnostics import (
    append_diagnostics,
    implicit_classifier_metrics,
    noisy_classifier_metrics,
    plot_diagnostics,
    select_validation_subset,
    unconditional_denoising_metrics,
)

SCHEDULE = make_schedule(ScheduleConfig(num_timesteps=50))
MEANS = torch.tensor([-0.5, 0.5], dtype=torch.float64)  # class y images are the constant MEANS[y]


def _two_class_data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 2
    return MEANS[labels].view(-1, 1, 1, 1).expand(n, 1, 8, 8).clone(), labels


def oracle_eps(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact eps when x0 is the constant image of class y: (x_t - sqrt(ab) mu_y) / sqrt(1 - ab)."""
    ab = SCHEDULE.alpha_bar[t].view(-1, 1, 1, 1).to(x_t.dtype)
    mu = MEANS.to(x_t.dtype)[y.clamp(max=1)].view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * mu) / (1 - ab).sqrt()


def label_blind_eps(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return oracle_eps(x_t, t, torch.zeros_like(y))


def _by_metric(rows: list[dict]) -> dict[tuple[str, int], float]:
    return {(r["metric"], r["t"]): r["value"] for r in rows}


def test_implicit_classifier_of_an_oracle_is_perfect_and_of_a_blind_model_is_chance() -> None:
    x0, labels = _two_class_data()
    x0 = x0.double()
    oracle = _by_metric(implicit_classifier_metrics(oracle_eps, SCHEDULE, x0, labels, (5, 25, 45), 2, 0, 4))
    for t in (5, 25, 45):
        assert oracle[("implicit_acc", t)] == 1.0 and oracle[("implicit_auroc", t)] == 1.0
        assert oracle[("eps_mse", t)] < 1e-12  # the true label's prediction is exact
    blind = _by_metric(implicit_classifier_metrics(label_blind_eps, SCHEDULE, x0, labels, (5, 25), 2, 0, 4))
    for t in (5, 25):
        # identical errors for both labels: ties count as healthy (acc = share of healthy), AUROC = 0.5
        assert blind[("implicit_acc", t)] == 0.5 and blind[("implicit_auroc", t)] == 0.5
        assert blind[("eps_mse", t)] > 0


def test_noisy_classifier_metrics_in_range_and_perfect_at_low_noise() -> None:
    x0, labels = _two_class_data()

    def classifier(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = x_t.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1) * 10

    rows = _by_metric(noisy_classifier_metrics(classifier, SCHEDULE, x0, labels, (1, 25, 49), 3, 0, 3))
    assert rows[("classifier_acc", 1)] == 1.0 and rows[("classifier_auroc", 1)] == 1.0
    for (metric, t), value in rows.items():
        assert 0.0 <= value <= 1.0


def test_unconditional_metrics_in_range() -> None:
    x0, labels = _two_class_data()
    seen_labels = []

    def healthy_model(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen_labels.append(y)
        return oracle_eps(x_t, t, torch.zeros_like(y))  # knows the healthy image only

    for noise in ("gaussian", "simplex"):
        rows = _by_metric(unconditional_denoising_metrics(healthy_model, SCHEDULE, x0.double(), labels, (10, 40), 2, 0, 8, noise))
        for t in (10, 40):
            assert rows[("eps_mse", t)] >= 0
            assert rows[("eps_mse_auroc", t)] == 1.0  # unhealthy slices are the badly denoised ones
    assert all(bool((y == NULL_LABEL).all()) for y in seen_labels)


def test_validation_subset_is_balanced_and_fixed(tiny_store: Path) -> None:
    store = SliceStore(tiny_store)
    x0, labels = select_validation_subset(store, "val", 6, seed=1)
    assert x0.shape == (6, 1, 32, 32) and int(labels.sum()) == 3
    again, _ = select_validation_subset(store, "val", 6, seed=1)
    assert torch.equal(x0, again)
    x_all, labels_all = select_validation_subset(store, "train", 1000, seed=1)
    assert x_all.shape[0] == 32 and int(labels_all.sum()) == 16  # capped at the split size


def test_append_and_plot(tmp_path: Path) -> None:
    for step, wall in ((10, 5.0), (20, 11.0)):
        append_diagnostics(tmp_path, step, wall, [
            {"t": 100, "metric": "implicit_auroc", "value": 0.5 + step / 100},
            {"t": 300, "metric": "implicit_auroc", "value": float("nan")},
            {"t": 100, "metric": "eps_mse", "value": 1.0 / step},
        ])
    lines = (tmp_path / "diagnostics.csv").read_text().splitlines()
    assert lines[0] == "step,wall_time,t,metric,value" and len(lines) == 7 and "nan" in lines[2]
    png = plot_diagnostics(tmp_path)
    assert png == tmp_path / "diagnostics.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(float(lines[1].split(",")[-1]))
