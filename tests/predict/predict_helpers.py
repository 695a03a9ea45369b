"""Helpers of the predict tests: tiny model folders with their preprocessing record and calibration, phantom
scans written in the published layouts (or with unusual affines), and an analytic "oracle" noise model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from anomalydiff.config import from_dict, save_config, to_dict
from anomalydiff.data.prepare import PrepareConfig
from anomalydiff.diffusion.schedule import NoiseSchedule, ScheduleConfig
from anomalydiff.labels import NULL_LABEL
from anomalydiff.methods.anofpdm import AnoFPDMConfig
from anomalydiff.models import (
    ClassConditionalUNet,
    UnconditionalUNet,
    UNetConfig,
    save_model,
)
from anomalydiff.predict.inputs import PreprocessRecord
from anomalydiff.training.config import DiffusionTrainConfig, resolve_model_preset

NUM_TIMESTEPS = 50
RESOLUTION = 32
#: Tiny AnoFPDM setting: 2 evaluated forward steps (4 NFE per slice).
TINY_ANOFPDM = AnoFPDMConfig(forward_steps=6, step_stride=3, modalities=None, w_grid=(0.5, 1.0, 2.0))


def record_for(fmt: str = "brats2021", modalities: Sequence[str] | None = None, **prepare) -> PreprocessRecord:
    """A preprocessing record as a training store of this format would carry."""
    config = PrepareConfig(format=fmt, modalities=None if modalities is None else tuple(modalities),
                           resolution=prepare.pop("resolution", RESOLUTION), **prepare)
    return PreprocessRecord(prepare=config, channels=tuple(config.channel_names()), source="test", store=None)


def write_model_folder(
    folder: Path,
    record: PreprocessRecord,
    parts: Sequence[str] = ("cfg",),
    seed: int = 0,
    with_record: bool = True,
) -> Path:
    """Tiny freshly initialised networks as `train` run folders (+ MODEL/preprocess.json)."""
    torch.manual_seed(seed)
    channels = len(record.channels)
    unet = from_dict(UNetConfig, resolve_model_preset("tiny", "unet")).resolved(channels)
    schedule = ScheduleConfig(num_timesteps=NUM_TIMESTEPS)
    for part in parts:
        run = folder / part
        run.mkdir(parents=True, exist_ok=True)
        mode, cls = {"cfg": ("cfg", ClassConditionalUNet), "healthy_gaussian": ("healthy", UnconditionalUNet)}[part]
        model = cls(unet)
        with torch.no_grad():  # MONAI zero-initialises the output conv: random weights make the label matter
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        save_config(DiffusionTrainConfig(mode=mode, model=unet, schedule=schedule), run / "config.yaml")
        save_model(model, model.config, run / "ema", metadata={"step": 0})
    if with_record:
        (folder / "preprocess.json").write_text(json.dumps(record.to_json()))
    return folder


def anofpdm_calibration(model_dir: Path, config: AnoFPDMConfig = TINY_ANOFPDM, guidance_w: float = 1.0,
                        tau_cos: float = 2.0, d_max_star: float = 1e-3, channels: int = 4) -> dict:
    """A hand-made AnoFPDM calibration for the model folder's cfg network (tau_cos = 2 flags every slice)."""
    from anomalydiff.evaluation.models import file_sha256

    sha = file_sha256(model_dir / "cfg" / "ema.safetensors")
    modalities = channels if config.modalities is None else len(config.modalities)
    return {"method": "anofpdm", "model": f"cfg@{sha[:16]}", "config": to_dict(config), "guidance_w": guidance_w,
            "tau_cos": tau_cos, "d_max_star": [d_max_star] * modalities, "by_w": [], "num_validation": {}}


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(path))
    return path


class OracleEps:
    """Analytic eps model for DDIB that "heals" exactly the pixels of channel ``channel`` below ``level``.

    The null prediction is eps = 0 (DDIM inversion keeps x_t = sqrt(alpha_bar) x0); the healthy prediction pushes the
    clean estimate of dark pixels (x_t / sqrt(alpha_bar) < level) to +1 and leaves the others, so DDIB's map
    (x0 - x_hat)^2 is ~0.3-4 on exactly the pixels darker than ``level`` and ~1e-10 elsewhere.
    """

    def __init__(self, schedule: NoiseSchedule, level: float = 0.5, push: float = 1000.0) -> None:
        self.alpha_bar = schedule.alpha_bar
        self.level = level
        self.push = push

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alpha_bar.to(x_t.device, x_t.dtype)[t].view(-1, 1, 1, 1)
        estimate = x_t / alpha_bar.sqrt()
        eps = torch.where(estimate < self.level, torch.full_like(x_t, -self.push), torch.zeros_like(x_t))
        return torch.where((y == NULL_LABEL).view(-1, 1, 1, 1), torch.zeros_like(x_t), eps)
