"""Has a model learned the class difference? Cheap checks run during training on a fixed validation subset.

(a) **Implicit classifier of the CFG model** (spec A.6): for slices noised to ``t`` with noise ``eps``, the
    label whose noise prediction is closer to the truth,
    ``err_y = mean_pixels (eps_theta(x_t, t, y) - eps)^2`` for y in {HEALTHY, UNHEALTHY}, averaged over a few
    noise draws. Accuracy of ``argmin_y err_y`` (ties count as healthy) and AUROC of
    ``err_healthy - err_unhealthy`` against the true label (scikit-learn ``roc_auc_score``). A model that
    ignores y scores 0.5.
(b) **Noisy classifier** (spec A.7): accuracy of ``argmax`` of the draw-averaged softmax and AUROC of
    ``p(unhealthy | x_t, t)``.
(c) **Denoising error** ``eps_mse`` at each t (the validation loss), and for unconditional models
    ``eps_mse_auroc``: AUROC of the per-slice error against the label (above 0.5 when unhealthy slices are
    harder to denoise for a healthy-only model).

The subset and every noise draw are fixed by a seed, so values at different training steps compare the same
inputs. Rows go to ``RUN/diagnostics.csv`` as (step, wall_time, t, metric, value);
:func:`plot_diagnostics` draws them against steps and wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomalydiff.data.store import SliceStore
from anomalydiff.diffusion.noise import SimplexConfig, simplex_noise
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.diffusion.steps import q_sample
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.methods.base import Classifier, EpsModel
from anomalydiff.training.checkpoint import DIAGNOSTICS_COLUMNS, CsvLog
from anomalydiff.training.distributed import derive_seed

NoiseKind = Literal["gaussian", "simplex"]
Row = dict[str, float | int | str]


def select_validation_subset(
    store: SliceStore, split: str, num_slices: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded subset of a split: half healthy, half unhealthy where the split allows.

    Args:
        store: the slice store.
        split: ``train`` / ``val`` / ``test``.
        num_slices: subset size (fewer if the split is smaller).
        seed: fixes the choice.

    Returns:
        x0 ``[N, C, H, W]`` float32 and labels ``[N]`` long (CPU), ordered by store row.

    Raises:
        ValueError: the split has no slice.
    """
    rng = np.random.default_rng(derive_seed(seed, 0))
    healthy, unhealthy = store.rows(split, HEALTHY), store.rows(split, UNHEALTHY)
    if len(healthy) + len(unhealthy) == 0:
        raise ValueError(f"{store.path}: split {split!r} has no slice for diagnostics; set diagnostics.split")
    n_unhealthy = min(len(unhealthy), max(num_slices // 2, num_slices - len(healthy)))
    n_healthy = min(len(healthy), num_slices - n_unhealthy)
    rows = np.sort(
        np.concatenate([rng.choice(healthy, n_healthy, replace=False), rng.choice(unhealthy, n_unhealthy, replace=False)])
    )
    x0 = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))
    labels = torch.tensor([store.slices[int(r)].label for r in rows], dtype=torch.long)
    return x0, labels


def _noise(
    kind: NoiseKind, x0: torch.Tensor, t: int, seed: int, draw: int, simplex: SimplexConfig
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, draw, 1))
    if kind == "simplex":
        t_batch = torch.full((x0.shape[0],), t, dtype=torch.long)
        return simplex_noise(tuple(x0.shape), t_batch, simplex, generator=generator, dtype=x0.dtype)
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype)


def _auroc(labels: torch.Tensor, score: torch.Tensor) -> float:
    y = labels.cpu().numpy()
    if len(np.unique(y)) < 2:
        return float("nan")  # AUROC is undefined with one class present
    return float(roc_auc_score(y, score.double().cpu().numpy()))


def _accuracy_auroc_rows(t: int, name: str, pred: torch.Tensor, score: torch.Tensor, labels: torch.Tensor) -> list[Row]:
    """Rows ``{name}_acc`` (accuracy of ``pred [N]``) and ``{name}_auroc`` (AUROC of ``score [N]``) at ``t``."""
    return [
        {"t": t, "metric": f"{name}_acc", "value": float((pred == labels).float().mean())},
        {"t": t, "metric": f"{name}_auroc", "value": _auroc(labels, score)},
    ]


def _batched(model: Callable[..., torch.Tensor], batch_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    device = _device_of(model)
    outs = []
    for i in range(0, tensors[0].shape[0], batch_size):
        outs.append(model(*(x[i : i + batch_size].to(device) for x in tensors)).float().cpu())
    return torch.cat(outs)


def _device_of(model: Callable[..., torch.Tensor]) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def denoising_errors(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: int,
    labels_to_try: tuple[int, ...],
    noise_draws: int = 2,
    seed: int = 1234,
    batch_size: int = 32,
    noise: NoiseKind = "gaussian",
    simplex: SimplexConfig = SimplexConfig(),
) -> torch.Tensor:
    """Per-slice noise-prediction error ``mean_pixels (eps_theta(x_t, t, y) - eps)^2`` averaged over draws.

    Args:
        eps_model: ``eps_model(x_t, t, y) -> eps``.
        schedule: the noise schedule.
        x0: ``[N, C, H, W]`` clean slices (CPU).
        t: training timestep.
        labels_to_try: the labels y the model is asked with (e.g. ``(HEALTHY, UNHEALTHY)``).
        noise_draws: number of noise draws averaged.
        seed: fixes the noise (the same draws for every y: a paired comparison).
        batch_size: evaluation batch size.
        noise: ``gaussian`` eps (A.5) or ``simplex`` noise (D.1).
        simplex: simplex noise settings.

    Returns:
        ``[N, len(labels_to_try)]`` float32 errors.
    """
    n = x0.shape[0]
    t_batch = torch.full((n,), t, dtype=torch.long)
    errors = torch.zeros(n, len(labels_to_try))
    for draw in range(noise_draws):
        eps = _noise(noise, x0, t, seed, draw, simplex)
        # 1. x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (spec A.2)
        x_t = q_sample(schedule, x0, t_batch, eps)
        for j, label in enumerate(labels_to_try):
            y = torch.full((n,), label, dtype=torch.long)
            # 2. err_y = mean over pixels (eps_theta(x_t, t, y) - eps)^2 (the A.5 loss per slice)
            eps_pred = _batched(eps_model, batch_size, x_t, t_batch, y)
            errors[:, j] += (eps_pred - eps).pow(2).flatten(1).mean(1) / noise_draws
    return errors


def implicit_classifier_metrics(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: tuple[int, ...] = (100, 300, 500),
    noise_draws: int = 2,
    seed: int = 1234,
    batch_size: int = 32,
) -> list[Row]:
    """(a) accuracy / AUROC of the CFG model's implicit classifier, and ``eps_mse`` under the true label.

    Args:
        eps_model: class-conditional ``eps_model(x_t, t, y)``.
        schedule: the noise schedule.
        x0: ``[N, C, H, W]`` validation slices; labels: ``[N]`` their image labels.
        timesteps: noise levels t.
        noise_draws, seed, batch_size: see :func:`denoising_errors`.

    Returns:
        rows ``{"t", "metric", "value"}`` with metrics ``implicit_acc``, ``implicit_auroc``, ``eps_mse``.
    """
    rows: list[Row] = []
    for t in timesteps:
        err = denoising_errors(eps_model, schedule, x0, t, (HEALTHY, UNHEALTHY), noise_draws, seed, batch_size)
        # 3. predicted label = argmin_y err_y (ties: healthy); score = err_healthy - err_unhealthy
        pred = (err[:, 1] < err[:, 0]).long()
        score = err[:, 0] - err[:, 1]
        true_err = err.gather(1, labels.view(-1, 1)).squeeze(1)
        rows += _accuracy_auroc_rows(t, "implicit", pred, score, labels)
        rows.append({"t": t, "metric": "eps_mse", "value": float(true_err.mean())})
    return rows


def unconditional_denoising_metrics(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: tuple[int, ...] = (100, 300, 500),
    noise_draws: int = 2,
    seed: int = 1234,
    batch_size: int = 32,
    noise: NoiseKind = "gaussian",
    simplex: SimplexConfig = SimplexConfig(),
) -> list[Row]:
    """(c) ``eps_mse`` and ``eps_mse_auroc`` of an unconditional (healthy-only) model, asked with NULL_LABEL.

    Returns:
        rows ``{"t", "metric", "value"}``.
    """
    rows: list[Row] = []
    for t in timesteps:
        err = denoising_errors(eps_model, schedule, x0, t, (NULL_LABEL,), noise_draws, seed, batch_size, noise, simplex)[:, 0]
        rows += [
            {"t": t, "metric": "eps_mse", "value": float(err.mean())},
            {"t": t, "metric": "eps_mse_auroc", "value": _auroc(labels, err)},
        ]
    return rows


@torch.no_grad()
def noisy_classifier_metrics(
    classifier: Classifier,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: tuple[int, ...] = (100, 300, 500),
    noise_draws: int = 2,
    seed: int = 1234,
    batch_size: int = 32,
) -> list[Row]:
    """(b) accuracy and AUROC of a noisy classifier at each t (softmax averaged over noise draws).

    Returns:
        rows ``{"t", "metric", "value"}`` with metrics ``classifier_acc``, ``classifier_auroc``.
    """
    rows: list[Row] = []
    for t in timesteps:
        prob = classifier_probabilities(classifier, schedule, x0, t, noise_draws, seed, batch_size)
        rows += _accuracy_auroc_rows(t, "classifier", prob.argmax(dim=1), prob[:, 1], labels)
    return rows


@torch.no_grad()
def classifier_probabilities(
    classifier: Classifier,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: int,
    noise_draws: int = 2,
    seed: int = 1234,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-slice softmax ``p(y | x_t, t)`` of a noisy classifier, averaged over noise draws.

    Args:
        classifier: ``classifier(x_t, t) -> logits [N, 2]``.
        schedule: the noise schedule.
        x0: ``[N, C, H, W]`` clean slices (CPU).
        t: training timestep.
        noise_draws, seed, batch_size: see :func:`denoising_errors` (the same Gaussian draws).

    Returns:
        ``[N, 2]`` float32 probabilities.
    """
    n = x0.shape[0]
    t_batch = torch.full((n,), t, dtype=torch.long)
    prob = torch.zeros(n, 2)
    for draw in range(noise_draws):
        x_t = q_sample(schedule, x0, t_batch, _noise("gaussian", x0, t, seed, draw, SimplexConfig()))
        prob += _batched(classifier, batch_size, x_t, t_batch).softmax(dim=1) / noise_draws
    return prob


def append_diagnostics(run_dir: Path, step: int, wall_time: float, rows: list[Row]) -> None:
    """Append rows to ``RUN/diagnostics.csv`` with the step and wall time."""
    log = CsvLog(run_dir / "diagnostics.csv", DIAGNOSTICS_COLUMNS)
    for row in rows:
        value = float(row["value"])
        log.write({"step": step, "wall_time": f"{wall_time:.2f}", "t": row["t"], "metric": row["metric"],
                   "value": "nan" if math.isnan(value) else f"{value:.6g}"})
    log.close()


def plot_diagnostics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every diagnostic metric against training steps and wall time, one line per t.

    Args:
        run_dir: a run folder with ``diagnostics.csv``.
        out: PNG path (default ``RUN/diagnostics.png``).

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    run_dir = Path(run_dir)
    csv_path = run_dir / "diagnostics.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: train with diagnostics.every > 0 to record diagnostics")
    frame = pd.read_csv(csv_path)
    metrics = list(dict.fromkeys(frame["metric"]))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 2.6 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        part = frame[frame["metric"] == metric]
        for t, group in part.groupby("t"):
            group = group.sort_values("step")
            axes[i, 0].plot(group["step"], group["value"], marker="o", label=f"t={t}")
            axes[i, 1].plot(group["wall_time"] / 60.0, group["value"], marker="o", label=f"t={t}")
        axes[i, 0].set_ylabel(metric)
        if metric.endswith(("acc", "auroc")):
            for ax in axes[i]:
                ax.axhline(0.5, color="grey", lw=0.8, ls="--")
                ax.set_ylim(-0.02, 1.02)
        axes[i, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("training step")
    axes[-1, 1].set_xlabel("wall time (min)")
    fig.suptitle(f"diagnostics: {run_dir.name}")
    fig.tight_layout()
    out_path = Path(out) if out is not None else run_dir / "diagnostics.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
