"""save_model / load_model: safetensors + JSON round trip, fp16 export, mismatched checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anomalydiff.models import (
    CheckpointError,
    ClassConditionalUNet,
    ClassifierConfig,
    NoisyClassifier,
    UnconditionalUNet,
    UNetConfig,
    load_model,
    read_model_info,
    save_model,
)

TINY = UNetConfig(
    in_channels=1, channels=(16, 32, 32), attention_levels=(False, False, True), num_res_blocks=1,
    num_head_channels=(16, 16, 16), norm_num_groups=8,
)
TINY_CLF = ClassifierConfig(
    in_channels=1, image_size=32, channels=(16, 32, 32), attention_levels=(False, False, True), num_res_blocks=1,
    num_head_channels=(16, 16, 16), norm_num_groups=8,
)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "label_embedding" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "model",
    [ClassConditionalUNet(TINY), UnconditionalUNet(TINY), NoisyClassifier(TINY_CLF),
     ClassConditionalUNet(UNetConfig(**{**TINY.__dict__, "class_conditioning": "add+cross_attention"}))],
    ids=["cond", "uncond", "classifier", "cond-xattn"],
)
def test_round_trip_is_exact(tmp_path: Path, model: torch.nn.Module) -> None:
    model = _perturbed(model)
    weights = save_model(model, model.config, tmp_path / "net", metadata={"step": 7})
    assert weights == tmp_path / "net.safetensors"
    info = json.loads((tmp_path / "net.json").read_text())
    assert info["model_class"] == type(model).__name__ and info["metadata"] == {"step": 7}
    assert info["config"]["channels"] == [16, 32, 32]
    loaded = load_model(tmp_path / "net")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 40])
    with torch.no_grad():
        args = (x, t) if isinstance(model, NoisyClassifier) else (x, t, torch.tensor([0, 1]))
        assert torch.equal(model(*args), loaded(*args))
    # also loads by the .safetensors or .json name
    assert type(load_model(tmp_path / "net.safetensors")) is type(model)


def test_weights_are_safetensors_not_pickle(tmp_path: Path) -> None:
    model = ClassConditionalUNet(TINY)
    save_model(model, model.config, tmp_path / "net")
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert not (tmp_path / "net.safetensors").read_bytes().startswith(b"\x80")  # a pickle stream starts with 0x80


def test_fp16_export_loads_back_as_fp32(tmp_path: Path) -> None:
    model = _perturbed(ClassConditionalUNet(TINY))
    save_model(model, model.config, tmp_path / "half", dtype=torch.float16)
    save_model(model, model.config, tmp_path / "full")
    with safe_open(str(tmp_path / "half.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    assert read_model_info(tmp_path / "half")["dtype"] == "float16"
    loaded = load_model(tmp_path / "half")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 40]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=2e-2)


def test_mismatched_checkpoint_names_the_file(tmp_path: Path) -> None:
    model = ClassConditionalUNet(TINY)
    save_model(model, model.config, tmp_path / "net")
    info = json.loads((tmp_path / "net.json").read_text())
    info["config"]["channels"] = [16, 32, 64]
    (tmp_path / "net.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"mismatched checkpoint: .*net\.safetensors.*shape"):
        load_model(tmp_path / "net")
    # a conditional checkpoint described as unconditional: the class embedding is unexpected
    info = json.loads((tmp_path / "net.json").read_text())
    info["config"]["channels"], info["model_class"] = [16, 32, 32], "UnconditionalUNet"
    (tmp_path / "net.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="unexpected.*label_embedding"):
        load_model(tmp_path / "net")


def test_missing_files_and_wrong_config(tmp_path: Path) -> None:
    model = ClassConditionalUNet(TINY)
    with pytest.raises(CheckpointError, match=r"nothing\.json not found"):
        load_model(tmp_path / "nothing")
    save_model(model, model.config, tmp_path / "net")
    (tmp_path / "net.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"net\.safetensors not found"):
        load_model(tmp_path / "net")
    with pytest.raises(ValueError, match="does not match"):
        save_model(model, UNetConfig(in_channels=3), tmp_path / "other")
