"""NFE and seconds per slice of every method, run through the CLI (`anomalydiff detect`) on trained phantom weights.

For each method preset this runs ``anomalydiff detect --method PRESET --models MODELS --store STORE`` on a small
label-balanced sample (fit on validation, score the test split, write maps + masks + metrics), then reads the cost
block of its ``metrics.json``. Two settings:

- ``paper``: the presets as they are (AnoFPDM T' = 600 every step, Wolleb P1 L = 500 every step, AnoDDPM lambda =
  300 / 200, DDIB L = 450, CG-CDM 10 steps); AnoFPDM's w grid is cut to w = 2 to keep the fit short (scoring cost
  does not depend on the grid);
- ``quick``: the overrides of ``benchmarks/phantom_quick.yaml``.

Seconds per slice are wall-clock seconds of scoring (fitting excluded) with ``--threads`` torch threads; run it on an
idle machine (pause other jobs) for numbers that mean anything. Writes ``benchmarks/results/method_cost.json``.

Usage::

    .venv/bin/python benchmarks/method_cost.py --models models/phantom --store STORE --setting quick
    .venv/bin/python benchmarks/method_cost.py --models models/phantom --store STORE --setting paper --slices 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("anofpdm_ddim", "wolleb_p1", "anoddpm_gauss", "anoddpm_simplex", "ddib", "cgcdm")
PAPER_OVERRIDES = {"anofpdm_ddim": ["w_grid=[2.0]"]}


def quick_overrides() -> dict[str, list[str]]:
    """The per-preset overrides of the quick benchmark (first row of each preset in phantom_quick.yaml)."""
    config = yaml.safe_load((ROOT / "benchmarks/phantom_quick.yaml").read_text())
    found: dict[str, list[str]] = {}
    for row in config["methods"]:
        found.setdefault(row["preset"], list(row.get("set", [])))
    found.setdefault("wolleb_p1", found.get("wolleb_p2", []))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="models/phantom")
    parser.add_argument("--store", required=True, help="prepared store with val and test splits")
    parser.add_argument("--setting", choices=("paper", "quick"), default="quick")
    parser.add_argument("--slices", type=int, default=8, help="test slices scored (and validation slices fitted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(PRESETS))
    parser.add_argument("--work", default="runs/method_cost", help="detect output folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/method_cost.json"))
    args = parser.parse_args()

    overrides = PAPER_OVERRIDES if args.setting == "paper" else quick_overrides()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    exe = str(Path(sys.executable).with_name("anomalydiff"))
    rows = []
    for preset in args.methods:
        out = Path(args.work) / f"{args.setting}_{preset}"
        command = [exe, "detect", "--method", preset, "--models", args.models, "--store", args.store, "--out", str(out),
                   "--max-slices", str(args.slices), "--val-slices", str(args.slices), "--batch-size", str(args.slices),
                   "--balanced", "--threshold-policy", "healthy_quantile", "--overwrite", "--quiet"]
        for item in overrides.get(preset, []):
            command += ["--set", item]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        metrics = json.loads((out / "metrics.json").read_text())
        cost = metrics["cost"]
        rows.append({
            "preset": preset,
            "overrides": overrides.get(preset, []),
            "nfe_per_slice": cost["nfe_per_slice"],
            "classifier_evaluations_per_slice": cost["classifier_evaluations_per_slice"],
            "seconds_per_slice": round(cost["seconds_per_slice"], 3),
            "cpu_seconds_per_slice": round(cost["cpu_seconds_per_slice"], 3),
            "peak_memory_mb": round(cost["peak_memory_mb"], 1),
            "slices": metrics["samples"]["slices"],
            "command_seconds": round(time.perf_counter() - started, 1),
            "outputs": sorted(p.name for p in out.iterdir()),
            "command": " ".join(command[1:]),
        })
        print(f"{preset:16s} NFE/slice {cost['nfe_per_slice']:5d}  s/slice {cost['seconds_per_slice']:7.2f}", flush=True)

    from anomalydiff.machine import describe_machine

    result = {"benchmark": "method_cost", "setting": args.setting, "threads": args.threads, "resolution": 64,
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d"), "models": args.models,
              "store": args.store, "methods": rows}
    path = Path(args.out)
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous = previous if isinstance(previous, dict) and "settings" in previous else {"settings": {}}
    previous["settings"][args.setting] = result
    path.write_text(json.dumps(previous, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
