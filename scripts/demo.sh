#!/usr/bin/env bash
# The README's main-job command: sets up .venv if needed, then runs the demo on the built-in phantom.
# Until `anomalydiff demo` lands (issue 6) this runs the pipeline's first stages end to end on CPU:
# phantom -> prepare -> a short diffusion + classifier training run, all under ./demo_run/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
AD=.venv/bin/anomalydiff
OUT=${DEMO_OUT:-demo_run}
rm -rf "$OUT"
$AD --help
$AD phantom --layout brats --subjects 6 --seed 0 --voxel-size 2 --out "$OUT/phantom" --montage "$OUT/phantom_montage.png"
$AD prepare --format brats2021 --root "$OUT/phantom" --out "$OUT/store" --resolution 32 --set "split_fractions=[0.5,0.25,0.25]"
$AD train diffusion --store "$OUT/store" --out "$OUT/cfg" --config configs/train/smoke_tiny.yaml --set steps=200 --set diagnostics.every=100 --device cpu
$AD train classifier --store "$OUT/store" --out "$OUT/classifier" --config configs/train/phantom_classifier_cpu.yaml --set model=tiny --set steps=100 --set bf16=false --set progress=false --set diagnostics.every=50 --set diagnostics.num_slices=16 --device cpu
echo "demo finished: outputs in $OUT/ (phantom montage: $OUT/phantom_montage.png, loss curves: $OUT/cfg/loss.csv)"
