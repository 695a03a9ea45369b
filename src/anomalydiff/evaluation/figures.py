"""Figures of the benchmark and the report (matplotlib, Agg backend; PNG files).

- :func:`plot_stride_curve`: AnoFPDM quality vs cost over ``step_stride`` (seconds and NFE per slice).
- :func:`plot_guidance_ablation`: test Dice vs guidance strength w, with the validation accuracy, the
  ``accuracy_ratio x peak`` line of the selection rule and the selected w marked (spec C.6, Fig. 5a/b).
- :func:`plot_end_step_ablation`: Dice vs end-step ratio (spec C.7, Fig. 5c).
- :func:`plot_threshold_ablation`: Algorithm 1 vs fixed thresholds (spec C.8, Fig. 5d).
- :func:`plot_examples`: good / median / failed cases of one run: input | healthy-guided prediction or
  reconstruction | anomaly map | predicted mask | ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from anomalydiff.labels import UNHEALTHY  # noqa: E402
from anomalydiff.metrics import dice_from_counts, overlap_counts  # noqa: E402

__all__ = [
    "plot_end_step_ablation",
    "plot_examples",
    "plot_guidance_ablation",
    "plot_stride_curve",
    "plot_threshold_ablation",
    "select_examples",
]

_SETUP_STYLE = {"mixed": ("tab:blue", "o"), "unhealthy": ("tab:red", "s")}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _percent(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * float(v) for v in values], dtype=float)


def plot_stride_curve(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Quality (Dice, AUPRC; mixed and unhealthy) against seconds and NFE per slice, one point per stride.

    Args:
        points: stride-curve points (``step_stride``, ``seconds_per_slice``, ``nfe_per_slice``,
            ``{mixed,unhealthy}_{dice,auprc}``).
        path: PNG to write.

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, xlabel in ((axes[0], "seconds_per_slice", "seconds per slice"), (axes[1], "nfe_per_slice", "NFE per slice")):
        x = np.array([p[cost] for p in points], dtype=float)
        for setup, (color, marker) in _SETUP_STYLE.items():
            ax.plot(x, _percent([p.get(f"{setup}_dice") for p in points]), marker=marker, color=color, label=f"{setup} Dice")
            ax.plot(x, _percent([p.get(f"{setup}_auprc") for p in points]), marker=marker, color=color, ls="--",
                    alpha=0.7, label=f"{setup} AUPRC")
        for p, xi in zip(points, x):
            ax.annotate(f"stride {p['step_stride']}", (xi, 100 * (p.get("unhealthy_dice") or 0)), fontsize=7,
                        textcoords="offset points", xytext=(3, -10))
        if np.all(x > 0) and x.max() > 8 * x.min():
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("AnoFPDM: quality vs speed over step_stride (each stride fitted on validation)")
    return _save(fig, path)


def plot_guidance_ablation(guidance: dict[str, Any], path: str | Path) -> Path:
    """Test Dice vs w, validation accuracy vs w, the selection rule's line and the selected w.

    Args:
        guidance: output of ``benchmark.ablation_guidance``.
        path: PNG to write.

    Returns:
        ``path``.
    """
    points = guidance["points"]
    w = np.array([p["guidance_w"] for p in points])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for setup, (color, marker) in _SETUP_STYLE.items():
        ax.plot(w, _percent([p[f"{setup}_dice"] for p in points]), marker=marker, color=color, label=f"test {setup} Dice")
    ax.set_xlabel("guidance strength w")
    ax.set_ylabel("Dice (%)")
    twin = ax.twinx()
    accuracy = _percent([p["val_accuracy"] for p in points])
    twin.plot(w, accuracy, color="tab:green", marker="^", ls=":", label="validation accuracy")
    rule = 100 * guidance["accuracy_ratio"] * guidance["peak_accuracy"]
    twin.axhline(rule, color="tab:green", lw=0.8, alpha=0.6)
    twin.annotate(f"{guidance['accuracy_ratio']:g} x peak", (w.min(), rule), fontsize=7, color="tab:green",
                  textcoords="offset points", xytext=(2, 3))
    twin.set_ylabel("validation accuracy (%)", color="tab:green")
    ax.axvline(guidance["chosen_w"], color="k", ls="--", lw=1)
    ax.annotate(f"selected w = {guidance['chosen_w']:g}", (guidance["chosen_w"], ax.get_ylim()[1]), fontsize=8,
                textcoords="offset points", xytext=(4, -12))
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(f"AnoFPDM: Dice vs w ({guidance.get('slices', '?')} test slices); w chosen on validation only")
    return _save(fig, path)


def plot_end_step_ablation(end_step: dict[str, Any], path: str | Path) -> Path:
    """Dice vs end-step ratio r (AAM over [0, round(r t_e))), with r = 1 (the dynamic t_e) marked.

    Args:
        end_step: output of ``benchmark.ablation_end_step``.
        path: PNG to write.

    Returns:
        ``path``.
    """
    points = end_step["points"]
    r = np.array([p["ratio"] for p in points])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for setup, (color, marker) in _SETUP_STYLE.items():
        ax.plot(r, _percent([p[f"{setup}_dice"] for p in points]), marker=marker, color=color, label=f"{setup} Dice")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="dynamic t_e (r = 1)")
    ax.set_xlabel("end-step ratio r")
    ax.set_ylabel("Dice (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"AnoFPDM: Dice vs end step ({end_step.get('slices', '?')} test slices)")
    return _save(fig, path)


def plot_threshold_ablation(thresholds: dict[str, Any], path: str | Path) -> Path:
    """Dice of fixed thresholds on the AnoFPDM maps vs Algorithm 1's dynamic threshold.

    Args:
        thresholds: output of ``benchmark.ablation_thresholds``.
        path: PNG to write.

    Returns:
        ``path``.
    """
    points = thresholds["points"]
    tau = np.array([p["threshold"] for p in points])
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for setup, (color, marker) in _SETUP_STYLE.items():
        ax.plot(tau, _percent([p[f"{setup}_dice"] for p in points]), marker=marker, ms=3, color=color,
                label=f"fixed: {setup} Dice")
        ax.axhline(100 * thresholds["dynamic"][f"{setup}_dice"], color=color, ls="--", label=f"dynamic: {setup} Dice")
    if np.all(tau > 0) and tau.max() > 8 * tau.min():
        ax.set_xscale("log")
    ax.set_xlabel("fixed threshold on the aggregated map")
    ax.set_ylabel("Dice (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"AnoFPDM: dynamic (Algorithm 1) vs fixed thresholds ({thresholds.get('slices', '?')} slices)")
    return _save(fig, path)


def select_examples(maps: dict[str, np.ndarray], mask_key: str = "pred_mask") -> dict[str, int]:
    """Good, median and failed cases: the best, median and worst per-slice Dice among GT-unhealthy slices.

    Args:
        maps: arrays of a ``maps.npz`` (``gt_mask``, ``label`` and ``mask_key``).
        mask_key: the un-gated predicted masks to rank by.

    Returns:
        ``{"good": i, "median": j, "failed": k}`` slice positions (ranked over all slices if fewer than three
        are unhealthy).
    """
    pred, gt, labels = maps[mask_key], maps["gt_mask"], maps["label"]
    candidates = np.flatnonzero(labels == UNHEALTHY)
    if candidates.size < 3:  # too few unhealthy slices for three distinct cases: rank every slice
        candidates = np.arange(labels.shape[0])
    dice = dice_from_counts(*overlap_counts(pred[candidates], gt[candidates]))
    order = candidates[np.argsort(dice, kind="stable")]
    return {"good": int(order[-1]), "median": int(order[order.size // 2]), "failed": int(order[0])}


def plot_examples(maps: dict[str, np.ndarray], path: str | Path, title: str, mask_key: str = "pred_mask") -> dict[str, int]:
    """Example panel: rows good / median / failed; columns input | healthy prediction | map | mask | GT.

    Args:
        maps: arrays of a ``maps.npz`` written by ``run_method``.
        path: PNG to write.
        title: figure title (the method).
        mask_key: which predicted masks to show (un-gated primary masks by default).

    Returns:
        The chosen slice positions (see :func:`select_examples`).
    """
    chosen = select_examples(maps, mask_key)
    columns = ("input", "healthy prediction / reconstruction", "anomaly map", "predicted mask", "ground truth")
    fig, axes = plt.subplots(3, 5, figsize=(12.5, 7.8))
    map_values = maps["anomaly_map"].astype(np.float32)
    for row, (case, index) in enumerate(chosen.items()):
        image = maps["image"][index, 0].astype(np.float32)
        counterfactual = maps["counterfactual"][index, 0].astype(np.float32) if "counterfactual" in maps else None
        pred, gt = maps[mask_key][index, 0], maps["gt_mask"][index, 0]
        dice = float(dice_from_counts(*overlap_counts(pred[None, None], gt[None, None]))[0])
        gate = int(maps["pred_label"][index]) if "pred_label" in maps else -1
        panels = (image, counterfactual, map_values[index, 0], pred, gt)
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            elif col in (0, 1):
                ax.imshow(panel, cmap="gray", vmin=-1, vmax=1)
            elif col == 2:
                ax.imshow(panel, cmap="inferno")
            else:
                ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
                ax.imshow(np.ma.masked_where(~panel.astype(bool), panel), cmap="autumn", alpha=0.75, vmin=0, vmax=1)
                if not panel.any():
                    ax.text(0.03, 0.04, "empty", color="w", fontsize=8, transform=ax.transAxes)
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        gate_text = "" if gate < 0 else (" | gate: unhealthy" if gate == 1 else " | gate: healthy")
        axes[row, 0].set_ylabel(f"{case}\nslice {index}, Dice {100 * dice:.0f}%{gate_text}", fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
    return chosen
