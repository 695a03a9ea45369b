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
    """Class-signal scores of the final weights: per part and t, AUROC [95% CI] and accuracy.

    The per-slice scores are the training diagnostics' own (``anomalydiff.training.diagnostics``: the same noise
    draws, errors and probabilities), on a larger sample and with a bootstrap interval.
    """
    from anomalydiff.data.store import SliceStore
    from anomalydiff.evaluation.models import load_parts
    from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
    from anomalydiff.training.diagnostics import (
        classifier_probabilities,
        denoising_errors,
        select_validation_subset,
    )

    parts = load_parts(models)
    x0, labels = select_validation_subset(SliceStore(store_path), split, slices, seed=0)
    y = labels.numpy()
    schedule = parts.schedule

    def implicit(t: int) -> tuple[np.ndarray, np.ndarray]:
        err = denoising_errors(parts.eps_model, schedule, x0, t, (HEALTHY, UNHEALTHY), draws)
        return (err[:, 0] - err[:, 1]).numpy(), (err[:, 1] < err[:, 0]).long().numpy()  # > 0: unhealthy fits better

    def noisy(t: int) -> tuple[np.ndarray, np.ndarray]:
        prob = classifier_probabilities(parts.classifier, schedule, x0, t, draws)
        return prob[:, UNHEALTHY].numpy(), prob.argmax(dim=1).numpy()

    def healthy(t: int) -> tuple[np.ndarray, None]:
        return denoising_errors(parts.healthy_model, schedule, x0, t, (NULL_LABEL,), draws)[:, 0].numpy(), None

    scorers = {  # part -> (network, what the score is, t -> (score [N], predicted label [N] or None))
        "cfg": (parts.eps_model, "implicit classifier: err(healthy) - err(unhealthy)", implicit),
        "classifier": (parts.classifier, "p(unhealthy | x_t, t)", noisy),
        "healthy_gaussian": (parts.healthy_model, "denoising error of the healthy-only model", healthy),
    }
    result: dict = {"slices": len(y), "unhealthy": int(y.sum()), "draws": draws, "split": split, "parts": {}}
    for name, (network, description, scorer) in scorers.items():
        if network is None:
            continue
        rows = {}
        for t in TIMESTEPS:
            score, pred = scorer(t)
            auroc, low, high = _bootstrap(y, score)
            row = {"auroc": round(auroc, 4), "auroc_95ci": [round(low, 4), round(high, 4)]}
            if pred is not None:
                row["accuracy"] = round(float((pred == y).mean()), 4)
            rows[str(t)] = row
        result["parts"][name] = {"score": description, "sha256": parts.sha256[name], "step": parts.parts[name].step, "per_t": rows}
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
        from anomalydiff.machine import describe_machine

        result.update({"store": args.store, "seconds": round(time.perf_counter() - started, 1), "machine": describe_machine(),
                       "command": f"python benchmarks/learning_curves.py --store STORE --slices {args.slices} --draws {args.draws}"})
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result["parts"], indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
