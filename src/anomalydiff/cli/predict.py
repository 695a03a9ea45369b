"""`anomalydiff predict`: anomaly maps and masks on users' scans, in each scan's own space.

Examples::

    anomalydiff predict --model models/phantom --method anofpdm_ddim --input /data/BraTS2021_00042 --out pred/
    anomalydiff predict --model runs/phantom_quick --method anofpdm --input /data/BraTS2021 --out pred/
    anomalydiff predict --model runs/cfg --method anofpdm --calibration-store stores/brats64 \\
        --input flair=a.nii.gz --input t1=b.nii.gz --input t1ce=c.nii.gz --input t2=d.nii.gz --out pred/
    torchrun --standalone --nproc_per_node 2 -m anomalydiff.cli predict --model ... --input /data/many --out pred/

Exit codes: 0 done, 2 an error (the message says what is wrong and what to do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anomalydiff.cli.app import app

EPILOG = (
    "Inputs: a BraTS subject or release folder, an ATLAS BIDS subject or tree, an MSD 4-D volume or task folder, "
    "single-modality files by name (--input flair=F --input t1=F ...), a 3-D NIfTI file (1-channel models), a folder "
    "of subjects, or 2-D images (PNG/JPEG, CheXpert folder or CSV).\n\n"
    "Outputs per subject in OUT/<subject>/: <subject>_desc-anomalymap.nii.gz and _desc-anomalymask.nii.gz (the "
    "input's shape, affine and orientation; PNGs of the input's size for 2-D), _desc-slices.csv (score, decision, "
    "lesion volume in mm^3 per slice), _desc-overlay.png, _desc-summary.json (decision and score); OUT/predictions.csv "
    "has one row per subject. A rerun continues an interrupted run; finished results are never replaced without "
    "--overwrite."
)


@app.command("predict", epilog=EPILOG)
def predict(
    model: Annotated[list[str], typer.Option("--model", help="Model folder (part folders cfg/, classifier/, ...), a "
                                             "train run folder, a benchmark/detect output folder, or an "
                                             "ema.safetensors file; repeat as PART=PATH for explicit parts.")],
    input: Annotated[list[str], typer.Option("--input", help="Scan, subject folder or folder of subjects "
                                             "(repeatable); NAME=FILE names one modality of a single subject.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    method: Annotated[str, typer.Option("--method", help="Method or preset: anofpdm, anofpdm_ddim, wolleb_p1, "
                                        "ddib, anoddpm_gauss, cgcdm, ... (a calibration found with the model "
                                        "fixes the setting).")] = "anofpdm",
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration JSON (from detect, "
                                                        "benchmark or an earlier predict).")] = None,
    calibration_store: Annotated[Optional[Path], typer.Option("--calibration-store", help="Slice store prepared like "
                                                              "the training store: fit the calibration on its val "
                                                              "split when none is found.")] = None,
    preprocess: Annotated[Optional[Path], typer.Option("--preprocess", help="The training store (folder, store.json "
                                                       "or preprocess.json) when the model folder has no record.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a method field, key=value "
                                                      "(repeatable).")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="Force the input layout (brats2020, brats2021, "
                                                  "brats2023, msd, atlas, chexpert, folder).")] = None,
    subject_id: Annotated[Optional[str], typer.Option("--subject-id", help="Output name of a single subject given "
                                                      "as files.")] = None,
    threshold_policy: Annotated[Optional[str], typer.Option("--threshold-policy", help="Methods without their own "
                                                            "threshold: which policy of the calibration (default its "
                                                            "primary one).")] = None,
    fit_policy: Annotated[str, typer.Option("--fit-policy", help="Policy fitted with --calibration-store for such "
                                            "methods: healthy_quantile (image labels only), oracle_dice (pixel "
                                            "labels) or otsu.")] = "healthy_quantile",
    val_slices: Annotated[int, typer.Option("--val-slices", min=1, help="Validation slices used by "
                                            "--calibration-store (spec C.1: 1000).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per batch.")] = 16,
    median_size: Annotated[int, typer.Option("--median-size", min=0, help="Median filter for methods without their "
                                             "own (spec C.9: 5; 0 = off).")] = 5,
    min_component: Annotated[int, typer.Option("--min-component", min=0, help="Remove mask components of at most "
                                               "this many pixels (spec C.9: 40).")] = 40,
    subject_share: Annotated[float, typer.Option("--subject-share", help="Gated methods (AnoFPDM): a subject is "
                                                 "unhealthy if at least this share of its slices is flagged.")] = 0.1,
    device: Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo every subject and replace earlier results "
                                            "in --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a finished run of the same settings "
                                         "(predict inputs not done yet).")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report a subject that fails to load (error column) "
                                           "and go on.")] = False,
    no_overlay: Annotated[bool, typer.Option("--no-overlay", help="Do not draw the PNG panels.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Predict anomaly maps, masks and decisions on scans with a trained model and a calibrated method."""
    import warnings

    from anomalydiff.config import ConfigError
    from anomalydiff.data.store import StoreError
    from anomalydiff.data.volumes import DataInputError
    from anomalydiff.methods.base import NotFittedError
    from anomalydiff.models.io import CheckpointError
    from anomalydiff.predict.distributed import current_dist_info, run_prediction
    from anomalydiff.predict.inputs import InputWarning
    from anomalydiff.predict.predictor import PredictConfig, Predictor
    from anomalydiff.predict.writer import OutputExistsError
    from anomalydiff.training.distributed import shutdown_distributed

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            typer.echo(f"warning: {category.__name__}: {message}", err=True)

    warnings.showwarning = show_warning
    info = None
    try:
        model_arg: object
        if len(model) == 1 and "=" not in model[0]:
            model_arg = model[0]
        elif all("=" in m for m in model):
            model_arg = {m.split("=", 1)[0].strip(): m.split("=", 1)[1].strip() for m in model}
        else:
            raise ConfigError("--model: give one folder/file, or every part as PART=PATH (e.g. cfg=runs/cfg)")
        config = PredictConfig(batch_size=batch_size, median_size=median_size, min_component=min_component,
                               subject_share=subject_share, threshold_policy=threshold_policy, fit_policy=fit_policy,
                               val_slices=val_slices)
        info = current_dist_info(device)
        predictor = Predictor.from_model_dir(model_arg, method, device=info.device, calibration=calibration,
                                             preprocess=preprocess, calibration_store=calibration_store,
                                             overrides=list(set_ or []), config=config, fit=False)
        rows = run_prediction(predictor, input, out, overwrite=overwrite, resume=resume, progress=not quiet,
                              fmt=format, subject_id=subject_id, skip_bad=skip_bad, overlay=not no_overlay,
                              calibration_store=calibration_store, info=info)
    except (ConfigError, CheckpointError, DataInputError, StoreError, NotFittedError, OutputExistsError, ValueError,
            FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        if info is not None:
            shutdown_distributed(info)
    if info.is_main:
        unhealthy = sum(1 for r in rows if str(r.get("decision")) == "1")
        errors = sum(1 for r in rows if r.get("error"))
        typer.echo(f"{len(rows)} subject(s): {unhealthy} unhealthy, {len(rows) - unhealthy - errors} healthy"
                   f"{f', {errors} failed' if errors else ''}; results in {out} (predictions.csv)")


if __name__ == "__main__":  # python -m anomalydiff.cli.predict predict ... (until the package registers it)
    app()
