"""Anomaly-detection methods, one file each, behind one small interface (:mod:`anomalydiff.methods.base`).

- ``anofpdm``: AnoFPDM (Che et al. 2024/25), forward process + CFG, label-free calibration.
- ``wolleb``: Wolleb et al. 2022, DDIM encoding + classifier-guided decoding.
- ``anoddpm``: AnoDDPM (Wyatt et al. 2022), partial noising + DDPM reconstruction, Gaussian or simplex noise.
- ``ddib``: DDIM classifier-free counterfactual (Sanchez et al. 2022 / DDIB).
- ``cgcdm``: CG-CDM (Hu et al. 2023), finite difference of two guided DDIM chains.

Presets are YAML files in ``configs/methods/<preset>.yaml``; the preset's name starts with its method's name
(``wolleb_p1`` -> ``wolleb``). :func:`build_method` builds any of them from explicit parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anomalydiff.config import ConfigError, apply_overrides, from_dict, read_yaml
from anomalydiff.diffusion.schedule import NoiseSchedule
from anomalydiff.methods.anoddpm import AnoDDPM, AnoDDPMConfig
from anomalydiff.methods.anofpdm import AnoFPDM, AnoFPDMConfig
from anomalydiff.methods.base import AnomalyMethod, Classifier, CountingEpsModel, EpsModel, NotFittedError
from anomalydiff.methods.cgcdm import CGCDM, CGCDMConfig
from anomalydiff.methods.ddib import DDIB, DDIBConfig
from anomalydiff.methods.wolleb import Wolleb, WollebConfig

#: configs/ at the repository root (the toolkit is installed editable from its checkout).
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method: its class, its config class and whether it needs a noisy classifier."""

    cls: type
    config_cls: type
    needs_classifier: bool
    #: which diffusion model it runs on: "cfg" (class-conditional, CFG-trained) or "healthy" (healthy-only).
    model_kind: str


METHODS: dict[str, MethodSpec] = {
    "anofpdm": MethodSpec(AnoFPDM, AnoFPDMConfig, needs_classifier=False, model_kind="cfg"),
    "wolleb": MethodSpec(Wolleb, WollebConfig, needs_classifier=True, model_kind="cfg"),
    "anoddpm": MethodSpec(AnoDDPM, AnoDDPMConfig, needs_classifier=False, model_kind="healthy"),
    "ddib": MethodSpec(DDIB, DDIBConfig, needs_classifier=False, model_kind="cfg"),
    "cgcdm": MethodSpec(CGCDM, CGCDMConfig, needs_classifier=True, model_kind="cfg"),
}


def method_of_preset(preset: str) -> str:
    """The method name a preset belongs to (``anofpdm_ddim_te`` -> ``anofpdm``)."""
    for name in sorted(METHODS, key=len, reverse=True):
        if preset == name or preset.startswith(name + "_"):
            return name
    raise ConfigError(f"unknown method or preset {preset!r}; methods: {sorted(METHODS)}, presets: {list_presets()}")


def list_presets() -> list[str]:
    """Names of the YAML presets in ``configs/methods``."""
    return sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))


def method_config(preset: str, overrides: Sequence[str] = ()) -> Any:
    """The config of ``preset`` (a preset name, a method name = its defaults, or a YAML path) plus overrides."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        data, name = read_yaml(path), method_of_preset(path.stem)
    else:
        name = method_of_preset(preset)
        file = CONFIG_DIR / "methods" / f"{preset}.yaml"
        data = read_yaml(file) if file.exists() else {}
        if not file.exists() and preset != name:
            raise ConfigError(f"no preset {preset!r} in {CONFIG_DIR / 'methods'}; presets: {list_presets()}")
    return from_dict(METHODS[name].config_cls, apply_overrides(data, overrides), where=preset)


def build_method(
    preset: str,
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    classifier: Classifier | None = None,
    overrides: Sequence[str] = (),
    config: Any | None = None,
) -> AnomalyMethod:
    """Build a method from explicit parts.

    Args:
        preset: method name (``anofpdm``), preset name (``wolleb_p1``) or path to a preset YAML.
        eps_model: the noise model callable ``eps_model(x_t, t, y)`` (for CG-CDM it must also offer
            ``class_embedding`` and ``forward_embedding``).
        schedule: the noise schedule the model was trained with.
        classifier: the noisy classifier, for Wolleb and CG-CDM.
        overrides: ``key=value`` overrides of the preset's fields.
        config: a ready config object (then ``preset`` only picks the method).
    """
    name = method_of_preset(Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset)
    spec = METHODS[name]
    cfg = config if config is not None else method_config(preset, overrides)
    if spec.needs_classifier:
        if classifier is None:
            raise ValueError(f"method {name} needs a noisy classifier: pass classifier=... (train one with `anomalydiff train classifier`)")
        return spec.cls(eps_model, classifier, schedule, cfg)
    return spec.cls(eps_model, schedule, cfg)


__all__ = [
    "AnoDDPM", "AnoFPDM", "CGCDM", "DDIB", "Wolleb", "AnomalyMethod", "Classifier", "CountingEpsModel", "EpsModel",
    "NotFittedError", "METHODS", "MethodSpec", "build_method", "list_presets", "method_config", "method_of_preset",
]
