"""Speed of the built-in brain phantom (spec data.md): subjects/s and axial slices/s at 1 mm on one core.

Usage::

    .venv/bin/python benchmarks/phantom_speed.py [--subjects 3] [--out benchmarks/results/phantom_speed.json]

Measures, per layout, the in-memory generation of a subject (``generate_subject``) and the NIfTI writing
(``write_subject``: gzip, atomic rename) separately, as wall-clock time and as this process's CPU time. CPU
time is the fair number on a shared machine (other processes inflate wall time); the load average at the
start and end is recorded next to it. Torch (used for trilinear resampling) is limited to one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: set before numpy / torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anomalydiff.data.phantom import PhantomConfig, generate_subject, load_anatomy, write_subject  # noqa: E402


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3, help="subjects per layout (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "phantom_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    _, load_wall, load_cpu = _timed(load_anatomy)
    anatomy = load_anatomy()
    config = PhantomConfig()  # 1 mm, the real geometry
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("brats", "atlas"):
            rows = []
            for index in range(args.subjects):
                subject, gen_wall, gen_cpu = _timed(generate_subject, config, layout, args.seed, index, anatomy)
                _, write_wall, write_cpu = _timed(write_subject, subject, Path(tmp) / layout, layout, index)
                slices = int(subject.seg.shape[2])
                rows.append({"subject_id": subject.subject_id, "has_lesion": subject.has_lesion,
                             "generate_wall_s": round(gen_wall, 3), "generate_cpu_s": round(gen_cpu, 3),
                             "write_wall_s": round(write_wall, 3), "write_cpu_s": round(write_cpu, 3),
                             "axial_slices": slices})
            shape = list(subject.seg.shape)
            slices = rows[0]["axial_slices"]
            gen_cpu = statistics.median(r["generate_cpu_s"] for r in rows)
            gen_wall = statistics.median(r["generate_wall_s"] for r in rows)
            all_cpu = statistics.median(r["generate_cpu_s"] + r["write_cpu_s"] for r in rows)
            all_wall = statistics.median(r["generate_wall_s"] + r["write_wall_s"] for r in rows)
            results[layout] = {
                "shape": shape,
                "contrasts": len(subject.volumes),
                "median_generate_cpu_s_per_subject": round(gen_cpu, 3),
                "median_generate_wall_s_per_subject": round(gen_wall, 3),
                "median_generate_and_write_cpu_s_per_subject": round(all_cpu, 3),
                "median_generate_and_write_wall_s_per_subject": round(all_wall, 3),
                "subjects_per_s_cpu": round(1.0 / gen_cpu, 3),
                "axial_slices_per_s_cpu": round(slices / gen_cpu, 1),
                "subjects_per_s_cpu_with_write": round(1.0 / all_cpu, 3),
                "axial_slices_per_s_cpu_with_write": round(slices / all_cpu, 1),
                "subjects_per_s_wall_with_write": round(1.0 / all_wall, 3),
                "per_subject": rows,
            }
            print(f"{layout}: {shape} x {len(subject.volumes)} contrasts: generate {gen_cpu:.2f} s CPU "
                  f"({gen_wall:.2f} s wall), + write {all_cpu:.2f} s CPU ({all_wall:.2f} s wall) per subject; "
                  f"{slices / all_cpu:.0f} axial slices/s (CPU, with write)")
    report = {
        "benchmark": "phantom_speed",
        "command": "python benchmarks/phantom_speed.py --subjects %d --seed %d" % (args.subjects, args.seed),
        "voxel_size_mm": config.voxel_size,
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "anatomy_load_s": {"wall": round(load_wall, 2), "cpu": round(load_cpu, 2)},
        "load_average_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "layouts": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
