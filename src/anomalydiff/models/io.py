"""Model files: weights as safetensors, the architecture config as JSON beside them (never pickle).

``save_model(model, config, "RUN/ema")`` writes ``RUN/ema.safetensors`` and ``RUN/ema.json``::

    {"format": "anomalydiff-model", "version": 1, "model_class": "ClassConditionalUNet",
     "config": {...UNetConfig...}, "dtype": "float32", "num_parameters": 283000, "metadata": {...}}

``load_model("RUN/ema")`` rebuilds the network from the JSON and checks that every parameter name and shape
in the safetensors file matches it before loading (a mismatched checkpoint is a clear error naming the file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anomalydiff.config import from_dict, to_dict
from anomalydiff.models.classifier import ClassifierConfig, NoisyClassifier
from anomalydiff.models.unet import ClassConditionalUNet, UnconditionalUNet, UNetConfig

FORMAT = "anomalydiff-model"
VERSION = 1

#: model class name -> (class, config class); the JSON names one of these.
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "ClassConditionalUNet": (ClassConditionalUNet, UNetConfig),
    "UnconditionalUNet": (UnconditionalUNet, UNetConfig),
    "NoisyClassifier": (NoisyClassifier, ClassifierConfig),
}


class CheckpointError(RuntimeError):
    """A model file is missing, unreadable, or does not match its config."""


def build_model(model_class: str, config: Any) -> nn.Module:
    """Build a network by class name from its config dataclass (or a plain dict of it).

    Args:
        model_class: one of :data:`MODEL_CLASSES`.
        config: a ``UNetConfig`` / ``ClassifierConfig`` or the dict written by :func:`save_model`.
    """
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {model_class!r}; known: {sorted(MODEL_CLASSES)}")
    cls, config_cls = MODEL_CLASSES[model_class]
    if isinstance(config, dict):
        config = from_dict(config_cls, config, where=f"{model_class} config")
    return cls(config)


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_model(
    module: nn.Module,
    config: Any,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (class, config, dtype, metadata).

    Args:
        module: a network from :data:`MODEL_CLASSES` (unwrap DDP first).
        config: its config dataclass (must equal ``module.config``).
        path: output path without suffix (a ``.safetensors`` / ``.json`` suffix is stripped).
        dtype: store floating-point weights in this dtype (e.g. ``torch.float16`` for a half-size export);
            ``None`` keeps the module's dtype. :func:`load_model` always returns float32.
        metadata: extra JSON-serialisable facts (e.g. the training step).

    Returns:
        The ``.safetensors`` path.
    """
    name = type(module).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_model: {name} is not a known model class ({sorted(MODEL_CLASSES)}); unwrap DDP first")
    if getattr(module, "config", None) != config:
        raise ValueError(f"save_model: the config passed does not match {name}.config; pass module.config")
    weights_file, json_file = _paths(path)
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in module.state_dict().items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.cpu().contiguous()
    stored_dtype = str(dtype or next(iter(tensors.values())).dtype).replace("torch.", "")
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": name,
        "config": to_dict(config),
        "dtype": stored_dtype,
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "metadata": dict(metadata or {}),
    }
    save_file(tensors, str(weights_file), metadata={"model_class": name})
    tmp = json_file.with_name(json_file.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, json_file)
    return weights_file


def read_model_info(path: str | Path) -> dict[str, Any]:
    """The JSON beside a model file (class, config, dtype, metadata)."""
    _, json_file = _paths(path)
    if not json_file.exists():
        raise CheckpointError(f"{json_file} not found: a model is saved as <name>.safetensors + <name>.json")
    try:
        info = json.loads(json_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{json_file}: not valid JSON ({exc}); the file is damaged, re-export the model") from exc
    if info.get("format") != FORMAT or "model_class" not in info or "config" not in info:
        raise CheckpointError(f"{json_file}: not an anomalydiff model description (format {info.get('format')!r})")
    return info


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a network from ``<path>.json`` and load ``<path>.safetensors`` into it (float32, eval mode).

    Args:
        path: path without suffix (or with ``.safetensors`` / ``.json``).
        device: where to put the network.

    Raises:
        CheckpointError: a file is missing, or the weights do not fit the architecture in the JSON (the
            message names the file and the first mismatching parameters).
    """
    weights_file, json_file = _paths(path)
    info = read_model_info(path)
    if not weights_file.exists():
        raise CheckpointError(f"{weights_file} not found (its config {json_file} exists); the export is incomplete")
    module = build_model(info["model_class"], info["config"])
    tensors = load_file(str(weights_file))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            details.append("shape " + ", ".join(f"{k}: file {found[k]} vs config {expected[k]}" for k in wrong[:3]))
        raise CheckpointError(
            f"mismatched checkpoint: {weights_file} does not fit the {info['model_class']} described by {json_file} "
            f"({'; '.join(details)}). Keep each .safetensors with the .json written beside it."
        )
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return module.to(device).eval()
