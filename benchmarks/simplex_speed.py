"""Speed and statistics of the vectorised fractal OpenSimplex noise (AnoDDPM "(S)", spec D.1).

Measures, on this machine:
- noise tensors per second for ``[16, 1, 64, 64]`` (and ``[16, 1, 128, 128]``) with the spec config
  (6 octaves, persistence 0.8, frequency 64), with torch's thread count and with 1 thread;
- the time to build the permutation tables for a batch of seeds;
- the pure-Python ``opensimplex`` package (if installed) on one 64x64 channel, for comparison;
- the std of the un-normalised fractal noise at 64x64 and 128x128, and the neighbouring-pixel correlation.

Writes ``benchmarks/results/simplex_speed.json``. Run from the repository root:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/simplex_speed.py     # ~1 minute on 2 cores
    .venv/bin/python benchmarks/simplex_speed.py --repeats 3 --skip-reference

On a machine whose cores are busy with other processes, OpenMP's default spin-waiting makes torch with 2
threads 5-30x slower than with 1 (measured here); ``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts)
removes that. The JSON records the policy and the load average so numbers can be compared.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from anomalydiff.diffusion.noise import SimplexConfig, build_permutation_tables, simplex_noise

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "simplex_speed.json"


def _time_calls(function: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Wall-clock seconds per call (one warm-up call first): min, median, mean over ``repeats``."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times)}


def _speed(shape: tuple[int, int, int, int], threads: int, repeats: int) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (shape[0],), generator=generator)
        timing = _time_calls(lambda: simplex_noise(shape, t, generator=generator), repeats)
    finally:
        torch.set_num_threads(previous)
    return {
        "shape": list(shape),
        "threads": threads,
        "repeats": repeats,
        **timing,
        "tensors_per_s_median": 1.0 / timing["median_s"],
        "tensors_per_s_best": 1.0 / timing["min_s"],
    }


def _statistics(size: int, num_images: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (num_images,), generator=generator)
    noise = simplex_noise((num_images, 1, size, size), t, generator=generator, dtype=torch.float64)

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    return {
        "size": size,
        "num_images": num_images,
        "std_pooled": float(noise.std()),
        "std_per_image_mean": float(noise.std(dim=(2, 3)).mean()),
        "mean": float(noise.mean()),
        "min": float(noise.min()),
        "max": float(noise.max()),
        "neighbour_correlation_horizontal": correlation(noise[..., :, 1:], noise[..., :, :-1]),
        "neighbour_correlation_vertical": correlation(noise[..., 1:, :], noise[..., :-1, :]),
    }


def _reference_single_channel(size: int) -> dict[str, Any] | None:
    """Pure-Python opensimplex for one [size, size] channel, 6 octaves (AnoDDPM's loop without numba)."""
    try:
        import numpy as np
        import opensimplex
    except ImportError:
        return None
    config = SimplexConfig()
    generator = opensimplex.OpenSimplex(12345)
    axis = np.arange(size)
    start = time.perf_counter()
    frequency = config.frequency
    for _ in range(config.octaves):
        generator.noise3array(axis / frequency, axis / frequency, np.array([500.0]) / frequency)
        frequency /= 2
    seconds = time.perf_counter() - start
    return {
        "package": f"opensimplex {importlib.metadata.version('opensimplex')}",
        "shape": [1, 1, size, size],
        "seconds_per_channel": seconds,
        "estimated_seconds_for_16_channels": 16 * seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per setting (after one warm-up)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the pure-Python package")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where to write the JSON results")
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    thread_counts = sorted({default_threads, 1}, reverse=True)
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "what": "fractal 3-D OpenSimplex noise (spec D.1: 6 octaves, persistence 0.8, frequency 64), vectorised torch",
        "command": f"python benchmarks/simplex_speed.py --repeats {args.repeats}",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP default)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_before": list(load_before),
        "speed": [_speed((16, 1, 64, 64), threads, args.repeats) for threads in thread_counts],
    }
    results["speed"] += [_speed((16, 1, 128, 128), threads, max(2, args.repeats // 4)) for threads in thread_counts]
    seeds = torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(2))
    results["permutation_tables"] = {
        f"{n}_seeds": _time_calls(lambda n=n: build_permutation_tables(seeds[:n]), args.repeats) for n in (16, 64)
    }
    results["statistics"] = [_statistics(64, 64), _statistics(128, 32)]
    if not args.skip_reference:
        results["pure_python_opensimplex_reference"] = _reference_single_channel(64)
    results["load_average_1_5_15_after"] = list(os.getloadavg())

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for entry in results["speed"]:
        print(
            f"{entry['shape']} threads={entry['threads']}: {entry['tensors_per_s_median']:.2f} tensors/s median "
            f"({entry['tensors_per_s_best']:.2f} best)"
        )
    for entry in results["statistics"]:
        print(
            f"{entry['size']}x{entry['size']}: std pooled {entry['std_pooled']:.4f}, per image "
            f"{entry['std_per_image_mean']:.4f}, neighbour corr {entry['neighbour_correlation_horizontal']:.4f}"
        )
    print(f"load average before/after: {load_before} / {results['load_average_1_5_15_after']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
