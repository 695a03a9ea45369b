"""What machine a result was measured on: one record for benchmarks, demos, model cards and benchmark scripts."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["describe_machine", "machine_facts"]


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU, cores, torch threads, GPU, library versions and the current load, as a JSON-able dict.

    Args:
        device: the device the measured work ran on (recorded; its GPU name when it is CUDA); None = not recorded,
            and ``cuda`` names the first GPU if one is visible.
    """
    device = torch.device(device) if device is not None else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    if device is not None:
        cuda = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    else:
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **({"device": str(device)} if device is not None else {}),
        "cuda": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average_1min": load[0],
    }


def describe_machine() -> str:
    """One line for model cards and benchmark JSON: CPU model, logical cores, GPU, torch version, OS."""
    facts = machine_facts()
    gpu = f", CUDA {facts['cuda']}" if facts["cuda"] else ", no GPU"
    return f"{facts['cpu_model']}, {facts['cpu_count']} logical cores{gpu}, torch {facts['torch']}, {platform.system()}"
