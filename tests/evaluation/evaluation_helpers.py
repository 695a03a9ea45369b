"""Helpers of the evaluation tests: a tiny slice store in the real format and tiny model folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomalydiff.config import from_dict, save_config
from anomalydiff.data.store import SliceStoreWriter
from anomalydiff.diffusion.schedule import ScheduleConfig
from anomalydiff.models import (
    ClassConditionalUNet,
    ClassifierConfig,
    NoisyClassifier,
    UnconditionalUNet,
    UNetConfig,
    save_model,
)
from anomalydiff.training.config import ClassifierTrainConfig, DiffusionTrainConfig, resolve_model_preset

SIZE = 32
CHANNELS = 4
NUM_TIMESTEPS = 50


def write_tiny_store(out: Path, subjects: int = 6, slices: int = 8, seed: int = 0) -> Path:
    """4-channel 32x32 slices: a round "brain" on a -1 background; odd slices carry a bright disc (labelled).

    Splits: 2 train, 2 val, 2 test subjects; half the slices of every subject are unhealthy.
    """
    rng = np.random.default_rng(seed)
    writer = SliceStoreWriter(out, CHANNELS, SIZE, SIZE, ["flair", "t1", "t1ce", "t2"], info={"format": "test"})
    yy, xx = np.mgrid[:SIZE, :SIZE]
    brain = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= (0.45 * SIZE) ** 2
    ids = []
    for s in range(subjects):
        images = np.empty((slices, CHANNELS, SIZE, SIZE), np.float32)
        masks = np.zeros((slices, SIZE, SIZE), bool)
        labels = []
        for k in range(slices):
            base = np.where(brain, -0.2 + 0.1 * np.sin(xx / (3 + k)) + 0.05 * rng.standard_normal((SIZE, SIZE)), -1.0)
            image = np.repeat(base[None], CHANNELS, 0)
            label = k % 2
            if label:
                cy, cx, r = rng.integers(11, 21), rng.integers(11, 21), rng.integers(5, 7)
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) & brain
                image[:, disc] = 0.8
                masks[k] = disc
            images[k] = np.clip(image, -1, 1)
            labels.append(label)
        sid = f"sub{s:02d}"
        ids.append(sid)
        writer.add_subject(sid, images, masks, np.repeat(brain[None], slices, 0), list(range(slices)), labels)
    return writer.close({"train": ids[:2], "val": ids[2:4], "test": ids[4:]})


def _jitter(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """MONAI zero-initialises the output convolution; random weights everywhere make the label matter."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


def write_model_folder(
    folder: Path,
    parts: tuple[str, ...] = ("cfg", "classifier", "healthy_gaussian", "healthy_simplex"),
    num_timesteps: int = NUM_TIMESTEPS,
    seed: int = 0,
) -> Path:
    """Tiny freshly initialised networks saved as ``train`` run folders (config.yaml + ema.safetensors/json)."""
    torch.manual_seed(seed)
    schedule = ScheduleConfig(num_timesteps=num_timesteps)
    unet = from_dict(UNetConfig, resolve_model_preset("tiny", "unet")).resolved(CHANNELS)
    classifier = from_dict(ClassifierConfig, resolve_model_preset("tiny", "classifier")).resolved(CHANNELS, SIZE)
    kinds = {
        "cfg": ("cfg", ClassConditionalUNet),
        "healthy_gaussian": ("healthy", UnconditionalUNet),
        "healthy_simplex": ("simplex", UnconditionalUNet),
    }
    for part in parts:
        run = folder / part
        run.mkdir(parents=True, exist_ok=True)
        if part == "classifier":
            model = _jitter(NoisyClassifier(classifier))
            save_config(ClassifierTrainConfig(model=classifier, schedule=schedule), run / "config.yaml")
        else:
            mode, cls = kinds[part]
            model = _jitter(cls(unet))
            save_config(DiffusionTrainConfig(mode=mode, model=unet, schedule=schedule), run / "config.yaml")
        save_model(model, model.config, run / "ema", metadata={"step": 0})
    return folder


#: Tiny settings (T = 50) per preset: every method runs in well under a second per batch.
TINY_OVERRIDES: dict[str, list[str]] = {
    "anofpdm_ddim": ["forward_steps=12", "step_stride=3", "w_grid=[0.5,1,2]"],
    "anofpdm_ddpm_te": ["forward_steps=12", "step_stride=3", "w_grid=[0.5,1,2]"],
    "wolleb_p1": ["noise_level=6", "step_stride=2"],
    "wolleb_p2": ["noise_level=6", "step_stride=2"],
    "ddib": ["noise_level=6", "step_stride=2"],
    "anoddpm_gauss": ["noise_level=3"],
    "anoddpm_simplex": ["noise_level=2"],
    "cgcdm": ["noise_level=10", "num_steps=2"],
}
