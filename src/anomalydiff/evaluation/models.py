"""Loading the trained parts of a "model folder" and building methods from them.

A **model folder** holds one ``train`` run folder per part (the EMA weights of each are used, spec A.5 / C.2)::

    MODELS/
      cfg/               class-conditional CFG UNet (AnoFPDM, DDIB, Wolleb, CG-CDM)   train diffusion mode=cfg
      classifier/        noisy classifier p_phi(y | x_t, t) (Wolleb, CG-CDM)            train classifier
      healthy_gaussian/  healthy-only unconditional UNet (AnoDDPM (G))                  train diffusion mode=healthy
      healthy_simplex/   healthy-only UNet regressing simplex noise (AnoDDPM (S))       train diffusion mode=simplex

Each part folder is a run folder written by ``anomalydiff train`` (``config.yaml``, ``ema.safetensors``,
``ema.json``). The noise schedule comes from the run's saved ``config.yaml`` (never from a default), and all
parts must share one schedule. Every weight file is identified by its sha256 (recorded in results).

A single run folder, or a mapping ``{part: run folder}``, can be given instead of a model folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from anomalydiff.config import ConfigError, from_dict, read_yaml, to_dict
from anomalydiff.diffusion.noise import SimplexConfig
from anomalydiff.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_schedule
from anomalydiff.methods import METHODS, AnomalyMethod, build_method, method_config, method_of_preset
from anomalydiff.models.io import CheckpointError, load_model, read_model_info

__all__ = [
    "PART_NAMES",
    "ModelPart",
    "Parts",
    "build_method_from_parts",
    "file_sha256",
    "load_parts",
    "parts_needed",
    "train_command",
]

#: The parts a model folder can hold, in a fixed order.
PART_NAMES: tuple[str, ...] = ("cfg", "classifier", "healthy_gaussian", "healthy_simplex")

#: part -> (model class in ema.json, training mode in config.yaml or None for the classifier, training YAML)
_PART_KINDS: dict[str, tuple[str, str | None, str]] = {
    "cfg": ("ClassConditionalUNet", "cfg", "configs/train/phantom_cfg_cpu.yaml"),
    "classifier": ("NoisyClassifier", None, "configs/train/phantom_classifier_cpu.yaml"),
    "healthy_gaussian": ("UnconditionalUNet", "healthy", "configs/train/phantom_healthy_cpu.yaml"),
    "healthy_simplex": ("UnconditionalUNet", "simplex", "configs/train/phantom_simplex_cpu.yaml"),
}


def train_command(part: str, model_dir: str | Path = "MODELS", store: str | Path = "STORE") -> str:
    """The command that creates ``part`` inside ``model_dir`` (quoted in error messages).

    Args:
        part: one of :data:`PART_NAMES`.
        model_dir: the model folder.
        store: the slice store to train on.

    Returns:
        A shell command line.
    """
    kind = "classifier" if part == "classifier" else "diffusion"
    yaml = _PART_KINDS[part][2]
    return f"anomalydiff train {kind} --store {store} --out {Path(model_dir) / part} --config {yaml}"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (read in chunks).

    Args:
        path: the file.
        chunk: bytes per read.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelPart:
    """One loaded part of a model folder.

    Attributes:
        name: the part name (``cfg``, ``classifier``, ``healthy_gaussian``, ``healthy_simplex``).
        module: the network (eval mode, on the requested device).
        run_dir: the run folder it came from.
        weights: the ``ema.safetensors`` file.
        sha256: sha256 of ``weights``.
        model_class: class name from ``ema.json``.
        step: training step of the EMA weights (``ema.json`` metadata), or None.
        train_config: the run's ``config.yaml`` as a dict.
        schedule_config: the noise schedule the part was trained with.
    """

    name: str
    module: nn.Module
    run_dir: Path
    weights: Path
    sha256: str
    model_class: str
    step: int | None
    train_config: dict[str, Any]
    schedule_config: ScheduleConfig

    @property
    def model_id(self) -> str:
        """A short identity ``part@sha256[:16]`` (stored in calibrations and checked when they are loaded)."""
        return f"{self.name}@{self.sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for results: path, sha256, class, step, training mode."""
        return {
            "run_dir": str(self.run_dir),
            "weights": str(self.weights),
            "sha256": self.sha256,
            "model_class": self.model_class,
            "step": self.step,
            "mode": self.train_config.get("mode"),
            "schedule": to_dict(self.schedule_config),
        }


@dataclass
class Parts:
    """The networks of a model folder and their shared noise schedule.

    Attributes:
        eps_model: class-conditional CFG UNet (``cfg/``) or None.
        classifier: noisy classifier (``classifier/``) or None.
        healthy_model: healthy-only Gaussian UNet (``healthy_gaussian/``) or None.
        simplex_model: healthy-only simplex UNet (``healthy_simplex/``) or None.
        schedule: the noise schedule all parts were trained with.
        schedule_config: its config.
        source: the model folder (or a description of the mapping given).
        parts: part name -> :class:`ModelPart` for every part found.
    """

    eps_model: nn.Module | None
    classifier: nn.Module | None
    healthy_model: nn.Module | None
    simplex_model: nn.Module | None
    schedule: NoiseSchedule
    schedule_config: ScheduleConfig
    source: str
    parts: dict[str, ModelPart] = field(default_factory=dict)

    @property
    def ids(self) -> dict[str, dict[str, Any]]:
        """part -> {run_dir, weights, sha256, model_class, step, mode, schedule} for every loaded part."""
        return {name: part.describe() for name, part in self.parts.items()}

    @property
    def sha256(self) -> dict[str, str]:
        """part -> sha256 of its EMA weight file."""
        return {name: part.sha256 for name, part in self.parts.items()}

    def require(self, names: Sequence[str], why: str = "") -> None:
        """Raise a :class:`CheckpointError` naming every missing part and the command that makes it.

        Args:
            names: the parts needed.
            why: what needs them (e.g. ``"method wolleb_p2"``), for the message.
        """
        missing = [name for name in names if name not in self.parts]
        if missing:
            commands = "; ".join(train_command(name, self.source) for name in missing)
            raise CheckpointError(
                f"model folder {self.source} has no {', '.join(f'{m}/' for m in missing)}"
                f"{f' (needed by {why})' if why else ''}. Train it with: {commands} "
                "(or run `anomalydiff benchmark CONFIG --train`)"
            )


def _weights_of(run: Path) -> Path:
    """The EMA weight file of a run folder (or the file itself if a weight file is given)."""
    if run.suffix == ".safetensors":
        return run
    return run / "ema.safetensors"


def _load_part(name: str, run: Path, device: torch.device | str) -> ModelPart:
    """Load one part from its run folder, checking class, training mode and schedule source."""
    weights = _weights_of(run)
    run_dir = weights.parent
    expected_class, expected_mode, _ = _PART_KINDS[name]
    if not weights.exists():
        hint = " (only raw weights model.safetensors exist; the methods use the EMA weights)" if (
            run_dir / "model.safetensors"
        ).exists() else ""
        raise CheckpointError(
            f"{weights} not found{hint}: {run_dir} is not a finished `anomalydiff train` run folder for part "
            f"{name!r}; train it with: {train_command(name, run_dir.parent)}"
        )
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise CheckpointError(
            f"{config_file} not found: the noise schedule of {weights} comes from the run's config.yaml; keep the "
            "weights inside their run folder"
        )
    train_config = read_yaml(config_file)
    schedule = from_dict(ScheduleConfig, dict(train_config.get("schedule") or {}), where=f"{config_file}: schedule")
    info = read_model_info(weights)
    if info["model_class"] != expected_class:
        raise CheckpointError(
            f"{weights} holds a {info['model_class']}, but part {name!r} must be a {expected_class}; put each run "
            f"folder under its own part name ({', '.join(PART_NAMES)})"
        )
    mode = train_config.get("mode")
    if expected_mode is not None and mode != expected_mode:
        raise CheckpointError(
            f"{config_file} was trained with mode={mode!r}, but part {name!r} needs mode={expected_mode!r}; "
            f"train it with: {train_command(name, run_dir.parent)}"
        )
    module = load_model(weights, device=device)
    step = info.get("metadata", {}).get("step")
    return ModelPart(
        name=name,
        module=module,
        run_dir=run_dir,
        weights=weights,
        sha256=file_sha256(weights),
        model_class=info["model_class"],
        step=None if step is None else int(step),
        train_config=train_config,
        schedule_config=schedule,
    )


def _part_of_run(run: Path) -> str:
    """Which part a single run folder is, from its model class and training mode."""
    weights = _weights_of(run)
    info = read_model_info(weights)
    config_file = weights.parent / "config.yaml"
    mode = read_yaml(config_file).get("mode") if config_file.exists() else None
    for name, (model_class, part_mode, _) in _PART_KINDS.items():
        if info["model_class"] == model_class and (part_mode is None or part_mode == mode):
            return name
    raise CheckpointError(f"{weights}: a {info['model_class']} trained with mode={mode!r} is none of the parts {PART_NAMES}")


def load_parts(
    model_dir_or_files: str | Path | Mapping[str, str | Path],
    device: torch.device | str = "cpu",
    require: Sequence[str] = (),
) -> Parts:
    """Load the networks of a model folder (or of explicit run folders) and their shared schedule.

    Args:
        model_dir_or_files: a model folder with part sub-folders (``cfg/``, ``classifier/``,
            ``healthy_gaussian/``, ``healthy_simplex/``); or a single run folder (its part is inferred from
            its model class and training mode); or a mapping ``{part: run folder or ema.safetensors}``.
        device: where to put the networks.
        require: parts that must be present (a missing one is an error naming the command that makes it).

    Returns:
        :class:`Parts`.

    Raises:
        CheckpointError: the folder is missing, holds no part, a required part is missing, a part is of the
            wrong kind, or the parts were trained with different noise schedules.
    """
    if isinstance(model_dir_or_files, Mapping):
        unknown = sorted(set(model_dir_or_files) - set(PART_NAMES))
        if unknown:
            raise CheckpointError(f"unknown model part(s) {unknown}; parts are {PART_NAMES}")
        runs = {name: Path(path) for name, path in model_dir_or_files.items()}
        source = "{" + ", ".join(f"{k}: {v}" for k, v in runs.items()) + "}"
    else:
        folder = Path(model_dir_or_files)
        source = str(folder)
        if not folder.exists():
            raise CheckpointError(
                f"model folder {folder} not found. Create it with `anomalydiff benchmark CONFIG --train`, or train "
                f"each part into it, e.g.: {train_command('cfg', folder)}"
            )
        if _weights_of(folder).exists() or folder.suffix == ".safetensors":
            runs = {_part_of_run(folder): folder}
        else:
            runs = {name: folder / name for name in PART_NAMES if (folder / name).is_dir()}
        if not runs:
            raise CheckpointError(
                f"{folder} holds none of the parts {', '.join(p + '/' for p in PART_NAMES)}. Train them with e.g.: "
                f"{train_command('cfg', folder)}"
            )
    loaded = {name: _load_part(name, path, device) for name, path in runs.items()}
    schedules = {name: part.schedule_config for name, part in loaded.items()}
    first = next(iter(schedules.values()))
    if any(s != first for s in schedules.values()):
        described = ", ".join(f"{n}: {to_dict(s)}" for n, s in schedules.items())
        raise CheckpointError(
            f"the parts of {source} were trained with different noise schedules ({described}); retrain them with "
            "one schedule (the methods combine the parts under a single schedule)"
        )
    parts = Parts(
        eps_model=loaded["cfg"].module if "cfg" in loaded else None,
        classifier=loaded["classifier"].module if "classifier" in loaded else None,
        healthy_model=loaded["healthy_gaussian"].module if "healthy_gaussian" in loaded else None,
        simplex_model=loaded["healthy_simplex"].module if "healthy_simplex" in loaded else None,
        schedule=make_schedule(first),
        schedule_config=first,
        source=source,
        parts=loaded,
    )
    parts.require(require)
    return parts


def parts_needed(preset: str, overrides: Sequence[str] = ()) -> tuple[str, ...]:
    """The model parts a method preset runs on.

    Args:
        preset: method name, preset name or preset YAML path.
        overrides: ``key=value`` overrides of the preset (AnoDDPM's ``noise`` picks the part).

    Returns:
        Part names, e.g. ``("cfg", "classifier")`` for ``wolleb_p2``.
    """
    name = method_of_preset(Path(preset).stem if str(preset).endswith((".yaml", ".yml")) else preset)
    spec = METHODS[name]
    if spec.model_kind == "healthy":
        config = method_config(preset, overrides)
        diffusion = "healthy_simplex" if getattr(config, "noise", "gaussian") == "simplex" else "healthy_gaussian"
    else:
        diffusion = "cfg"
    return (diffusion, "classifier") if spec.needs_classifier else (diffusion,)


def build_method_from_parts(
    preset: str, parts: Parts, overrides: Sequence[str] = (), config: Any | None = None
) -> tuple[AnomalyMethod, tuple[str, ...]]:
    """Build a method preset on the matching parts of a model folder.

    Args:
        preset: method name, preset name or preset YAML path.
        parts: loaded :class:`Parts`.
        overrides: ``key=value`` overrides of the preset.
        config: a ready method config (then ``overrides`` are ignored).

    Returns:
        ``(method, part names used)``. AnoFPDM gets ``model_id`` = the CFG part's id, so its calibration
        records which weights it was fitted on.

    Raises:
        CheckpointError: a needed part is missing, or the simplex model was trained with other simplex
            settings than the AnoDDPM (S) preset uses.
    """
    cfg = config if config is not None else method_config(preset, overrides)
    name = method_of_preset(Path(preset).stem if str(preset).endswith((".yaml", ".yml")) else preset)
    spec = METHODS[name]
    if spec.model_kind == "healthy":
        diffusion = "healthy_simplex" if getattr(cfg, "noise", "gaussian") == "simplex" else "healthy_gaussian"
    else:
        diffusion = "cfg"
    needed = (diffusion, "classifier") if spec.needs_classifier else (diffusion,)
    parts.require(needed, why=f"method {preset}")
    if diffusion == "healthy_simplex":
        trained = from_dict(
            SimplexConfig,
            dict(parts.parts[diffusion].train_config.get("simplex") or {}),
            where=f"{parts.parts[diffusion].run_dir / 'config.yaml'}: simplex",
        )
        if trained != cfg.simplex:
            raise CheckpointError(
                f"the simplex model {parts.parts[diffusion].run_dir} was trained with simplex noise {to_dict(trained)} "
                f"but {preset} samples with {to_dict(cfg.simplex)}; set the method's simplex.* to the training values"
            )
    eps_model = parts.parts[diffusion].module
    classifier = parts.classifier if spec.needs_classifier else None
    try:
        method = build_method(preset, eps_model, parts.schedule, classifier=classifier, config=cfg)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"cannot build {preset} on {parts.source}: {exc}") from exc
    if hasattr(method, "model_id"):
        method.model_id = parts.parts[diffusion].model_id  # type: ignore[attr-defined]
    return method, needed
