"""`train export`: a run folder becomes a committed model part (fp16 weights, config, curves, card, preprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anomalydiff.evaluation.models import file_sha256, load_parts
from anomalydiff.models import load_model
from anomalydiff.models.io import CheckpointError
from anomalydiff.training import ClassifierTrainConfig, DiffusionTrainConfig, load_train_config, train_classifier, train_diffusion
from anomalydiff.training.export import export_run

FAST = ["model=tiny", "schedule.num_timesteps=50", "batch_size=4", "log_every=2", "checkpoint_every=3", "progress=false"]
DIAG = ["diagnostics.every=3", "diagnostics.timesteps=[5,25]", "diagnostics.num_slices=6", "diagnostics.noise_draws=1"]


def test_export_cfg_and_classifier_load_as_a_model_folder(tiny_store: Path, tmp_path: Path) -> None:
    cfg_run = train_diffusion(load_train_config(DiffusionTrainConfig, None, [*FAST, *DIAG, "steps=6"]), tiny_store, tmp_path / "cfg", device="cpu")
    clf_run = train_classifier(load_train_config(ClassifierTrainConfig, None, [*FAST, "steps=3"]), tiny_store, tmp_path / "clf", device="cpu")
    models = tmp_path / "models"
    part = export_run(cfg_run, models, "cfg", data_note="tiny store")
    export_run(clf_run, models, "classifier")

    # 1. fp16 on disk, float32 and numerically close after loading
    info = json.loads((part / "ema.json").read_text())
    assert info["dtype"] == "float16"
    reference, exported = load_model(cfg_run / "ema"), load_model(part / "ema")
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([5, 40]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(exported(x, t, y), reference(x, t, y), atol=1e-2)
    assert next(exported.parameters()).dtype == torch.float32

    # 2. the card states steps, seed, sha256 of the file on disk, final loss and the last diagnostics
    card = json.loads((part / "card.json").read_text())
    assert card["steps"] == 6 and card["seed"] == 0 and card["mode"] == "cfg"
    assert card["sha256"] == file_sha256(part / "ema.safetensors")
    assert card["final_loss"] is not None and card["final_loss"] > 0
    assert card["diagnostics_step"] == 6 and {d["t"] for d in card["diagnostics"]} == {5, 25}
    assert 0.0 < card["export_relative_error"] < 0.2  # rounding only (a near-untrained tiny net has small outputs)
    text = (part / "MODEL_CARD.md").read_text()
    assert card["sha256"] in text and "tiny store" in text
    assert (part / "config.yaml").exists() and (part / "loss.csv").exists() and (part / "diagnostics.csv").exists()

    # 3. the exported folder is a model folder the methods load (same sha256 as recorded)
    parts = load_parts(models)
    assert parts.sha256["cfg"] == card["sha256"] and parts.classifier is not None

    # 4. re-export replaces the part; nothing left behind
    export_run(cfg_run, models, "cfg", dtype="float32")
    assert json.loads((part / "ema.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in models.iterdir()) == ["cfg", "classifier"]


def test_export_refuses_a_folder_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="not an `anomalydiff train` run folder"):
        export_run(tmp_path / "run", tmp_path / "models", "cfg")
    with pytest.raises(ValueError, match="unknown part"):
        export_run(tmp_path / "run", tmp_path / "models", "unet")
