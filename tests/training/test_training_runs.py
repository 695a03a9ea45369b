"""Whole training runs on the tiny store: run-folder contents, exact resume after SIGKILL, DDP parity, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anomalydiff.labels import NULL_LABEL
from anomalydiff.models import ClassConditionalUNet, NoisyClassifier, UnconditionalUNet, load_model
from anomalydiff.training import (
    ClassifierTrainConfig,
    DiffusionTrainConfig,
    RunFolderError,
    load_train_config,
    train_classifier,
    train_diffusion,
)

from training_helpers import anomalydiff_cli, subprocess_env

FAST = ["model=tiny", "schedule.num_timesteps=50", "batch_size=4", "log_every=2", "checkpoint_every=3", "progress=false"]
DIAG = ["diagnostics.every=3", "diagnostics.timesteps=[5,25,45]", "diagnostics.num_slices=6", "diagnostics.noise_draws=1"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202 - keep in-process runs light on the shared 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cfg_run_folder(tiny_store: Path, tmp_path: Path) -> None:
    config = load_train_config(DiffusionTrainConfig, None, [*FAST, *DIAG, "steps=6", "ema.rate=0.5"])
    run = train_diffusion(config, tiny_store, tmp_path / "run", device="cpu")
    for name in ("config.yaml", "model.safetensors", "model.json", "ema.safetensors", "ema.json", "loss.csv",
                 "state/optimizer.safetensors", "state/optimizer.json", "state/trainer.json", "diagnostics.csv",
                 "diagnostics.png"):
        assert (run / name).exists(), name
    assert not (run / "ckpt.tmp").exists()
    loss = _rows(run / "loss.csv")
    assert list(loss[0]) == ["step", "loss", "lr", "steps_per_s", "wall_time"]
    assert [int(r["step"]) for r in loss] == [2, 4, 6] and all(0 < float(r["loss"]) < 10 for r in loss)
    ema = load_model(run / "ema")
    assert isinstance(ema, ClassConditionalUNet) and ema.config.in_channels == 1
    assert json.loads((run / "ema.json").read_text())["metadata"]["step"] == 6
    assert torch.equal(ema.label_embedding.weight[NULL_LABEL], torch.zeros(ema.config.embedding_dim))
    # EMA (rate 0.5) differs from the raw weights after training
    raw = load_model(run / "model")
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    diag = _rows(run / "diagnostics.csv")
    assert {int(r["step"]) for r in diag} == {3, 6} and {int(r["t"]) for r in diag} == {5, 25, 45}
    assert {r["metric"] for r in diag} == {"implicit_acc", "implicit_auroc", "eps_mse"}
    for r in diag:
        value = float(r["value"])
        assert value >= 0 and (r["metric"] == "eps_mse" or value <= 1)
    state = json.loads((run / "state" / "trainer.json").read_text())
    assert state["step"] == 6 and state["ema_num_updates"] == 6 and state["world_size"] == 1
    # a new run into the same folder is refused
    with pytest.raises(RunFolderError, match="--resume"):
        train_diffusion(config, tiny_store, run, device="cpu")


def test_healthy_simplex_and_classifier_runs(tiny_store: Path, tmp_path: Path) -> None:
    for mode in ("healthy", "simplex"):
        config = load_train_config(DiffusionTrainConfig, None, [*FAST, *DIAG, "steps=3", f"mode={mode}"])
        run = train_diffusion(config, tiny_store, tmp_path / mode, device="cpu")
        assert isinstance(load_model(run / "ema"), UnconditionalUNet)
        assert {r["metric"] for r in _rows(run / "diagnostics.csv")} == {"eps_mse", "eps_mse_auroc"}
    config = load_train_config(ClassifierTrainConfig, None, [*FAST, *DIAG, "steps=3"])
    run = train_classifier(config, tiny_store, tmp_path / "clf", device="cpu")
    clf = load_model(run / "ema")
    assert isinstance(clf, NoisyClassifier) and clf.config.image_size == 32
    diag = _rows(run / "diagnostics.csv")
    assert {r["metric"] for r in diag} == {"classifier_acc", "classifier_auroc"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in diag)


RESUME_SETS = (*FAST, "steps=30", "checkpoint_every=4")


def _train_args(kind: str, store: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in RESUME_SETS]
    return ["train", kind, "--store", str(store), "--out", str(out), "--device", "cpu", *sets, *extra]


def _train_cmd(kind: str, store: Path, out: Path, *extra: str) -> list[str]:
    return [*anomalydiff_cli(), *_train_args(kind, store, out, *extra)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model.safetensors", "ema.safetensors", "state/optimizer.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(run / name)).items()})
    return out


def test_resume_after_sigkill_gives_identical_weights(tiny_store: Path, tmp_path: Path) -> None:
    env = subprocess_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run in this process (1 thread, as the children), the killed one in a child process
    train_diffusion(load_train_config(DiffusionTrainConfig, None, RESUME_SETS), tiny_store, straight, device="cpu")
    # start the same run, SIGKILL it once its first checkpoint exists, then resume
    proc = subprocess.Popen(_train_cmd("diffusion", tiny_store, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "state" / "trainer.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads((killed / "state" / "trainer.json").read_text())["step"]
    assert step_at_kill < 30, "the run finished before it could be killed; the test proves nothing"
    subprocess.run(_train_cmd("diffusion", tiny_store, killed, "--resume"), env=env, check=True, capture_output=True, timeout=300)
    assert json.loads((killed / "state" / "trainer.json").read_text())["step"] == 30
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # the log has one row per logged step, none duplicated by the restart
    assert [int(r["step"]) for r in _rows(killed / "loss.csv")] == list(range(2, 31, 2))


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights(tiny_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    if len(anomalydiff_cli()) != 1:  # torchrun needs the console script
        pytest.skip("the anomalydiff console script is not installed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_cmd("diffusion", tiny_store, run, "--set=steps=6", "--set=checkpoint_every=3")]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run / "state" / "trainer.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
    # parameters of rank 1 compared with rank 0 (broadcast + all-reduce of |difference|) at the last checkpoint
    assert state["replica_max_abs_diff"] == 0.0
    assert "2 process(es)" in result.stderr
    # the weights moved (so identical replicas is not identical initial weights)
    assert isinstance(load_model(run / "ema"), ClassConditionalUNet)
    rows = _rows(run / "loss.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]


def test_cli_help_and_refusal(tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from anomalydiff.cli import app

    runner = CliRunner()
    for kind in ("diffusion", "classifier"):
        help_text = runner.invoke(app, ["train", kind, "--help"])
        assert help_text.exit_code == 0 and "Examples" in help_text.output and "--resume" in help_text.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    refused = runner.invoke(app, _train_args("classifier", tiny_store, tmp_path / "busy"))
    assert refused.exit_code == 2 and "--resume" in refused.output and "another --out" in refused.output
    bad = runner.invoke(app, _train_args("diffusion", tiny_store, tmp_path / "new", "--set=optim.learning_rate=1"))
    assert bad.exit_code == 2 and "learning_rate" in bad.output and not (tmp_path / "new").exists()
    wrong = runner.invoke(app, _train_args("diffusion", tiny_store, tmp_path / "wrong", "--set=model.in_channels=3"))
    assert wrong.exit_code == 2 and "has 1 channels" in wrong.output
    nothing = runner.invoke(app, _train_args("diffusion", tiny_store, tmp_path / "none", "--resume"))
    assert nothing.exit_code == 2 and "not a run folder" in nothing.output
    # a resumed run keeps its own config (and --set can extend it)
    ok = runner.invoke(app, _train_args("classifier", tiny_store, tmp_path / "clf", "--set=steps=2"))
    assert ok.exit_code == 0, ok.output
    more = runner.invoke(app, ["train", "classifier", "--store", str(tiny_store), "--out", str(tmp_path / "clf"),
                               "--device", "cpu", "--resume", "--set=steps=4"])
    assert more.exit_code == 0, more.output
    assert json.loads((tmp_path / "clf" / "state" / "trainer.json").read_text())["step"] == 4
    assert [int(r["step"]) for r in _rows(tmp_path / "clf" / "loss.csv")] == [2, 4]
