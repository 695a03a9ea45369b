"""`anomalydiff prepare`: turn a dataset in its published layout into a slice store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from anomalydiff.cli.app import app
from anomalydiff.config import ConfigError, load_config
from anomalydiff.data.layouts import FORMATS
from anomalydiff.data.prepare import PrepareConfig, prepare_dataset
from anomalydiff.data.store import StoreError
from anomalydiff.data.volumes import DataInputError

EPILOG = (
    "Examples:\n\n"
    "  anomalydiff prepare --format brats2021 --root /data/BraTS2021_Training_Data --out stores/brats21\n\n"
    "  anomalydiff prepare --format atlas --root /data/ATLAS_2 --out stores/atlas64 --resolution 64 "
    "--set brain_mask=mni152 --skip-bad\n\n"
    "  anomalydiff prepare --format chexpert --root /data/CheXpert-v1.0-small --out stores/cxr "
    "--resolution 256 --set chexpert_uncertain=ignore\n\n"
    f"Formats: {', '.join(FORMATS)}. Every PrepareConfig field can be set with --set key=value "
    "(e.g. normalisation=volume, split_counts=[939,63,252], missing_seg=unlabelled, max_subjects=20)."
)


@app.command("prepare", epilog=EPILOG)
def prepare(
    root: Annotated[Path, typer.Option("--root", help="Dataset folder in its published layout.")],
    out: Annotated[Path, typer.Option("--out", help="Slice store folder to create.")],
    format: Annotated[Optional[str], typer.Option("--format", help=f"Dataset layout: {', '.join(FORMATS)}.")] = None,
    modalities: Annotated[
        Optional[str], typer.Option("--modalities", help="Channels in order, comma-separated (default flair,t1,t1ce,t2; ATLAS t1).")
    ] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Side of the square slices (default 128).")] = None,
    slice_range: Annotated[
        Optional[str], typer.Option("--slice-range", help="Axial slices a:b (canonical RAS, b exclusive) instead of the brain rule.")
    ] = None,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the subject split (default 10).")] = None,
    split_files: Annotated[
        Optional[Path], typer.Option("--split-files", help="Folder with train.csv/val.csv/test.csv to reuse instead of a new split.")
    ] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave bad inputs out (warning + skipped.csv) instead of stopping.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at --out.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of PrepareConfig fields.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a PrepareConfig field: key=value (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Prepare a dataset (BraTS 2020/2021/2023, MSD Task01, ATLAS v2.0, CheXpert, folder) into a slice store.

    Preprocessing follows method-spec C.1 (99th-percentile scaling, slices with brain, bilinear resize,
    [-1, 1]); subjects are split into train/val/test by a seed. Explicit options win over --set, which
    wins over --config.
    """
    overrides = list(set_ or [])
    if format is not None:
        overrides.append(f"format={format}")
    if modalities is not None:
        overrides.append("modalities=[" + ",".join(m.strip() for m in modalities.split(",") if m.strip()) + "]")
    if resolution is not None:
        overrides.append(f"resolution={resolution}")
    if slice_range is not None:
        parts = slice_range.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            _fail(f"--slice-range {slice_range!r}: expected a:b with integers, e.g. 40:120")
        overrides.append(f"slice_range=[{parts[0]},{parts[1]}]")
    if split_seed is not None:
        overrides.append(f"split_seed={split_seed}")
    try:
        cfg = load_config(PrepareConfig, config, overrides)
        if cfg.format is None:
            _fail(f"choose the dataset layout with --format ({', '.join(FORMATS)})")
        path = prepare_dataset(cfg, root, out, skip_bad=skip_bad, overwrite=overwrite, progress=not quiet, split_files=split_files)
    except (ConfigError, DataInputError, FileExistsError, FileNotFoundError, StoreError, ValueError, TypeError) as exc:
        _fail(str(exc))
    typer.echo(f"slice store written to {path}")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
