"""Strict config loading: YAML + overrides into frozen dataclasses."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from anomalydiff.config import ConfigError, load_config, save_config


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    mode: Literal["cfg", "healthy"] = "cfg"
    modalities: tuple[int, ...] | None = None
    optim: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    cfg = load_config(Outer, path, ["optim.betas=[0.5, 0.6]", "mode=healthy", "modalities=[0, 3]"])
    assert cfg == Outer(steps=20, mode="healthy", modalities=(0, 3), optim=Inner(lr=1e-3, betas=(0.5, 0.6)))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*stepz"):
        load_config(Outer, None, ["stepz=3"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Outer, None, ["mode=ddpm"])
    with pytest.raises(ConfigError, match="integer"):
        load_config(Outer, None, ["steps=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
