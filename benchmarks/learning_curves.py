"""Learning curves of the committed phantom models, and their class signal measured on a larger validation set.

1. Plots (``docs/learning_curves.png``): training loss and every diagnostic of each part of a model folder
   (``models/phantom/*/loss.csv`` and ``diagnostics.csv``, written during training) against training steps and
   wall time. Needs no computation: the curves are committed with the weights.
2. With ``--store STORE`` it also re-measures the final weights' class signal on ``--slices`` label-balanced
   validation slices with ``--draws`` noise draws (the in-training diagnostics use 64 slices, so their AUROC moves
   by several points between checkpoints from sampling alone): the CFG model's implicit-classifier AUROC and
   accuracy (spec A.6), the noisy classifier's (A.7), and the healthy-only models' denoising-error AUROC, each with
   a bootstrap 95% interval over slices. Writes ``benchmarks/results/class_signal.json``.

Usage::

    .venv/bin/python benchmarks/learning_curves.py                                   # plots only
    .venv/bin/python benchmarks/learning_curves.py --store STORE --slices 512 --draws 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIMESTEPS = (100, 300, 500)


def plot(models: Path, out: Path) -> Path:
    """One row per part: loss vs step (log), its diagnostics vs step, the same vs wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    parts = [p for p in ("cfg", "classifier", "healthy_gaussian", "healthy_simplex") if (models / p / "loss.csv").exists()]
    fig, axes = plt.subplots(len(parts), 3, figsize=(14, 3.0 * len(parts)), squeeze=False)
    for i, part in enumerate(parts):
        loss = pd.read_csv(models / part / "loss.csv")
        smooth = loss["loss"].rolling(10, min_periods=1).mean()
        axes[i, 0].plot(loss["step"], smooth, color="black")
        axes[i, 0].set_yscale("log")
        axes[i, 0].set_ylabel(f"{part}\nloss (10-log mean)")
        diag_file = models / part / "diagnostics.csv"
        if diag_file.exists():
            diag = pd.read_csv(diag_file)
            metric = next((m for m in ("implicit_auroc", "classifier_auroc", "eps_mse_auroc") if m in set(diag["metric"])), None)
            if metric is not None:
                sub = diag[diag["metric"] == metric]
                for t, group in sub.groupby("t"):
                    group = group.sort_values("step")
                    axes[i, 1].plot(group["step"], group["value"], marker="o", ms=3, label=f"t={t}")
                    axes[i, 2].plot(group["wall_time"] / 3600.0, group["value"], marker="o", ms=3, label=f"t={t}")
                for ax in axes[i, 1:]:
                    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
                    ax.axhline(0.9, color="green", lw=0.6, ls=":")
                    ax.set_ylim(0.4, 1.0)
                    ax.set_ylabel(metric)
                    ax.legend(fontsize=7, loc="lower right")
        axes[i, 0].set_xlabel("step")
        axes[i, 1].set_xlabel("step")
        axes[i, 2].set_xlabel("wall time (h, 2 shared CPU cores)")
    shown = models.resolve().relative_to(ROOT) if models.resolve().is_relative_to(ROOT) else models
    fig.suptitle(f"learning curves of {shown} (diagnostics on 64 validation slices; dotted line: 0.9 target)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _bootstrap(labels: np.ndarray, score: np.ndarray, rounds: int = 500, seed: int = 0) -> tuple[float, float, float]:
    """AUROC and its bootstrap 95% interval over slices (scikit-learn roc_auc_score)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            values.append(roc_auc_score(labels[idx], score[idx]))
    return float(roc_auc_score(labels, score)), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def measure(models: Path, store_path: Path, slices: int, draws: int, split: str) -> dict:
    """Class-signal scores of the final weights: per part and t, AUROC [95% CI] and accuracy."""
    import torch

    from anomalydiff.data.store import SliceStore
    from anomalydiff.diffusion.steps import q_sample
    from anomalydiff.evaluation.models import load_parts
    from anomalydiff.labels import HEALTHY, UNHEALTHY
    from anomalydiff.training.diagnostics import select_validation_subset

    parts = load_parts(models)
    store = SliceStore(store_path)
    x0, labels = select_validation_subset(store, split, slices, seed=0)
    y = labels.numpy()
    schedule = parts.schedule
    generator = torch.Generator().manual_seed(1234)
    result: dict = {"slices": int(len(y)), "unhealthy": int(y.sum()), "draws": draws, "split": split, "parts": {}}
    scores: dict[str, dict[int, np.ndarray]] = {}
    with torch.no_grad():
        for t in TIMESTEPS:
            sums = {"cfg": np.zeros(len(y)), "classifier": np.zeros(len(y)), "healthy_gaussian": np.zeros(len(y))}
            for _ in range(draws):
                noise = torch.randn(x0.shape, generator=generator)
                for start in range(0, len(y), 32):
                    xb, nb = x0[start:start + 32], noise[start:start + 32]
                    tb = torch.full((len(xb),), t, dtype=torch.long)
                    xt = q_sample(schedule, xb, tb, nb)
                    sl = slice(start, start + len(xb))
                    if parts.eps_model is not None:
                        err = [((parts.eps_model(xt, tb, torch.full_like(tb, lab)) - nb) ** 2).mean((1, 2, 3)) for lab in (HEALTHY, UNHEALTHY)]
                        sums["cfg"][sl] += (err[0] - err[1]).numpy()  # > 0: the unhealthy label explains x_t better
                    if parts.classifier is not None:
                        sums["classifier"][sl] += torch.softmax(parts.classifier(xt, tb), 1)[:, UNHEALTHY].numpy()
                    if parts.healthy_model is not None:
                        sums["healthy_gaussian"][sl] += ((parts.healthy_model(xt, tb) - nb) ** 2).mean((1, 2, 3)).numpy()
            for name, total in sums.items():
                scores.setdefault(name, {})[t] = total / draws
    names = {"cfg": "implicit classifier: err(healthy) - err(unhealthy)", "classifier": "p(unhealthy | x_t, t)",
             "healthy_gaussian": "denoising error of the healthy-only model"}
    thresholds = {"cfg": 0.0, "classifier": 0.5}
    for name, per_t in scores.items():
        if {"cfg": parts.eps_model, "classifier": parts.classifier, "healthy_gaussian": parts.healthy_model}[name] is None:
            continue
        rows = {}
        for t, score in per_t.items():
            auroc, low, high = _bootstrap(y, score)
            row = {"auroc": round(auroc, 4), "auroc_95ci": [round(low, 4), round(high, 4)]}
            if name in thresholds:
                row["accuracy"] = round(float(((score > thresholds[name]).astype(int) == y).mean()), 4)
            rows[str(t)] = row
        result["parts"][name] = {"score": names[name], "sha256": parts.sha256[name], "step": parts.parts[name].step, "per_t": rows}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(ROOT / "models/phantom"))
    parser.add_argument("--plot", default=str(ROOT / "docs/learning_curves.png"))
    parser.add_argument("--store", default=None, help="a store with the models' validation split (measure the final weights)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/class_signal.json"))
    args = parser.parse_args()
    print(f"wrote {plot(Path(args.models), Path(args.plot))}")
    if args.store:
        started = time.perf_counter()
        result = measure(Path(args.models), Path(args.store), args.slices, args.draws, args.split)
        from anomalydiff.training.export import machine_description

        result.update({"store": args.store, "seconds": round(time.perf_counter() - started, 1), "machine": machine_description(),
                       "command": f"python benchmarks/learning_curves.py --store STORE --slices {args.slices} --draws {args.draws}"})
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result["parts"], indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
