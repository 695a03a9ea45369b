"""`anomalydiff train diffusion|classifier`: train a network on a prepared slice store into a run folder.

Thin: parse, load the config (YAML + ``--set`` overrides; with ``--resume`` the run's own config.yaml),
call :mod:`anomalydiff.training`. The same command runs under
``torchrun --nproc_per_node N $(which anomalydiff) train diffusion ...`` for DDP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from anomalydiff.cli.app import app

train_app = typer.Typer(
    help="Train a diffusion model or a noisy classifier on a slice store (see `anomalydiff prepare`).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

STORE = typer.Option(..., "--store", help="Prepared slice store folder (from `anomalydiff prepare`).")
OUT = typer.Option(..., "--out", help="Run folder to create (or to continue with --resume).")
CONFIG = typer.Option(None, "--config", help="Training YAML (e.g. configs/train/phantom_cfg_cpu.yaml).")
SET = typer.Option([], "--set", help="Override a config value, key=value (repeatable), e.g. --set steps=500.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint.")
DEVICE = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda or cuda:N.")


def _resolve_config(config_cls: type, out: Path, config: Optional[Path], overrides: list[str], resume: bool):  # noqa: ANN202
    from anomalydiff.config import ConfigError, read_yaml
    from anomalydiff.training.config import build_train_config

    if resume and (out / "config.yaml").exists():
        if config is not None:
            raise ConfigError(f"--resume keeps the run's own {out / 'config.yaml'}; drop --config (use --set to change values)")
        return build_train_config(config_cls, read_yaml(out / "config.yaml"), overrides, where=str(out / "config.yaml"))
    data = read_yaml(config) if config is not None else {}
    return build_train_config(config_cls, data, overrides, where=str(config) if config else config_cls.__name__)


def _run(kind: str, store: Path, out: Path, config: Optional[Path], overrides: list[str], resume: bool, device: str) -> None:
    # imported here so that `anomalydiff --help` does not load torch networks
    from anomalydiff.config import ConfigError
    from anomalydiff.data.store import StoreError
    from anomalydiff.models.io import CheckpointError
    from anomalydiff.training.checkpoint import RunFolderError
    from anomalydiff.training.classifier import train_classifier
    from anomalydiff.training.config import ClassifierTrainConfig, DiffusionTrainConfig
    from anomalydiff.training.diffusion import train_diffusion

    try:
        if kind == "diffusion":
            cfg = _resolve_config(DiffusionTrainConfig, out, config, overrides, resume)
            train_diffusion(cfg, store, out, resume=resume, device=device)
        else:
            cfg = _resolve_config(ClassifierTrainConfig, out, config, overrides, resume)
            train_classifier(cfg, store, out, resume=resume, device=device)
    except (ConfigError, StoreError, RunFolderError, CheckpointError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"done: {out}  (weights for the methods: {out / 'ema.safetensors'})", err=True)


@train_app.command("diffusion")
def diffusion(
    store: Path = STORE,
    out: Path = OUT,
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
    resume: bool = RESUME,
    device: str = DEVICE,
) -> None:
    """Train a diffusion UNet: mode cfg (class-conditional with label dropout), healthy or simplex (AnoDDPM).

    Mode, size, steps, batch, lr, EMA, bf16, label dropout and diagnostics are config fields, e.g.
    --set mode=healthy --set model=tiny --set steps=500 --set optim.lr=2e-4 --set bf16=true.

    \b
    Examples:
      anomalydiff train diffusion --store data/phantom --out runs/cfg \\
          --config configs/train/phantom_cfg_cpu.yaml
      anomalydiff train diffusion --store data/phantom --out runs/cfg --resume
      torchrun --nproc_per_node 2 $(which anomalydiff) train diffusion ...
    """
    _run("diffusion", store, out, config, set_, resume, device)


@train_app.command("classifier")
def classifier(
    store: Path = STORE,
    out: Path = OUT,
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
    resume: bool = RESUME,
    device: str = DEVICE,
) -> None:
    """Train the noisy classifier p(y | x_t, t) for Wolleb's classifier guidance (and CG-CDM).

    Size, steps, batch, lr, EMA, bf16 and diagnostics are config fields (--set model=tiny ...).

    \b
    Examples:
      anomalydiff train classifier --store data/phantom --out runs/clf \\
          --config configs/train/phantom_classifier_cpu.yaml
      anomalydiff train classifier --store data/phantom --out runs/clf --resume
    """
    _run("classifier", store, out, config, set_, resume, device)


@train_app.command("export")
def export(
    run: Path = typer.Argument(..., help="The `anomalydiff train` run folder to export (finished or paused)."),
    part: str = typer.Option(..., "--part", help="cfg, classifier, healthy_gaussian or healthy_simplex."),
    out: Path = typer.Option(..., "--out", help="Model folder; the part is written to OUT/PART (replaced)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (half-size files) or float32."),
    store: Optional[Path] = typer.Option(None, "--store", help="Training store: writes OUT/preprocess.json for predict."),
    data_note: str = typer.Option("", "--data-note", help="How the training data was made, for the model card."),
) -> None:
    """Export a run as a model part: EMA weights (fp16 by default), config, curves and a model card.

    \b
    Example:
      anomalydiff train export runs/cfg --part cfg --out models/phantom --store data/phantom_store
    """
    from anomalydiff.models.io import CheckpointError
    from anomalydiff.training.export import export_run

    try:
        folder = export_run(run, out, part, dtype=dtype, store=store, data_note=data_note)
    except (CheckpointError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"exported {run} -> {folder} (card: {folder / 'MODEL_CARD.md'})", err=True)
