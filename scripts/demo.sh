#!/usr/bin/env bash
# The README's main-job command: sets up .venv if needed, then runs `anomalydiff demo` on the built-in phantom
# with the committed models in models/phantom/ (no download): phantom -> store -> fit AnoFPDM and Wolleb on
# validation -> score and evaluate a test sample -> predict on a held-out scan -> report. ~5 min on 2 CPU cores.
# Output folder: $DEMO_OUT (default demo_run/); an earlier demo there is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# spin-waiting OpenMP threads slow torch 5-30x when other processes share the cores
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
OUT=${DEMO_OUT:-demo_run}
.venv/bin/anomalydiff demo --out "$OUT" --overwrite "$@"
echo "open $(cd "$OUT" && pwd)/report.html"
