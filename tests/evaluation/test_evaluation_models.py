"""Loading a model folder: parts, EMA weights, sha256, schedule from the run config, clear errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from anomalydiff.config import ConfigError
from anomalydiff.evaluation import build_method_from_parts, load_parts, parts_needed
from anomalydiff.models import ClassConditionalUNet, NoisyClassifier, UnconditionalUNet
from anomalydiff.models.io import CheckpointError

from evaluation_helpers import NUM_TIMESTEPS, write_model_folder


def test_load_parts_reads_every_part(model_dir: Path) -> None:
    parts = load_parts(model_dir)
    assert isinstance(parts.eps_model, ClassConditionalUNet)
    assert isinstance(parts.classifier, NoisyClassifier)
    assert isinstance(parts.healthy_model, UnconditionalUNet) and isinstance(parts.simplex_model, UnconditionalUNet)
    assert parts.schedule.num_timesteps == NUM_TIMESTEPS  # from config.yaml, not the 1000 default
    for name, part in parts.parts.items():
        assert part.weights == model_dir / name / "ema.safetensors"
        assert part.sha256 == hashlib.sha256(part.weights.read_bytes()).hexdigest()
        assert parts.ids[name]["sha256"] == part.sha256 and parts.ids[name]["step"] == 0
    assert not parts.eps_model.training  # eval mode


def test_single_run_folder_and_mapping(model_dir: Path) -> None:
    single = load_parts(model_dir / "healthy_simplex")
    assert list(single.parts) == ["healthy_simplex"]
    mapping = load_parts({"cfg": model_dir / "cfg", "classifier": model_dir / "classifier" / "ema.safetensors"})
    assert sorted(mapping.parts) == ["cfg", "classifier"]


def test_missing_part_names_the_command(model_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    shutil.copytree(model_dir / "cfg", partial / "cfg")
    parts = load_parts(partial)
    with pytest.raises(CheckpointError, match=r"no classifier/ \(needed by method wolleb_p2\).*anomalydiff train classifier"):
        build_method_from_parts("wolleb_p2", parts)
    with pytest.raises(CheckpointError, match="healthy_gaussian/.*--config configs/train/phantom_healthy_cpu.yaml"):
        load_parts(partial, require=["healthy_gaussian"])
    with pytest.raises(CheckpointError, match="not found.*--train"):
        load_parts(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds none of the parts"):
        load_parts(tmp_path / "empty")


def test_inconsistent_parts_are_refused(model_dir: Path, tmp_path: Path) -> None:
    # a part trained with another schedule
    other = write_model_folder(tmp_path / "other", parts=("classifier",), num_timesteps=NUM_TIMESTEPS + 10)
    with pytest.raises(CheckpointError, match="different noise schedules"):
        load_parts({"cfg": model_dir / "cfg", "classifier": other / "classifier"})
    # a run folder under the wrong part name
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir / "healthy_gaussian", wrong / "cfg")
    with pytest.raises(CheckpointError, match="must be a ClassConditionalUNet"):
        load_parts(wrong)
    # raw weights only (no EMA) and no config.yaml
    raw = tmp_path / "raw" / "cfg"
    shutil.copytree(model_dir / "cfg", raw)
    (raw / "ema.safetensors").rename(raw / "model.safetensors")
    with pytest.raises(CheckpointError, match="EMA weights"):
        load_parts(raw.parent)
    noconfig = tmp_path / "noconfig" / "cfg"
    shutil.copytree(model_dir / "cfg", noconfig)
    (noconfig / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml not found"):
        load_parts(noconfig.parent)


def test_build_method_uses_the_right_parts(model_dir: Path, tmp_path: Path) -> None:
    parts = load_parts(model_dir)
    assert parts_needed("anoddpm_simplex") == ("healthy_simplex",)
    assert parts_needed("anoddpm_simplex", ["noise=gaussian"]) == ("healthy_gaussian",)
    assert parts_needed("cgcdm") == ("cfg", "classifier")
    method, used = build_method_from_parts("anoddpm_gauss", parts, ["noise_level=5"])
    assert used == ("healthy_gaussian",) and method.eps_model is parts.healthy_model
    method, used = build_method_from_parts("anofpdm_ddim", parts, ["forward_steps=10"])
    assert method.model_id == parts.parts["cfg"].model_id and method.schedule is parts.schedule
    # the simplex model's training noise must be the method's sampling noise
    changed = tmp_path / "simplex"
    shutil.copytree(model_dir / "healthy_simplex", changed / "healthy_simplex")
    config = yaml.safe_load((changed / "healthy_simplex" / "config.yaml").read_text())
    config["simplex"]["octaves"] = 3
    (changed / "healthy_simplex" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="simplex noise"):
        build_method_from_parts("anoddpm_simplex", load_parts(changed), ["noise_level=5"])
    with pytest.raises(ConfigError):
        build_method_from_parts("anofpdm_ddim", parts, ["no_such_field=1"])
