"""`anomalydiff phantom`: write the built-in brain phantom in the real BraTS 2021 or ATLAS v2.0 layout.

Example::

    anomalydiff phantom --layout brats --subjects 20 --out data/phantom_brats --seed 0 \\
        --montage data/phantom_brats.png
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from anomalydiff.cli.app import app


class PhantomLayout(str, Enum):
    """Folder layouts the phantom can write (the real datasets' own)."""

    brats = "brats"
    atlas = "atlas"


@app.command()
def phantom(
    out: Annotated[Path, typer.Option("--out", help="Dataset root folder to write (new or empty).")],
    layout: Annotated[PhantomLayout, typer.Option("--layout", help="brats: BraTS 2021 folders with FLAIR, T1, "
                      "T1ce, T2 and seg {0,1,2,4} on 240x240x155; atlas: ATLAS v2.0 BIDS tree with T1w and a "
                      "stroke mask on the MNI grid.")] = PhantomLayout.brats,
    subjects: Annotated[int, typer.Option("--subjects", min=1, help="Number of subjects.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed; subject k depends only on (seed, k).")] = 0,
    lesion_free_fraction: Annotated[float, typer.Option("--lesion-free-fraction", min=0.0, max=1.0,
                                    help="Expected share of subjects without a lesion.")] = 0.2,
    voxel_size: Annotated[float, typer.Option("--voxel-size", min=0.5, help="Voxel edge in mm. The real data "
                          "are 1 mm; 2 or 3 write a coarser grid FOR FAST TESTS ONLY.")] = 1.0,
    montage: Annotated[Optional[Path], typer.Option("--montage", help="Also save a PNG montage of axial "
                       "slices of a few subjects (all contrasts + segmentation outline).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder (replaces "
                         "files of the same names, keeps the rest).")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Write the built-in brain phantom: synthetic lesions on the MNI152 anatomy shipped with nilearn."""
    from anomalydiff.data.phantom import PhantomConfig, save_montage, write_phantom_dataset

    try:
        config = PhantomConfig(voxel_size=voxel_size, lesion_free_fraction=lesion_free_fraction)
        root = write_phantom_dataset(config, out, layout.value, subjects, seed, overwrite=overwrite,
                                     progress=progress)
    except (FileExistsError, NotADirectoryError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"wrote {subjects} {layout.value} phantom subjects to {root}")
    if montage is not None:
        png = save_montage(root, layout.value, montage)
        typer.echo(f"montage: {png}")
