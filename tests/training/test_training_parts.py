"""The pieces of the training loops: losses, label dropout, modes, EMA, sampler, configs, bf16, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from anomalydiff.config import ConfigError
from anomalydiff.data.store import SliceStore
from anomalydiff.diffusion.noise import simplex_noise
from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY
from anomalydiff.models import ClassConditionalUNet, UNetConfig
from anomalydiff.training.checkpoint import (
    COMPLETE,
    TMP_DIR,
    RunFolderError,
    load_checkpoint,
    prepare_run_folder,
    recover_checkpoint,
    save_checkpoint,
    truncate_csv_after,
)
from anomalydiff.training.classifier import classifier_loss
from anomalydiff.training.config import ClassifierTrainConfig, DiffusionTrainConfig, load_train_config
from anomalydiff.training.diffusion import diffusion_dataset, diffusion_loss, draw_noise, drop_labels
from anomalydiff.training.distributed import ShardedBatchSampler
from anomalydiff.training.ema import EMA

TINY = UNetConfig(
    in_channels=1, channels=(16, 32, 32), attention_levels=(False, False, True), num_res_blocks=1,
    num_head_channels=(16, 16, 16), norm_num_groups=8,
)


class _Recorder(torch.nn.Module):
    """An eps model that returns zeros and remembers its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append((x_t, t, y))
        return torch.zeros_like(x_t)


def test_diffusion_loss_against_diffusers_add_noise() -> None:
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    reference = DDPMScheduler(num_train_timesteps=50, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 25, 49])
    model = _Recorder()
    loss = diffusion_loss(model, schedule, x0, t, noise, torch.zeros(4, dtype=torch.long))
    # the network saw diffusers' q_sample, and the loss is the pixel mean of (noise - 0)^2
    torch.testing.assert_close(model.seen[0][0], reference.add_noise(x0, noise, t), rtol=0, atol=2e-6)
    assert math.isclose(float(loss), float(noise.pow(2).mean()), rel_tol=1e-6)


def test_classifier_loss_is_cross_entropy_on_noised_inputs() -> None:
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    x0, eps = torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    t, y = torch.tensor([0, 20, 49]), torch.tensor([0, 1, 1])

    def classifier(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        mean = x_t.mean(dim=(1, 2, 3))
        return torch.stack([-mean, mean], dim=1)

    loss = classifier_loss(classifier, schedule, x0, t, eps, y)
    # x_t = sqrt(1 - alpha_bar_t) * 1 (x0 = 0); logits (-m, m); CE = log(1 + exp(-2 m)) for y=1, log(1+exp(2m)) for y=0
    m = (1 - schedule.alpha_bar[t]).sqrt()
    expected = torch.stack([torch.log1p(torch.exp(2 * m[0])), torch.log1p(torch.exp(-2 * m[1])), torch.log1p(torch.exp(-2 * m[2]))])
    assert math.isclose(float(loss), float(expected.mean()), rel_tol=1e-5)


def test_label_dropout_rate_and_values() -> None:
    y = torch.tensor([HEALTHY, UNHEALTHY]).repeat(10_000)
    out = drop_labels(y, 0.1, torch.Generator().manual_seed(0))
    dropped = out == NULL_LABEL
    # binomial(20000, 0.1): mean 2000, sd 42.4; 5 sd bounds
    assert 1788 <= int(dropped.sum()) <= 2212
    assert torch.equal(out[~dropped], y[~dropped])
    # both classes are dropped at the same rate (per sample, independent of the label)
    assert abs(float(dropped[y == 0].float().mean()) - float(dropped[y == 1].float().mean())) < 0.02
    assert not (drop_labels(y, 0.0, torch.Generator().manual_seed(0)) == NULL_LABEL).any()
    assert (drop_labels(y, 0.999999, torch.Generator().manual_seed(0)) == NULL_LABEL).all()


def test_null_embedding_is_zero_and_stays_zero_after_training_steps() -> None:
    torch.manual_seed(0)
    model = ClassConditionalUNet(TINY)
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    assert torch.equal(model.label_embedding.weight[NULL_LABEL], torch.zeros(TINY.embedding_dim))
    before = model.label_embedding.weight[:NULL_LABEL].detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # large lr and decay on purpose
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x0 = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
        y = torch.tensor([0, 1, NULL_LABEL, NULL_LABEL, 1, 0])
        loss = diffusion_loss(model, schedule, x0, torch.randint(0, 50, (6,), generator=g), torch.randn(x0.shape, generator=g), y)
        optimizer.zero_grad()
        loss.backward()
        assert torch.equal(model.label_embedding.weight.grad[NULL_LABEL], torch.zeros(TINY.embedding_dim))
        optimizer.step()
    assert torch.equal(model.label_embedding.weight[NULL_LABEL], torch.zeros(TINY.embedding_dim))
    assert not torch.equal(model.label_embedding.weight[:NULL_LABEL], before)  # the real classes did train


def test_healthy_modes_train_on_healthy_slices_only(tiny_store: Path) -> None:
    store = SliceStore(tiny_store)
    labels = lambda ds: {store.slices[int(r)].label for r in ds.row_index}  # noqa: E731
    for mode in ("healthy", "simplex"):
        dataset = diffusion_dataset(store, DiffusionTrainConfig(mode=mode))
        assert labels(dataset) == {HEALTHY} and len(dataset) == 16
    assert labels(diffusion_dataset(store, DiffusionTrainConfig(mode="cfg"))) == {HEALTHY, UNHEALTHY}


def _lag1_correlation(noise: torch.Tensor) -> float:
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_simplex_mode_targets_are_simplex_noise() -> None:
    config = DiffusionTrainConfig(mode="simplex")
    x0, t = torch.zeros(2, 2, 32, 32), torch.tensor([3, 400])
    target = draw_noise("simplex", x0, t, config, torch.Generator().manual_seed(5))
    expected = simplex_noise((2, 2, 32, 32), t, config.simplex, generator=torch.Generator().manual_seed(5))
    assert torch.equal(target, expected)
    gaussian = draw_noise("healthy", x0, t, config, torch.Generator().manual_seed(5))
    # spatially smooth and not unit variance (D.1) versus white N(0, 1)
    assert _lag1_correlation(target) > 0.8 and target.std() < 0.7
    assert abs(_lag1_correlation(gaussian)) < 0.1 and 0.9 < gaussian.std() < 1.1


def test_ema_against_hand_computed_values() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, rate=0.9)
    shadow = 0.0
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        shadow = 0.9 * shadow + 0.1 * value
    assert math.isclose(float(ema.shadow.weight), shadow, rel_tol=1e-6)
    warm = EMA(model, rate=0.999, warmup=True)
    # update n uses min(rate, (1 + n) / (10 + n)): 2/11 at n = 1, so the shadow moves 9/11 of the way
    with torch.no_grad():
        model.weight.fill_(14.0)
    warm.update(model)
    assert math.isclose(float(warm.shadow.weight), 3.0 * 2 / 11 + 14.0 * 9 / 11, rel_tol=1e-6)
    assert not warm.shadow.weight.requires_grad


def test_sampler_shards_are_disjoint_seeded_and_cover_each_epoch() -> None:
    n, batch = 22, 4
    ranks = [ShardedBatchSampler(n, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    single = ShardedBatchSampler(n, batch, seed=3)
    epoch_items = []
    for step in range(single.batches_per_epoch):
        shards = [s.indices(step) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])
        assert np.array_equal(np.concatenate(shards), single.indices(step))  # same global batch as one process
        epoch_items.extend(single.indices(step))
    assert len(set(epoch_items)) == len(epoch_items) == 20  # 5 batches of 4, no repeat (last 2 items dropped)
    assert not np.array_equal(single.indices(0), single.indices(single.batches_per_epoch))  # new order each epoch
    # a fresh sampler (a resumed run) gives the same batch at the same step
    assert np.array_equal(ShardedBatchSampler(n, batch, seed=3).indices(7), single.indices(7))
    assert not np.array_equal(ShardedBatchSampler(n, batch, seed=4).indices(0), single.indices(0))
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(n, 5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="lower batch_size"):
        ShardedBatchSampler(3, 4, seed=0)


def test_one_bf16_step_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = ClassConditionalUNet(TINY)
    with torch.no_grad():  # MONAI zero-initialises the output conv; make the gradients non-trivial everywhere
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    schedule = make_schedule(ScheduleConfig(num_timesteps=50))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1, torch.randn(8, 1, 32, 32, generator=g)
    t, y = torch.randint(0, 50, (8,), generator=g), torch.tensor([0, 1, 2, 1, 0, 1, 0, 2])
    results = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, schedule, x0, t, noise, y)
        loss.backward()
        results.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 != loss32  # autocast really ran in bf16
    assert abs(loss16 - loss32) / loss32 < 2e-2
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.98
    assert abs(grad16.norm() / grad32.norm() - 1) < 0.05


def test_config_presets_overrides_and_errors(tmp_path: Path) -> None:
    config = load_train_config(DiffusionTrainConfig, None, ["model=tiny", "model.channels=[16,32,64]", "steps=5"])
    assert config.model.channels == (16, 32, 64) and config.model.norm_num_groups == 8 and config.steps == 5
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("mode: healthy\nmodel: tiny\nbf16: true\nema: {rate: 0.999, warmup: true}\n")
    config = load_train_config(DiffusionTrainConfig, yaml_file, ["model=cpu"])  # --set model= wins over the file
    assert config.mode == "healthy" and config.model.channels == (32, 64, 128) and config.bf16 and config.ema.warmup
    assert load_train_config(ClassifierTrainConfig, None, ["model=tiny"]).model.channels == (16, 32, 32)
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(DiffusionTrainConfig, None, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(DiffusionTrainConfig, None, ["model=huge"])
    with pytest.raises(ConfigError, match="diagnostics.timesteps"):
        load_train_config(DiffusionTrainConfig, None, ["schedule.num_timesteps=50", "diagnostics.every=5"])  # t 100..500
    with pytest.raises(ConfigError, match="label_dropout"):
        load_train_config(DiffusionTrainConfig, None, ["label_dropout=1.5"])


def test_repo_training_configs_load() -> None:
    configs = sorted((Path(__file__).parents[2] / "configs" / "train").glob("*.yaml"))
    assert configs, "configs/train/*.yaml missing"
    for path in configs:
        cls = ClassifierTrainConfig if "classifier" in path.name else DiffusionTrainConfig
        load_train_config(cls, path)


def _tiny_parts(seed: int) -> tuple[ClassConditionalUNet, EMA, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ClassConditionalUNet(TINY)
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(2, 1, 32, 32)
    model(x, torch.tensor([1, 2]), torch.tensor([0, 1])).pow(2).mean().backward()
    optimizer.step()
    ema.update(model)
    return model, ema, optimizer


def test_checkpoint_round_trip_and_atomic_recovery(tmp_path: Path) -> None:
    model, ema, optimizer = _tiny_parts(0)
    save_checkpoint(tmp_path, model, ema, optimizer, {"step": 1, "wall_time": 0.5})
    assert not (tmp_path / TMP_DIR).exists()
    model2, ema2, optimizer2 = _tiny_parts(1)
    state = load_checkpoint(tmp_path, model2, ema2, optimizer2)
    assert state["step"] == 1 and ema2.num_updates == 1
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.shadow.state_dict().values(), ema2.shadow.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    # a write killed before COMPLETE is discarded: the old set stays
    (tmp_path / TMP_DIR / "state").mkdir(parents=True)
    (tmp_path / TMP_DIR / "state" / "trainer.json").write_text(json.dumps({"step": 99}))
    recover_checkpoint(tmp_path)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 1 and not (tmp_path / TMP_DIR).exists()
    # a write killed after COMPLETE (some files already moved) is finished
    (tmp_path / TMP_DIR / "state").mkdir(parents=True)
    (tmp_path / TMP_DIR / "state" / "trainer.json").write_text(json.dumps({"step": 2}))
    (tmp_path / TMP_DIR / COMPLETE).write_text("{}")
    recover_checkpoint(tmp_path)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 2 and not (tmp_path / TMP_DIR).exists()


def test_run_folder_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_run_folder(run, resume=False)
    (run / "config.yaml").write_text("steps: 1\n")
    with pytest.raises(RunFolderError, match="--resume"):
        prepare_run_folder(run, resume=False)
    prepare_run_folder(run, resume=True)  # a run folder killed before its first checkpoint can be resumed
    with pytest.raises(RunFolderError, match="not a run folder"):
        prepare_run_folder(tmp_path / "elsewhere", resume=True)


def test_truncate_csv_after(tmp_path: Path) -> None:
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n5,1.0\n10,0.9\n15,0.8\n")
    truncate_csv_after(path, 10)
    assert path.read_text().splitlines() == ["step,loss", "5,1.0", "10,0.9"]
