"""Training configs (frozen dataclasses) and how a training YAML picks a model size.

A training YAML names the network size by preset (``model: cpu``), by a model YAML path
(``model: configs/models/cpu.yaml``) or inline (``model: {channels: [32, 64], ...}``). A preset file holds
one section per network kind (``unet:`` for diffusion models, ``classifier:`` for the noisy classifier)::

    # configs/train/phantom_cfg_cpu.yaml
    mode: cfg
    model: cpu
    steps: 3000

``--set`` overrides are applied after the preset is expanded (``--set model.channels=[16,32]``), except
``--set model=tiny``, which picks the preset itself. The fully resolved config is written into every run
folder as ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import anomalydiff
from anomalydiff.config import ConfigError, apply_overrides, from_dict, parse_override, read_yaml
from anomalydiff.diffusion.noise import SimplexConfig
from anomalydiff.diffusion.schedule import ScheduleConfig
from anomalydiff.models.classifier import ClassifierConfig
from anomalydiff.models.unet import UNetConfig

DiffusionMode = Literal["cfg", "healthy", "simplex"]

#: Where ``model: <name>`` presets are looked up (the repository's ``configs/models``).
MODEL_PRESET_DIR = Path(anomalydiff.__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings (spec A.5, C.2: lr 1e-4, weight decay 0, no lr annealing)."""

    lr: float = 1e-4  # C.2 / B.1
    weight_decay: float = 0.0  # A.5: AdamW with weight decay 0
    betas: tuple[float, float] = (0.9, 0.999)  # torch / guided-diffusion default
    grad_clip: float = 1.0  # max global grad norm; 0 = off (guided-diffusion does not clip; cheap insurance)


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights (spec A.5, C.2: rate 0.9999; EMA weights used at test time)."""

    rate: float = 0.9999  # A.5 / C.2
    warmup: bool = False  # True: rate_n = min(rate, (1 + n) / (10 + n)) (diffusers EMAModel); for short CPU runs


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Has the model learned the class difference? (issue "Models that work on a CPU")."""

    every: int = 0  # run every this many steps (and at the end); 0 = off
    split: str = "val"  # store split the fixed validation subset is drawn from
    num_slices: int = 64  # size of the validation subset (half healthy, half unhealthy where possible)
    timesteps: tuple[int, ...] = (100, 300, 500)  # noise levels t the metrics are computed at
    noise_draws: int = 2  # noise draws averaged per slice and t
    batch_size: int = 32  # evaluation batch size
    seed: int = 1234  # fixes the subset and the noise, so curves over steps compare the same inputs


@dataclass(frozen=True)
class DiffusionTrainConfig:
    """Training of a noise-prediction UNet (spec A.5, A.6, C.2, D.1)."""

    mode: DiffusionMode = "cfg"  # cfg: class-conditional + label dropout (A.6); healthy / simplex: AnoDDPM (D.1)
    model: UNetConfig = field(default_factory=UNetConfig)  # architecture (presets in configs/models)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # A.1: T = 1000, linear
    simplex: SimplexConfig = field(default_factory=SimplexConfig)  # D.1 noise, used in mode "simplex"
    label_dropout: float = 0.1  # A.6: p of replacing a label by NULL_LABEL, per sample (mode cfg)
    steps: int = 1000  # optimisation steps (C.2: 210k on 2 GPUs; a CPU run uses a few thousand)
    batch_size: int = 16  # global batch (split over DDP ranks; C.2: 64)
    seed: int = 0  # seeds init, data order, t, noise and label dropout
    log_every: int = 10  # steps between loss.csv rows
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end)
    bf16: bool = False  # bfloat16 autocast (2-3x faster on this CPU; opt-in, fp32 in the papers)
    train_split: str = "train"  # store split trained on
    progress: bool = True  # tqdm progress bar on rank 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Training of the noisy classifier p_phi(y | x_t, t) (spec A.7, B.1, D.2)."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # architecture (presets in configs/models)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # must match the diffusion model's
    steps: int = 1000  # optimisation steps (B.1: 150k; D.2: 250k)
    batch_size: int = 16  # global batch (B.1: 10; D.2: 64)
    seed: int = 0  # seeds init, data order, t and noise
    log_every: int = 10  # steps between loss.csv rows
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end)
    bf16: bool = False  # bfloat16 autocast (opt-in)
    train_split: str = "train"  # store split trained on
    progress: bool = True  # tqdm progress bar on rank 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


TrainConfig = TypeVar("TrainConfig", DiffusionTrainConfig, ClassifierTrainConfig)


def _preset_section(config_cls: type) -> str:
    return "classifier" if config_cls is ClassifierTrainConfig else "unet"


def resolve_model_preset(value: Any, section: str) -> dict[str, Any]:
    """Expand ``model: <preset name | model YAML path | mapping>`` into the architecture mapping.

    Args:
        value: a preset name (``tiny``, ``cpu``, ``paper``: files in ``configs/models``), a path to a model
            YAML, or an inline mapping (returned as is).
        section: ``unet`` or ``classifier``, the section of the model YAML to take.
    """
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"model: expected a preset name, a model YAML path or a mapping, got {value!r}")
    path = Path(value)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_PRESET_DIR / f"{value}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")) if MODEL_PRESET_DIR.is_dir() else []
            raise ConfigError(
                f"model preset {value!r} not found in {MODEL_PRESET_DIR} (known: {known}); "
                "pass a model YAML path (model=path/to/model.yaml) or set the fields inline"
            )
    data = read_yaml(path)
    if section not in data or not isinstance(data[section], dict):
        raise ConfigError(f"{path}: no '{section}:' section (found {sorted(data)})")
    return dict(data[section])


def build_train_config(config_cls: type[TrainConfig], data: dict[str, Any], overrides: Sequence[str] = (), where: str = "config") -> TrainConfig:
    """Build a training config from a mapping plus ``key=value`` overrides, expanding the model preset.

    Args:
        config_cls: :class:`DiffusionTrainConfig` or :class:`ClassifierTrainConfig`.
        data: the YAML mapping (may be empty: all defaults).
        overrides: ``--set`` strings; ``model=<preset>`` is applied before the others.
        where: name used in error messages (the YAML path).
    """
    data = dict(data)
    preset_overrides = [o for o in overrides if parse_override(o)[0] == ["model"]]
    other_overrides = [o for o in overrides if parse_override(o)[0] != ["model"]]
    data = apply_overrides(data, preset_overrides)
    if "model" in data:
        data["model"] = resolve_model_preset(data["model"], _preset_section(config_cls))
    data = apply_overrides(data, other_overrides)
    config = from_dict(config_cls, data, where=where)
    check_train_config(config)
    return config


def load_train_config(config_cls: type[TrainConfig], path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults of ``config_cls``, updated by the YAML at ``path`` (model preset expanded), then ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    return build_train_config(config_cls, data, overrides, where=str(path) if path else config_cls.__name__)


def check_train_config(config: DiffusionTrainConfig | ClassifierTrainConfig) -> None:
    """Raise :class:`ConfigError` for values that cannot train (with what to change)."""
    if config.steps < 1 or config.batch_size < 1:
        raise ConfigError(f"steps ({config.steps}) and batch_size ({config.batch_size}) must be >= 1")
    if config.log_every < 1 or config.checkpoint_every < 1:
        raise ConfigError("log_every and checkpoint_every must be >= 1")
    if isinstance(config, DiffusionTrainConfig) and not 0.0 <= config.label_dropout < 1.0:
        raise ConfigError(f"label_dropout={config.label_dropout} must be in [0, 1) (spec A.6: 0.1)")
    if not 0.0 <= config.ema.rate < 1.0:
        raise ConfigError(f"ema.rate={config.ema.rate} must be in [0, 1) (spec A.5: 0.9999)")
    diag = config.diagnostics
    if diag.every < 0 or diag.num_slices < 2 or diag.noise_draws < 1 or diag.batch_size < 1:
        raise ConfigError("diagnostics: every >= 0, num_slices >= 2, noise_draws >= 1, batch_size >= 1 are required")
    bad = [t for t in diag.timesteps if not 0 <= t < config.schedule.num_timesteps]
    if bad and diag.every > 0:
        raise ConfigError(
            f"diagnostics.timesteps {bad} are outside 0..{config.schedule.num_timesteps - 1} (schedule.num_timesteps); "
            "set diagnostics.timesteps=[...] to training timesteps of this schedule"
        )
