"""Training speed (steps/s) of the diffusion UNet and the noisy classifier, fp32 vs bf16 autocast.

Runs the real training step (``diffusion_loss`` / ``classifier_loss`` + backward + grad clip + AdamW + EMA) on
random 64x64 inputs for each (batch size, precision), after a few warm-up steps, and writes
``benchmarks/results/train_speed.json``.

Usage::

    .venv/bin/python benchmarks/train_speed.py                       # cpu size, batch 16 and 32, fp32 and bf16
    .venv/bin/python benchmarks/train_speed.py --preset tiny --size 32 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from anomalydiff.diffusion.schedule import ScheduleConfig, make_schedule
from anomalydiff.models import ClassConditionalUNet, ClassifierConfig, NoisyClassifier, UNetConfig
from anomalydiff.training.classifier import classifier_loss
from anomalydiff.training.config import resolve_model_preset
from anomalydiff.training.diffusion import diffusion_loss
from anomalydiff.training.ema import EMA
from anomalydiff.training.loop import autocast, count_parameters


def time_steps(kind: str, model: nn.Module, batch: int, channels: int, size: int, bf16: bool, steps: int, warmup: int) -> float:
    """Steps per second of ``steps`` timed training steps after ``warmup`` untimed ones."""
    schedule = make_schedule(ScheduleConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.9999)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    y = torch.randint(0, 2, (batch,), generator=g)
    device = torch.device("cpu")
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        with autocast(device, bf16):
            if kind == "unet":
                loss = diffusion_loss(model, schedule, x0, t, noise, y)
            else:
                loss = classifier_loss(model, schedule, x0, t, noise, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark grid and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="model size preset in configs/models")
    parser.add_argument("--size", type=int, default=64, help="square slice size")
    parser.add_argument("--channels", type=int, default=4, help="image channels (4 = BraTS-like)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=24, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kinds", nargs="+", default=["unet", "classifier"], choices=["unet", "classifier"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for kind in args.kinds:
        for batch in args.batches:
            for bf16 in (False, True):
                torch.manual_seed(0)
                if kind == "unet":
                    model: nn.Module = ClassConditionalUNet(UNetConfig(**resolve_model_preset(args.preset, "unet")).resolved(args.channels))
                else:
                    model = NoisyClassifier(
                        ClassifierConfig(**resolve_model_preset(args.preset, "classifier")).resolved(args.channels, args.size)
                    )
                rate = time_steps(kind, model.train(), batch, args.channels, args.size, bf16, args.steps, args.warmup)
                row = {
                    "network": kind, "preset": args.preset, "parameters": count_parameters(model), "size": args.size,
                    "channels": args.channels, "batch": batch, "precision": "bf16" if bf16 else "fp32",
                    "steps_per_s": round(rate, 3), "images_per_s": round(rate * batch, 1),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    report = {
        "benchmark": "train_speed",
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
